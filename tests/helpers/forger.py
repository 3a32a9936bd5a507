"""A device process (`python forger.py RANK adaptlink.launch-args...`) whose rank RANK, a
genuine member of the run with its secret, also sends forged messages through its own
transport mid-run: kinds only the coordinator may send, acts for blocks it does not run,
headers with missing or mistyped fields. Every other rank runs plain adaptlink.launch.

Test-only (tests/test_wire_security.py): the hook wraps engine._serve_worker here, in this
process; nothing in the runtime knows of it.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

import runtime.engine as engine

AFTER_MESSAGES = 12  # acts this rank has sent the coordinator before it forges (mid-run)


def forged(plan, vocab: int) -> list[tuple[int, dict, dict]]:
    """(dst, header, tensors) of every forged message; the counts are what the test expects."""
    routes = plan.block_ranks()
    stolen = {b: (2 if r == 1 else r) for b, r in routes.items()}  # rank 1's blocks "moved" here
    logits = torch.full((1, vocab), -1e4)
    logits[0, 7] = 1e4
    act = {"kind": "act", "epoch": 0, "pos": 0, "q": 1, "image": False, "rv": 0}
    to1 = ([{"kind": "stop"}, {"kind": "route", "rv": 1, "routes": stolen}, {"kind": "load", "blocks": ["head"]},
            {"kind": "act", "req": 0}]
           + [{"kind": "free", "req": r} for r in range(5)]
           + [{**act, "req": 0, "step": s, "block": "merge"} for s in range(3)])
    to0 = ([{**act, "req": r, "step": s, "block": "head"} for r in range(5) for s in range(10)]
           + [{"kind": "route", "rv": 1, "routes": stolen}, {"kind": "stop"}, {"kind": "free", "req": "x"},
              {"kind": "error", "req": 0, "epoch": 0, "error": "forged", "rank": 1}])
    hidden = {"hidden": torch.zeros(1, 1, 8)}
    return ([(1, h, hidden if h.get("block") else {}) for h in to1]
            + [(0, h, {"logits": logits, "token": torch.tensor([7])} if h.get("block") else {}) for h in to0])


def main() -> int:
    me = int(sys.argv[1])
    argv = sys.argv[2:]
    real = engine._serve_worker

    def hooked(plan, rank, executor, transport, stats, opts, *rest):
        def forge():
            while transport.stats()["sent"].get(plan.coordinator, {}).get("messages", 0) < AFTER_MESSAGES:
                time.sleep(0.005)
            msgs = forged(plan, executor.blocks.config.text_config.vocab_size)
            for dst, h, t in msgs:
                transport.send(dst, h, t, block=False)
            print(json.dumps({"forged": len(msgs)}), flush=True)

        if rank == me:
            threading.Thread(target=forge, daemon=True).start()
        return real(plan, rank, executor, transport, stats, opts, *rest)

    engine._serve_worker = hooked
    from adaptlink.launch import main as launch_main

    return launch_main(argv)


if __name__ == "__main__":
    sys.exit(main())
