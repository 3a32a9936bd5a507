"""Pre-flight: refuse a bad plan or checkpoint before any device process starts.

Every check here would otherwise fail inside the ranks after seconds of loading, with a
traceback per rank, or look like a device dropout (a rank that exits early is one, to the
coordinator). `check_run` is what `adaptlink run` (and each rank under torchrun) calls
before it starts anything; `check_rank` is what every rank calls first, before it joins:

    plan_hash = check_run(plan, "plan.json", local_ranks=range(len(plan.devices)))
    check_rank(plan, rank, "plan.json", expected_hash=os.environ.get(PLAN_HASH_ENV))

What is checked, each refusal one line naming the file and the field (AdaptLinkError):
- the plan's blocks are the model's, each on exactly one device (partitioner.validate);
- each device can hold its blocks (own + backups), under its emulated memory cap too;
- the checkpoint: processor and tokenizer load, the index parses, every shard a rank
  needs exists and its header parses against the file's size, every tensor a rank needs
  is there with the model's shape (names mapped as the loader maps them, blocks.py);
- on this host, for the ranks that run here: `torch_device` parses and exists, `threads`
  is at most the host's cores;
- the launcher's plan hash (PLAN_HASH_ENV) equals the hash of the plan the rank read, so
  a plan.json swapped between the pre-flight and the ranks' start is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoProcessor

from adaptlink.model.blocks import (INDEX_FILE, param_names, checkpoint_tensors, read_safetensors_header,
                              tensor_sources)
from adaptlink.model.config import PRESET_PREFIX, ModelInfo, load_config
from partitioner.errors import AdaptLinkError, ModelSourceError
from adaptlink.model.graph import block_ids, build_graph, meta_model, module_names
from partitioner.errors import PlanError
from partitioner.types import Device
from partitioner.validate import check_plan_blocks
from runtime.engine import loaded_blocks

log = logging.getLogger(__name__)

PLAN_HASH_ENV = "ADAPTLINK_PLAN_HASH"
"""The launcher's hash of the plan it checked; every rank it starts compares its own."""


class PlanSwappedError(AdaptLinkError):
    """A rank read a plan other than the one the launcher checked."""


def check_run(plan, plan_path: str, *, local_ranks: Iterable[int] = ()) -> str:
    """Everything that can be checked before a rank starts; returns the plan's hash.

    `local_ranks`: the ranks that run on this host (every rank for `adaptlink run`, this
    process's own under torchrun): their device and thread count are checked here."""
    source = plan.model["source"]
    config = load_config(source)
    check_plan_blocks(plan.to_dict(), block_ids(ModelInfo.from_config(config, source=source)), plan_path)
    check_memory(plan, plan_path, config)
    check_checkpoint(plan, plan_path, config)
    for r in local_ranks:
        check_host(plan, r, plan_path)
    return plan.plan_hash()


def check_rank(plan, rank: int, plan_path: str, expected_hash: str | None) -> None:
    """A rank, before it joins: the plan is the one the launcher checked, and its device
    and threads exist here (under torchrun the host is only known here)."""
    if expected_hash is not None and plan.plan_hash() != expected_hash:
        raise PlanSwappedError(
            f"{plan_path}: changed since the launcher checked it (plan hash {plan.plan_hash()[:12]}, "
            f"checked {expected_hash[:12]}): rank {rank} refuses to start; run again")
    check_host(plan, rank, plan_path)


# ---- the plan on this host --------------------------------------------------------------------

def check_host(plan, rank: int, plan_path: str) -> None:
    """`devices[rank].torch_device` exists on this host, `threads` <= its cores."""
    stage = plan.device(rank)
    p = f"{plan_path}: devices[{rank}]"
    cores = os.cpu_count() or 1
    if stage.threads > cores:
        raise AdaptLinkError(f"{p}.threads: {stage.threads} is more than this host's {cores} cores")
    problem = device_problem(stage.torch_device)
    if problem:
        raise AdaptLinkError(f"{p}.torch_device: {stage.torch_device!r} {problem}")


