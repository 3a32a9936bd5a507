"""The field checks of cluster.json and plan.json: every error names the file and the field.

Plain checks on parsed JSON, building none of the partitioner's types, so that both
`partitioner.types` (`Plan.from_dict`, `Links.from_dict`) and `partitioner.validate`
(`cluster_from_dict`) can use them: types -> checks, validate -> types and checks.

    check_plan_dict(d, "plan.json") -> None, or PlanError
    check_plan_blocks(d, model_blocks, "plan.json") -> None, or PlanError (the model's blocks all placed)
    placement_problems(...)         -> what is wrong with a block placement (for plans and tests)
    check_links(c, links, seen)     -> the `links` object's fields, checked (cluster.json and plan.json)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx

from partitioner.errors import PlanError
from partitioner.vocab import COORDINATOR_KINDS, DTYPE_BYTES, PLAN_SCHEMA, SINK_KINDS, block_kind, llava_edges

EMULATION_KEYS = ("slowdown", "memory_cap_bytes")
"""The knobs of a device's `emulation` object; any other key is refused (a typo would
silently leave the device unemulated)."""

TORCH_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "mtia")
"""Device types a plan may name (torch accepts each as `type` or `type:index`)."""
TORCH_DEVICE = re.compile(rf"({'|'.join(TORCH_DEVICE_TYPES)})(:\d+)?")


class Checker:
    """Field checks that raise `error` with `source: path: message, got value`."""

    def __init__(self, source: str, error: type[Exception]):
        self.source, self.error = source, error

    def fail(self, path: str, msg: str, value: Any = ...) -> None:
        got = "" if value is ... else f", got {show(value)}"
        raise self.error(f"{self.source}: {path}: {msg}{got}")

    def obj(self, d: Any, path: str) -> dict:
        if not isinstance(d, dict):
            self.fail(path, "must be an object", d)
        return d

    def document(self, d: Any, schema: str | tuple[str, ...]) -> dict:
        """The top level of a document: an object whose `schema` is `schema` (or one of them)."""
        self.obj(d, "(top level)")
        got = self.has(d, "schema", "")
        ok = (schema,) if isinstance(schema, str) else tuple(schema)
        if got not in ok:
            self.fail("schema", f"must be {' or '.join(repr(x) for x in ok)}", got)
        return d

    def has(self, d: dict, key: str, path: str) -> Any:
        if key not in d:
            self.fail(f"{path}.{key}" if path else key, "missing")
        return d[key]

    def string(self, v: Any, path: str, nonempty: bool = True) -> str:
        if not isinstance(v, str) or (nonempty and not v):
            self.fail(path, "must be a non-empty string" if nonempty else "must be a string", v)
        return v

    def int_(self, v: Any, path: str, minimum: int = 1) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(path, f"must be {what}", v)
        return v

    def num(self, v: Any, path: str, positive: bool = True) -> float:
        ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
              and (v > 0 if positive else v >= 0))
        if not ok:
            self.fail(path, "must be a positive number" if positive else "must be a number >= 0", v)
        return float(v)

    def one_of(self, v: Any, options: Iterable[str], path: str) -> str:
        options = list(options)
        if v not in options:
            self.fail(path, f"must be one of {', '.join(options)}", v)
        return v


def show(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_links(c: Checker, links: dict, seen: Mapping[str, int]) -> tuple[dict, dict[tuple[str, str], dict]]:
    """The `links` object of cluster.json (or plan.json) among the devices named in `seen`:
    the default link's fields and each direction's, as `partitioner.types.Link` keywords
    (`Links.parse` builds them). A pair given one way applies both ways unless the other
    is given."""
    default = check_link(c, c.has(links, "default", "links"), "links.default")
    pairs: dict[tuple[str, str], dict] = {}
    given: set[tuple[str, str]] = set()
    raw_pairs = links.get("pairs", [])
    if not isinstance(raw_pairs, list):
        c.fail("links.pairs", "must be a list", raw_pairs)
    for i, p in enumerate(raw_pairs):
        path = f"links.pairs[{i}]"
        c.obj(p, path)
        ends = []
        for key in ("src", "dst"):
            v = c.string(c.has(p, key, path), f"{path}.{key}")
            if v not in seen:
                c.fail(f"{path}.{key}", f"no device of that name (devices: {', '.join(seen)})", v)
            ends.append(v)
        src, dst = ends
        if src == dst:
            c.fail(f"{path}.dst", "must differ from src", dst)
        if (src, dst) in given:
            c.fail(path, f"a second entry for {src} -> {dst}")
        given.add((src, dst))
        link = check_link(c, p, path)
        pairs[(src, dst)] = link
        if (dst, src) not in given:  # one way given: the same both ways, unless the other is given
            pairs[(dst, src)] = link
    return default, pairs


def check_link(c: Checker, d: Any, path: str) -> dict:
    """One link entry: `{"bandwidth_bytes_per_s", "latency_s", "emulated", "emulated_as"}`."""
    c.obj(d, path)
    bw = c.num(c.has(d, "bandwidth_bytes_per_s", path), f"{path}.bandwidth_bytes_per_s")
    lat = c.num(c.has(d, "latency_s", path), f"{path}.latency_s", positive=False)
    emulated = d.get("emulated", False)
    if not isinstance(emulated, bool):
        c.fail(f"{path}.emulated", "must be true or false", emulated)
    emulated_as = d.get("emulated_as")
    if emulated_as is not None:  # what the transport enforces on an emulated link (LinkEmulation)
        ep = f"{path}.emulated_as"
        c.obj(emulated_as, ep)
        if not emulated_as:
            c.fail(ep, "must give bandwidth_bytes_per_s and/or latency_s", emulated_as)
        for key in emulated_as:
            if key not in ("bandwidth_bytes_per_s", "latency_s"):
                c.fail(f"{ep}.{key}", "unknown field (bandwidth_bytes_per_s, latency_s)")
        if "bandwidth_bytes_per_s" in emulated_as:
            c.num(emulated_as["bandwidth_bytes_per_s"], f"{ep}.bandwidth_bytes_per_s")
        if "latency_s" in emulated_as:
            c.num(emulated_as["latency_s"], f"{ep}.latency_s", positive=False)
        emulated_as = dict(emulated_as)
    return {"bandwidth_bytes_per_s": bw, "latency_s": lat, "emulated": emulated, "emulated_as": emulated_as}


def check_emulation(c: Checker, emulation: Any, path: str) -> None:
    """A device's `emulation` object (cluster.json and plan.json alike): known knobs only,
    slowdown >= 1, a positive memory cap."""
    if emulation is None:
        return
    c.obj(emulation, path)
    for key in emulation:
        if key not in EMULATION_KEYS:
            c.fail(f"{path}.{key}", f"unknown field (emulation knobs: {', '.join(EMULATION_KEYS)})")
    if emulation.get("slowdown") is not None:
        slow = c.num(emulation["slowdown"], f"{path}.slowdown")
        if slow < 1:  # the runtime pads compute to slowdown x its own time: it cannot speed up
            c.fail(f"{path}.slowdown", "must be >= 1 (an emulated device can only be slower)",
                   emulation["slowdown"])
    if emulation.get("memory_cap_bytes") is not None:
        c.int_(emulation["memory_cap_bytes"], f"{path}.memory_cap_bytes")


def check_torch_device(c: Checker, v: Any, path: str) -> str:
    """A torch device string's form (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu:0`...): the
    partitioner cannot import torch, so whether it exists on its host is checked where
    the rank runs (adaptlink.preflight)."""
    c.string(v, path)
    if not TORCH_DEVICE.fullmatch(v):
        c.fail(path, f"must be a torch device: {', '.join(TORCH_DEVICE_TYPES)}, optionally with :INDEX "
                     "(e.g. cuda:0)", v)
    return v


# ----------------------------------------------------------------------------------------------
# placements


def placement_problems(rank_of: Mapping[str, int], edges: Iterable[tuple[str, str]],
                       kind_of: Mapping[str, str], coordinator: int) -> list[str]:
    """What breaks the placement rules, as sentences (empty if none):

    - text.embed and head are on the coordinator;
    - the device graph of cut edges is acyclic, edges into head excepted (the ring closes
      at the coordinator), which also keeps each device's layers of a chain contiguous.
    """
    problems = []
    for b, r in rank_of.items():
        if kind_of.get(b) in COORDINATOR_KINDS and r != coordinator:
            problems.append(f"{b} is on rank {r}, not on the coordinator (rank {coordinator})")
    dg = nx.DiGraph()
    for u, v in edges:
        if kind_of.get(v) in SINK_KINDS:
            continue
        ru, rv = rank_of[u], rank_of[v]
        if ru != rv:
            dg.add_edge(ru, rv, via=(u, v))
    if not nx.is_directed_acyclic_graph(dg):
        cycle = nx.find_cycle(dg)
        hops = ", ".join(f"{dg.edges[a, b]['via'][0]} -> {dg.edges[a, b]['via'][1]} (rank {a} -> {b})"
                         for a, b in cycle)
        problems.append(f"a request would go back and forth between devices: {hops}")
    return problems


# ----------------------------------------------------------------------------------------------
# plan.json


def check_plan_dict(d: Any, source: str = "plan.json") -> None:
    """Raise PlanError naming `source` and the field if `d` is not a valid plan."""
    c = Checker(source, PlanError)
    c.document(d, PLAN_SCHEMA)
    model = c.obj(c.has(d, "model", ""), "model")
    c.string(c.has(model, "source", "model"), "model.source")
    c.string(c.has(model, "dtype", "model"), "model.dtype")
    w = c.obj(c.has(d, "workload", ""), "workload")
    c.int_(c.has(w, "prefill_tokens", "workload"), "workload.prefill_tokens")
    c.int_(c.has(w, "decode_tokens", "workload"), "workload.decode_tokens", minimum=0)
    c.int_(w.get("images_per_request", 1), "workload.images_per_request", minimum=0)
    c.int_(w.get("in_flight", 1), "workload.in_flight")
    for key in ("batch_rows", "micro_batches"):
        if w.get(key) is not None:
            c.int_(w[key], f"workload.{key}")
    c.string(c.has(d, "method", ""), "method")
    c.one_of(c.has(d, "objective", ""), ("throughput", "latency"), "objective")
    if d.get("solver") is not None:
        c.obj(d["solver"], "solver")
    devs = c.has(d, "devices", "")
    if not isinstance(devs, list) or not devs:
        c.fail("devices", "must be a non-empty list", devs)
    coord = c.int_(c.has(d, "coordinator", ""), "coordinator", minimum=0)
    if coord >= len(devs):
        c.fail("coordinator", f"must be a rank 0..{len(devs) - 1}", coord)
    links = c.obj(c.has(d, "links", ""), "links")
    rank_of: dict[str, int] = {}
    names: set[str] = set()
    for i, s in enumerate(devs):
        p = f"devices[{i}]"
        c.obj(s, p)
        if c.int_(c.has(s, "rank", p), f"{p}.rank", minimum=0) != i:
            c.fail(f"{p}.rank", f"must be {i} (ranks are 0..N-1 in list order)", s["rank"])
        name = c.string(c.has(s, "name", p), f"{p}.name")
        if name in names:
            c.fail(f"{p}.name", "duplicate device name", name)
        names.add(name)
        check_torch_device(c, c.has(s, "torch_device", p), f"{p}.torch_device")
        c.one_of(c.has(s, "dtype", p), DTYPE_BYTES, f"{p}.dtype")
        c.int_(c.has(s, "threads", p), f"{p}.threads")
        c.int_(c.has(s, "memory_bytes", p), f"{p}.memory_bytes")
        check_emulation(c, s.get("emulation"), f"{p}.emulation")
        blocks = c.has(s, "blocks", p)
        if not isinstance(blocks, list):
            c.fail(f"{p}.blocks", "must be a list of block ids", blocks)
        for j, b in enumerate(blocks):
            c.string(b, f"{p}.blocks[{j}]")
            if b in rank_of:
                c.fail(f"{p}.blocks[{j}]", f"already placed on rank {rank_of[b]}", b)
            rank_of[b] = i
    check_links(c, links, {s["name"]: i for i, s in enumerate(devs)})
    backed: dict[int, int] = {}
    for i, s in enumerate(devs):
        backups = s.get("backups", [])
        if not isinstance(backups, list):
            c.fail(f"devices[{i}].backups", "must be a list", backups)
        for j, bk in enumerate(backups):
            p = f"devices[{i}].backups[{j}]"
            c.obj(bk, p)
            fr = c.int_(c.has(bk, "for_rank", p), f"{p}.for_rank", minimum=0)
            if fr >= len(devs) or fr == i:
                c.fail(f"{p}.for_rank", f"must be another rank in 0..{len(devs) - 1}", fr)
            if fr == coord:
                c.fail(f"{p}.for_rank", "the coordinator's share is never backed up", fr)
            if fr in backed:
                c.fail(f"{p}.for_rank", f"rank {fr} is already backed up by rank {backed[fr]}", fr)
            backed[fr] = i
            if not isinstance(bk.get("blocks"), list) or sorted(bk["blocks"]) != sorted(devs[fr]["blocks"]):
                c.fail(f"{p}.blocks", f"must be exactly rank {fr}'s blocks {devs[fr]['blocks']}",
                       bk.get("blocks"))
    cm = d.get("cost_model")
    if cm is not None:
        ids, edges, kinds = _cost_model(c, c.obj(cm, "cost_model"), [s["name"] for s in devs])
        missing = [b for b in ids if b not in rank_of]
        if missing:
            c.fail("devices[*].blocks", f"blocks placed on no device: {', '.join(missing)}")
        extra = [b for b in rank_of if b not in set(ids)]
        if extra:
            c.fail("devices[*].blocks", f"blocks not in cost_model.blocks: {', '.join(extra)}")
    else:
        edges = llava_edges(rank_of)
        kinds = {b: block_kind(b, "unknown") for b in rank_of}
    problems = placement_problems(rank_of, edges, kinds, coord)
    if problems:
        c.fail("devices[*].blocks", "; ".join(problems))


def check_plan_blocks(d: Mapping, model_blocks: Iterable[str], source: str = "plan.json") -> None:
    """Every block of the model on exactly one device, and no block the model lacks.

    plan.json names the model (`model.source`), not its blocks, unless it carries a
    cost_model; the caller that can read the model (adaptlink.preflight) passes its block
    ids here. `d` is a plan.json document already through `check_plan_dict`."""
    c = Checker(source, PlanError)
    model_blocks = list(model_blocks)
    rank_of = {b: i for i, s in enumerate(d["devices"]) for b in s["blocks"]}
    for i, s in enumerate(d["devices"]):
        for j, b in enumerate(s["blocks"]):
            if b not in set(model_blocks):
                c.fail(f"devices[{i}].blocks[{j}]", f"not a block of {d['model']['source']}", b)
    missing = [b for b in model_blocks if b not in rank_of]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{'...' if len(missing) > 4 else ''})" \
            if len(missing) > 1 else ""
        c.fail("blocks", f"{missing[0]!r} is placed on no device{more}")


def _cost_model(c: Checker, cm: dict, names: list[str]):
    """Check plan.json's `cost_model` (what `CostModel.from_plan` reads); returns the block
    ids, the edges and the kind of each block."""
    if cm.get("devices") != names:
        c.fail("cost_model.devices", f"must be the devices' names in rank order {names}", cm.get("devices"))
    n = len(names)
    blocks = c.has(cm, "blocks", "cost_model")
    if not isinstance(blocks, list):
        c.fail("cost_model.blocks", "must be a list", blocks)
    ids: list[str] = []
    kinds: dict[str, str] = {}
    for i, b in enumerate(blocks):
        p = f"cost_model.blocks[{i}]"
        c.obj(b, p)
        bid = c.string(c.has(b, "id", p), f"{p}.id")
        if bid in kinds:
            c.fail(f"{p}.id", "duplicate block id", bid)
        ids.append(bid)
        kinds[bid] = c.string(c.has(b, "kind", p), f"{p}.kind")
        for key in ("prefill_s", "decode_s", "weight_bytes", "kv_bytes"):
            v = c.has(b, key, p)
            if not isinstance(v, list) or len(v) != n:
                c.fail(f"{p}.{key}", f"must be a list of {n} numbers (one per rank)", v)
            for j, x in enumerate(v):
                c.num(x, f"{p}.{key}[{j}]", positive=False)
        c.num(c.has(b, "act_bytes", p), f"{p}.act_bytes", positive=False)
    raw = c.has(cm, "edges", "cost_model")
    if not isinstance(raw, list):
        c.fail("cost_model.edges", "must be a list", raw)
    edges = []
    for i, e in enumerate(raw):
        p = f"cost_model.edges[{i}]"
        c.obj(e, p)
        ends = []
        for key in ("src", "dst"):
            v = c.has(e, key, p)
            if v not in kinds:
                c.fail(f"{p}.{key}", "no block of that id in cost_model.blocks", v)
            ends.append(v)
        for key in ("bytes_prefill", "bytes_decode"):
            c.num(c.has(e, key, p), f"{p}.{key}", positive=False)
        edges.append(tuple(ends))
    g = nx.DiGraph(edges)
    if not nx.is_directed_acyclic_graph(g):
        c.fail("cost_model.edges", "must form a DAG (block graph)")
    return ids, edges, kinds
