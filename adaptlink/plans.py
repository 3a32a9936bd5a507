"""Hand-made plans: exact placements for tests, experiments and the demo's failover act,
in the plan.json format the planner writes (`adaptlink plan` chooses placements itself)."""

from __future__ import annotations

import json
from pathlib import Path

from adaptlink.model.config import ModelInfo, load_config
from adaptlink.model.graph import block_ids


def all_blocks(source: str) -> list[str]:
    return block_ids(ModelInfo.from_config(load_config(source)))


def chain_shares(source: str, decoder_split: list[int], *, vision_apart: bool = False) -> list[list[str]]:
    """Shares for rank 0 = coordinator (text.embed, merge, head, and the vision branch unless
    `vision_apart`, which gives it a rank of its own), then consecutive decoder layers
    `decoder_split[i]` to each next rank."""
    ids = all_blocks(source)
    vision = ids[: ids.index("text.embed")]
    layers = [b for b in ids if b.startswith("decoder.")]
    if sum(decoder_split) != len(layers):
        raise ValueError(f"decoder_split {decoder_split} must add up to the {len(layers)} decoder layers")
    shares = [["text.embed", "merge", "head"] + ([] if vision_apart else vision)]
    if vision_apart:
        shares.append(vision)
    at = 0
    for n in decoder_split:
        shares.append(layers[at: at + n])
        at += n
    return shares


def manual_plan(source: str, shares: list[list[str]], *, backups: dict[int, int] | None = None,
                slowdowns: list[float] | None = None, in_flight: int = 4, coordinator: int = 0,
                links: dict | None = None, memory_bytes: int = 8 * 2**30, seed: int = 0,
                threads: int = 1) -> dict:
    """A plan.json dict: device r runs shares[r]; `backups` {for_rank: holder} preloads shares."""
    placed = [b for s in shares for b in s]
    want = all_blocks(source)
    if sorted(placed) != sorted(want):
        raise ValueError(f"shares must cover every block once: {sorted(set(want) ^ set(placed))}")
    backups = backups or {}
    devices = []
    for r, share in enumerate(shares):
        slow = (slowdowns or [1.0] * len(shares))[r]
        devices.append({
            "rank": r, "name": f"dev{r}", "host": "127.0.0.1", "torch_device": "cpu", "dtype": "float32",
            "threads": threads, "memory_bytes": memory_bytes,
            "emulation": {"slowdown": slow, "memory_cap_bytes": None} if slow != 1.0 else None,
            "blocks": share,
            "backups": [{"for_rank": f, "blocks": shares[f]} for f, h in sorted(backups.items()) if h == r],
            "predicted": {},
        })
    return {
        "schema": "adaptlink.plan/1", "model": {"source": source, "dtype": "float32", "seed": seed},
        "workload": {"prefill_tokens": 64, "decode_tokens": 8, "images_per_request": 1, "in_flight": in_flight},
        "method": "manual", "objective": "throughput", "solver": None, "coordinator": coordinator,
        "devices": devices,
        "links": links or {"default": {"bandwidth_bytes_per_s": 1e9, "latency_s": 0.0}, "pairs": []},
        "predicted": {}, "resilience": {},
    }


def write_plan(path: str | Path, plan: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan, indent=1))
    return path