def device_problem(name: str) -> str | None:
    """Why torch cannot use device `name` here (None if it can)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        return f"is not a torch device ({str(e).splitlines()[0]})"
    kind, index = dev.type, dev.index
    if kind == "cpu":
        return None
    if kind == "cuda":
        count = torch.cuda.device_count()
    elif kind == "mps":
        count = int(torch.backends.mps.is_available())
    elif hasattr(torch, kind) and hasattr(getattr(torch, kind), "device_count"):
        count = getattr(torch, kind).device_count()
    else:
        return f"cannot be checked on this host (no torch.{kind})"
    if (index or 0) >= count:
        return f"does not exist on this host ({count} {kind.upper()} device{'' if count == 1 else 's'})"
    return None


# ---- memory -------------------------------------------------------------------------------------

def check_memory(plan, plan_path: str, config=None) -> None:
    """Refuse a plan whose devices cannot hold their blocks (own + backups)."""
    graphs = {}
    over = []
    for s in plan.devices:
        if s.dtype not in graphs:
            graphs[s.dtype] = build_graph(plan.model["source"], dtype=s.dtype, config=config)
        G = graphs[s.dtype]
        need = sum(G.nodes[b]["param_bytes"] for b in loaded_blocks(plan, s.rank))
        cap = Device.usable_bytes(s.memory_bytes, s.emulation)
        if need > cap:
            over.append(f"devices[{s.rank}] ({s.name}) needs {need:,} bytes of weights "
                        f"(own + backups), has {cap:,} ({need - cap:,} over)")
    if over:
        raise PlanError(f"{plan_path}: a device cannot hold its blocks: " + "; ".join(over))


# ---- the checkpoint -----------------------------------------------------------------------------

def check_checkpoint(plan, plan_path: str, config) -> None:
    """The checkpoint serves this plan: processor, index, the shards and tensors each rank needs.

    Reads the index and the shards' headers only (kilobytes), never a tensor."""
    source = plan.model["source"]
    if source.startswith(PRESET_PREFIX):
        return
    path = Path(source)
    check_processor(path)
    model = meta_model(config)
    info = ModelInfo.from_config(config, source=source)
    shapes = {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    indexed = (path / INDEX_FILE).is_file()
    stored = checkpoint_tensors(path)
    headers: dict[Path, dict] = {}
    for s in plan.devices:
        for b in loaded_blocks(plan, s.rank):
            where = f"needed by devices[{s.rank}] for {b}"
            sources, missing = tensor_sources(model, path, module_names(b, info), config, stored)
            if missing:
                home = path / INDEX_FILE if indexed else path
                field = "weight_map: " if indexed else ""
                raise ModelSourceError(f"{home}: {field}no tensor {missing[0]!r} ({where}"
                                       + (f"; {len(missing) - 1} more missing)" if len(missing) > 1 else ")"))
            for name in param_names(model, module_names(b, info)):
                disk, f = sources[name]
                if f not in headers:
                    if not f.is_file():
                        raise ModelSourceError(f"{path / INDEX_FILE}: weight_map: shard {f.name!r} does not exist "
                                               f"({where})")
                    headers[f] = read_safetensors_header(f)
                entry = headers[f].get(disk)
                if entry is None:
                    raise ModelSourceError(f"{f}: no tensor {disk!r} ({INDEX_FILE} places it in this shard; {where})")
                if list(entry.get("shape", [])) != shapes[name]:
                    raise ModelSourceError(f"{f}: tensor {disk!r} has shape {entry.get('shape')}, "
                                           f"the model's is {shapes[name]} ({where})")
    log.info("pre-flight: %s serves the plan (%d weight files checked)", path, len(headers))


def check_processor(path: Path) -> None:
    """The processor (tokenizer + image processor) loads, as the coordinator will load it."""
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError... for a broken one
        raise ModelSourceError(f"{path}: the processor (tokenizer and image processor) does not load: "
                               f"{_one_line(e)}") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelSourceError(f"{path}: the processor lacks a tokenizer or an image processor "
                               f"(got {type(processor).__name__})")


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
