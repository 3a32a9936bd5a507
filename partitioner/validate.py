"""Validation of cluster.json and plan.json: every error names the file and the field.

    load_cluster("cluster.json")    -> Cluster, or ClusterSpecError
    check_plan_dict(d, "plan.json") -> None, or PlanError
    check_plan_blocks(d, model_blocks, "plan.json") -> None, or PlanError (the model's blocks all placed)
    placement_problems(...)         -> what is wrong with a block placement (for plans and tests)

The plan checks and the field checks shared with `partitioner.types` live in
`partitioner.checks` (they build no type, so types can use them without importing this
module); they are re-exported here, where the commands and tests look for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from partitioner.checks import (EMULATION_KEYS, TORCH_DEVICE, TORCH_DEVICE_TYPES, Checker,
                                check_emulation, check_plan_blocks, check_plan_dict, check_torch_device,
                                placement_problems)
from partitioner.errors import ClusterSpecError
from partitioner.types import Cluster, Device, Links
from partitioner.vocab import BLOCK_KINDS, CLUSTER_SCHEMAS, DTYPE_BYTES, block_kind, llava_edges

__all__ = ["load_cluster", "cluster_from_dict", "check_plan_dict", "check_plan_blocks", "placement_problems",
           "EMULATION_KEYS", "TORCH_DEVICE", "TORCH_DEVICE_TYPES", "block_kind", "llava_edges"]


# ----------------------------------------------------------------------------------------------
# cluster.json


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate cluster.json."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ClusterSpecError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ClusterSpecError(f"{path}: not valid JSON: {e}") from None
    return cluster_from_dict(d, source=str(path))


def cluster_from_dict(d: Any, source: str = "cluster.json") -> Cluster:
    """Validate a cluster.json document and build a `Cluster`."""
    c = Checker(source, ClusterSpecError)
    c.document(d, CLUSTER_SCHEMAS)
    name = c.string(d.get("name", Path(source).stem), "name")
    devs = c.has(d, "devices", "")
    if not isinstance(devs, list) or not devs:
        c.fail("devices", "must be a non-empty list", devs)
    devices = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(devs):
        dev = _device(c, raw, f"devices[{i}]", i)
        if dev.name in seen:
            c.fail(f"devices[{i}].name", f"duplicate of devices[{seen[dev.name]}].name", dev.name)
        seen[dev.name] = i
        devices.append(dev)
    links = Links.parse(c, c.obj(d.get("links", {}), "links"), seen)
    return Cluster(name=name, devices=tuple(devices), links=links, source=source)


def _table(c: Checker, t: Any, path: str) -> None:
    """A cost table: {"<count>": seconds, ...} with positive integer counts, non-negative seconds."""
    c.obj(t, path)
    if not t:
        c.fail(path, "must hold at least one count", t)
    for k, v in t.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
            c.fail(f"{path}.{k}", "keys must be positive integers (as strings)", k)
        c.num(v, f"{path}.{k}", positive=False)


def _device(c: Checker, d: Any, path: str, index: int) -> Device:
    c.obj(d, path)
    name = c.string(c.has(d, "name", path), f"{path}.name")
    mem = c.int_(c.has(d, "memory_bytes", path), f"{path}.memory_bytes")
    host = c.string(d.get("host", "127.0.0.1"), f"{path}.host")
    torch_device = check_torch_device(c, d.get("torch_device", "cpu"), f"{path}.torch_device")
    dtype = c.one_of(d.get("dtype", "float32"), DTYPE_BYTES, f"{path}.dtype")
    threads = c.int_(d.get("threads", 1), f"{path}.threads")
    compute = c.obj(c.has(d, "compute", path), f"{path}.compute")
    if not ({"measured", "roofline"} & compute.keys()):
        c.fail(f"{path}.compute", "needs 'measured' or 'roofline' (or both)", compute)
    if "roofline" in compute:
        r = c.obj(compute["roofline"], f"{path}.compute.roofline")
        for key in ("flops_per_s", "memory_bytes_per_s"):
            c.num(c.has(r, key, f"{path}.compute.roofline"), f"{path}.compute.roofline.{key}")
        if "overhead_s" in r:
            c.num(r["overhead_s"], f"{path}.compute.roofline.overhead_s", positive=False)
    if "measured" in compute:
        m = c.obj(compute["measured"], f"{path}.compute.measured")
        mp = f"{path}.compute.measured"
        if "model" in m:
            c.string(m["model"], f"{mp}.model")
        c.int_(c.has(m, "prefill_tokens", mp), f"{mp}.prefill_tokens")
        if "decode_context" in m:
            c.int_(m["decode_context"], f"{mp}.decode_context")
        if "images_per_request" in m:
            c.int_(m["images_per_request"], f"{mp}.images_per_request")
        blocks = c.obj(c.has(m, "blocks", mp), f"{mp}.blocks")
        if not blocks:
            c.fail(f"{mp}.blocks", "must name at least one block kind", blocks)
        for kind, t in blocks.items():
            bp = f"{mp}.blocks.{kind}"
            if kind not in BLOCK_KINDS:  # else ignored by the cost model (or left to the roofline)
                c.fail(bp, f"not a block kind (kinds: {', '.join(BLOCK_KINDS)})")
            c.obj(t, bp)
            c.num(c.has(t, "prefill_s", bp), f"{bp}.prefill_s", positive=False)
            c.num(c.has(t, "decode_s", bp), f"{bp}.decode_s", positive=False)
            for key in ("decode_s_by_rows", "prefill_s_by_tokens"):
                if key in t:
                    _table(c, t[key], f"{bp}.{key}")
    emulation = d.get("emulation")
    check_emulation(c, emulation, f"{path}.emulation")
    return Device(name=name, memory_bytes=mem, compute=json.loads(json.dumps(compute)), host=host,
                  torch_device=torch_device, dtype=dtype, threads=threads,
                  emulation=None if emulation is None else dict(emulation), index=index)
