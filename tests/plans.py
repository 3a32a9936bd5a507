"""Hand-made plans for runtime tests: exact placements the planner would not necessarily choose."""

from __future__ import annotations

import json
from pathlib import Path

from adaptlink.config import ModelInfo, load_config
from adaptlink.graph import block_ids


def all_blocks(source: str) -> list[str]:
    return block_ids(ModelInfo.from_config(load_config(source)))


def manual_plan(source: str, shares: list[list[str]], *, backups: dict[int, int] | None = None,
                slowdowns: list[float] | None = None, in_flight: int = 4, coordinator: int = 0,
                links: dict | None = None, memory_bytes: int = 8 * 2**30, seed: int = 0) -> dict:
    """A plan.json dict: device r runs shares[r]; backups {holder: for_rank} preload shares."""
    placed = [b for s in shares for b in s]
    want = all_blocks(source)
    assert sorted(placed) == sorted(want), f"shares must cover every block once: {set(want) ^ set(placed)}"
    devices = []
    for r, share in enumerate(shares):
        slow = (slowdowns or [1.0] * len(shares))[r]
        devices.append({
            "rank": r, "name": f"dev{r}", "host": "127.0.0.1", "torch_device": "cpu", "dtype": "float32",
            "threads": 1, "memory_bytes": memory_bytes,
            "emulation": {"slowdown": slow, "memory_cap_bytes": None} if slow != 1.0 else None,
            "blocks": share,
            "backups": [{"for_rank": f, "blocks": shares[f]} for h, f in (backups or {}).items() if h == r],
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


def write_plan(path: Path, plan: dict) -> Path:
    path.write_text(json.dumps(plan, indent=1))
    return path
