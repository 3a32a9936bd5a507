"""Failure injection: kill a random non-coordinator device at a random moment, many times.

Each trial is a real run (`python -m adaptlink.launch`, one process per device) with
`--inject kill:rank=R,after_tokens=N`: a SIGKILL of that device's process. Reported per
trial: detection (kill -> the coordinator knew), recovery (kill -> the next token
delivered), requests lost, requests whose tokens differ from a run without failure.
Preloaded backups (AdaptLink) are compared with cold recovery (the backup holder loads the
failed share from the checkpoint only when the device dies): read from this machine's
disk (`--cold-from-disk` drops the checkpoint from the page cache first), from a warm
page cache, and from EMULATED storage of SD-card/eMMC speed (`--cold-read-mbps`), what
an edge board would load from.

    python experiments/failover.py                       # 20 + 3 x 5 trials, ~25 min on 2 cores
    python experiments/failover.py --trials 3 --cold-trials 1   # a quick look

Writes experiments/results/failover/{failover.json,timeline.png}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adaptlink.plans import chain_shares, manual_plan, write_plan
from adaptlink.runs import RunResult, add_experiment_args, run_plan, small_llava
from adaptlink.model.samples import write_sample_requests

HERE = Path(__file__).resolve().parent


def trial_row(kind: str, r: RunResult, ref: dict[str, list[int]], planned: dict) -> dict:
    f = r.failover
    got = r.tokens
    return {
        "kind": kind, **planned,
        "completed": r.metrics["completed"], "requests": r.metrics["requests"],
        "lost": r.metrics["requests"] - r.metrics["completed"],
        "duplicated": len(r.rows) - len({x["id"] for x in r.rows}),
        "differ": sum(got.get(i) != t for i, t in ref.items()),
        "detection_s": f and f.detection_s, "recovery_s": f and f.recovery_s,
        "cold_load_s": f and f.cold_load_s, "replayed": f and f.replayed,
        "replay_rows": f and f.replay_rows,
        "failed_rank": f and f.rank, "wall_s": r.metrics["wall_s"], "tokens_per_s": r.metrics["tokens_per_s"],
        "token_times_s": r.metrics["token_times_s"],
        "killed_at": (r.metrics["failovers"][0].get("killed_at") if r.metrics.get("failovers") else None),
    }


def summarize(rows: list[dict], kind: str) -> dict:
    sel = [x for x in rows if x["kind"] == kind]
    rec = sorted(x["recovery_s"] for x in sel if x["recovery_s"] is not None)
    det = sorted(x["detection_s"] for x in sel if x["detection_s"] is not None)
    return {
        "trials": len(sel), "lost": sum(x["lost"] for x in sel), "differ": sum(x["differ"] for x in sel),
        "duplicated": sum(x["duplicated"] for x in sel),
        "recovery_median_s": statistics.median(rec) if rec else None, "recovery_worst_s": rec[-1] if rec else None,
        "detection_median_s": statistics.median(det) if det else None, "detection_worst_s": det[-1] if det else None,
        "timed": len(rec),
        # the recompute prefills of the replayed requests: rows per micro-batch that carried them
        "replay_rows_max": max((max(x["replay_rows"]) for x in sel if x["replay_rows"]), default=None),
        "replay_batched_trials": sum(1 for x in sel if x["replay_rows"] and max(x["replay_rows"]) > 1),
    }


def plot_timeline(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(x["kind"] for x in rows))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 2.4 * len(kinds)), sharex=True, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        x = next(r for r in rows if r["kind"] == kind and r["killed_at"] is not None)
        times, bin_s = x["token_times_s"], 0.25
        n = int(max(times) / bin_s) + 1
        counts = [0] * n
        for t in times:
            counts[int(t / bin_s)] += 1
        ax.step([i * bin_s for i in range(n)], [c / bin_s for c in counts], where="post", color="tab:blue")
        ax.axvline(x["killed_at"], color="tab:red", ls="--", label=f"SIGKILL rank {x['failed_rank']}")
        if x["recovery_s"] is not None:
            ax.axvline(x["killed_at"] + x["recovery_s"], color="tab:green", ls=":",
                       label=f"next token +{x['recovery_s'] * 1e3:.0f} ms")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{kind} recovery", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the first request")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="trials with preloaded backups")
    ap.add_argument("--cold-trials", type=int, default=5, help="trials of each cold-recovery kind")
    add_experiment_args(ap, hidden=1024, layers=12, intermediate=2816)
    ap.add_argument("--in-flight", type=int, default=3)
    ap.add_argument("--storage-mbps", type=float, default=100.0,
                    help="also run cold recovery with EMULATED storage of this speed (SD/eMMC class); 0: skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "failover")
    args = ap.parse_args(argv)

    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = small_llava(args.work, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                       head_dim=128)
    prompts = write_sample_requests(args.work / "failover-requests", n=args.requests, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens)
    # rank 0: coordinator with the vision branch; ranks 1 and 2 split the decoder and back each other up
    half = args.layers // 2
    plan = write_plan(args.out / "plan.json", manual_plan(
        str(ckpt), chain_shares(str(ckpt), [half, args.layers - half]),
        backups={1: 2, 2: 1}, in_flight=args.in_flight))
    total_tokens = args.requests * args.max_new_tokens
    rng = random.Random(args.seed)
    runs = args.out / "runs"

    schedule = [("preloaded", {}) for _ in range(args.trials)]
    schedule += [("cold-disk", {"recovery": "cold", "cold_from_disk": True}) for _ in range(args.cold_trials)]
    schedule += [("cold-warm", {"recovery": "cold"}) for _ in range(args.cold_trials)]
    schedule += [(f"cold-{args.storage_mbps:g}MB/s", {"recovery": "cold", "cold_read_mbps": args.storage_mbps})
                 for _ in range(args.cold_trials if args.storage_mbps else 0)]
    rows: list[dict] = []
    t_start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reference run (no failure)", total=len(schedule) + 1)
        ref_run = run_plan(plan, prompts, runs / "reference")
        ref = ref_run.tokens
        assert len(ref) == args.requests, f"reference run finished {len(ref)} of {args.requests} requests"
        progress.advance(task)
        for i, (kind, kw) in enumerate(schedule):
            rank = rng.choice([1, 2])
            after = rng.randint(max(2, total_tokens // 10), int(total_tokens * 0.7))
            progress.update(task, description=f"trial {i + 1}/{len(schedule)}: {kind}, kill rank {rank} "
                                              f"after {after} tokens")
            r = run_plan(plan, prompts, runs / f"{i:02d}-{kind}", inject=[f"kill:rank={rank},after_tokens={after}"],
                         **kw)
            rows.append(trial_row(kind, r, ref, {"trial": i, "kill_rank": rank, "after_tokens": after}))
            progress.advance(task)

    kinds = list(dict.fromkeys(k for k, _ in schedule))
    summary = {k: summarize(rows, k) for k in kinds}
    for k in kinds[1:]:
        c, p = summary[k]["recovery_median_s"], summary["preloaded"]["recovery_median_s"]
        summary[k]["ratio_to_preloaded"] = (c / p) if c and p else None
    result = {
        "command": "python experiments/failover.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(), "model": {"checkpoint": str(ckpt), "hidden": args.hidden, "layers": args.layers,
                                         "intermediate": args.intermediate},
        "requests": args.requests, "max_new_tokens": args.max_new_tokens, "in_flight": args.in_flight,
        "reference_tokens_per_s": ref_run.metrics["tokens_per_s"],
        "summary": summary, "trials": [{k: v for k, v in x.items() if k != "token_times_s"} for x in rows],
        "elapsed_s": time.perf_counter() - t_start,
    }
    (args.out / "failover.json").write_text(json.dumps(result, indent=1))
    plot_timeline(rows, args.out / "timeline.png")

    t = Table(title=f"failover: {len(schedule)} trials, {args.requests} requests x {args.max_new_tokens} "
                    f"tokens, 3 devices (rank 0 coordinator; 1 and 2 back each other up)")
    for c in ("recovery", "trials", "detection median", "recovery median", "recovery worst", "lost",
              "outputs differing", "vs preloaded", "replay batched"):
        t.add_column(c, justify="left" if c == "recovery" else "right")
    for k, s in summary.items():
        if not s["trials"]:
            continue
        ms = lambda v: "-" if v is None else f"{v * 1e3:.0f} ms"  # noqa: E731
        ratio = s.get("ratio_to_preloaded")
        t.add_row(k, str(s["trials"]), ms(s["detection_median_s"]), ms(s["recovery_median_s"]),
                  ms(s["recovery_worst_s"]), str(s["lost"]), str(s["differ"]), "-" if ratio is None else f"{ratio:.1f}x",
                  f"{s['replay_batched_trials']}/{s['trials']} (<= {s['replay_rows_max']} rows)")
    console.print(t)
    console.print(f"wrote {args.out / 'failover.json'} and {args.out / 'timeline.png'}")
    bad = sum(s["lost"] + s["differ"] + s["duplicated"] for s in summary.values())
    return 1 if bad else 0


def _machine() -> dict:
    import os
    import platform

    import psutil
    import torch

    return {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "torch": torch.__version__,
            "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(main())
