"""Heterogeneous throughput: the ILP plan against every baseline, each run for real.

Profile a cluster, plan it with AdaptLink's ILP and with each baseline (uniform,
memory-proportional, compute-proportional, chain DP), run every plan on the same
prompts (one process per device, pipelined), and report measured requests/s and
tokens/s, measured against predicted, and the speedup over uniform. Every run's tokens
are checked against HF `generate` on the whole model.

This machine (2 cores, no accelerator) has no real heterogeneity to offer, so the
default set-up is EMULATED and labelled so: 4 CPU ranks of one thread, compute slowdowns
2/3/5/8x (deadline padding, docs/FAILOVER.md), 1 Gbit/s emulated links, on a small
random-weight LLaVA. The GPU set-up of issue 8 (a CUDA rank beside CPU ranks) needs a
lent accelerator; none was lent to the session that wrote this, so it is not here yet.

    python experiments/throughput.py                      # ~2-3 min on 2 cores
    python experiments/throughput.py --methods ilp,uniform --requests 6
    python experiments/throughput.py --methods ilp,uniform --batch-rows 8 --requests 80

Every plan is made and run at the same micro-batch size B and count M (`--batch-rows`,
`--micro-batches`; the run takes them from plan.json), so plans differ in placement only.

Writes experiments/results/throughput/{throughput.json,throughput.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adaptlink.runs import add_experiment_args, make_plan, profile_local, run_plan, small_llava
from adaptlink.model.reference import hf_reference
from adaptlink.model.samples import write_sample_requests

HERE = Path(__file__).resolve().parent
METHODS = ["ilp", "uniform", "memory", "compute", "chain-dp"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([i - 0.2 for i in x], [r["predicted_tokens_per_s"] or 0 for r in rows], 0.4, label="predicted",
           color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["tokens_per_s"] for r in rows], 0.4, label="measured", color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["tokens_per_s"], f"{r['speedup_vs_uniform']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--slowdowns", default="2,3,5,8", help="EMULATED compute slowdown per device")
    ap.add_argument("--link", default="1Gbit", help="EMULATED link bandwidth between every pair")
    add_experiment_args(ap, hidden=512, layers=8, intermediate=1536)
    ap.add_argument("--in-flight", type=int, default=8, help="K, with --batch-rows none")
    ap.add_argument("--batch-rows", default="8",
                    help="B: rows per micro-batch every plan is made and run at (auto: the ILP's own choice, "
                         "then the same B for every baseline); none: one request per forward")
    ap.add_argument("--micro-batches", type=int, help="M: micro-batches in flight (default devices + 1)")
    ap.add_argument("--prefill-tokens", type=int, default=48, help="S the planner costs (prompt + image tokens)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "throughput")
    args = ap.parse_args(argv)

    con = Console()
    methods = args.methods.split(",")
    slowdowns = [float(s) for s in args.slowdowns.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = small_llava(args.work, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)
    prompts = write_sample_requests(args.work / "throughput-requests", n=args.requests,
                                    max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    cluster = profile_local(ckpt, args.out / "cluster.json", slowdowns=slowdowns, link=args.link,
                            prefill_tokens=args.prefill_tokens, decode_tokens=args.max_new_tokens,
                            console=con, quiet=True)
    reference = hf_reference(ckpt, prompts)
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    rows = []
    batch_rows, micro = args.batch_rows, args.micro_batches
    for method in methods:
        plan = make_plan(ckpt, cluster, args.out / f"plan-{method}.json", method=method,
                         prefill_tokens=args.prefill_tokens, decode_tokens=args.max_new_tokens,
                         in_flight=args.in_flight, console=con, quiet=True, batch_rows=batch_rows,
                         micro_batches=micro)
        pd = json.loads(plan.read_text())
        if batch_rows == "auto":  # every other plan at the first one's B and M: the same batching
            batch_rows, micro = pd["workload"]["batch_rows"], pd["workload"]["micro_batches"]
        con.print(f"[cyan]$ adaptlink run --plan {plan} --prompts {prompts} ...[/]")
        r = run_plan(plan, prompts, args.out / "runs" / method)
        m = r.metrics
        rows.append({
            "method": method, "tokens_per_s": m["tokens_per_s"], "requests_per_s": m["requests_per_s"],
            "wall_s": m["wall_s"], "completed": m["completed"],
            "predicted_tokens_per_s": pd["predicted"].get("tokens_per_s"),
            "predicted_requests_per_s": pd["predicted"].get("requests_per_s"),
            "tokens_match_hf": [r.tokens.get(i) for i in ids] == reference,
            "shares": {d["name"]: len(d["blocks"]) for d in pd["devices"]},
            "batch_rows": pd["workload"].get("batch_rows"), "micro_batches": pd["workload"].get("micro_batches"),
            "in_flight": pd["workload"]["in_flight"],
            "predicted_busy_s_per_request": {d["name"]: d["predicted"]["busy_s_per_request"] for d in pd["devices"]},
            "batching": m.get("batching"),
            "busy_s": {r: v.get("busy_s") for r, v in (m.get("ranks") or {}).items()},
            "decoder_layers": {d["name"]: sum(b.startswith("decoder.") for b in d["blocks"]) for d in pd["devices"]},
        })
    base = next((x["tokens_per_s"] for x in rows if x["method"] == "uniform"), None)
    for x in rows:
        x["speedup_vs_uniform"] = x["tokens_per_s"] / base if base else None
        x["measured_over_predicted"] = (x["tokens_per_s"] / x["predicted_tokens_per_s"]
                                        if x["predicted_tokens_per_s"] else None)
    b0 = rows[0]
    setup = (f"EMULATED: 4 CPU ranks x 1 thread, slowdowns {args.slowdowns}, {args.link} links; "
             f"LLaVA h{args.hidden} x {args.layers} layers, {args.requests} requests x {args.max_new_tokens} tokens, "
             + (f"B={b0['batch_rows']} rows x M={b0['micro_batches']} micro-batches" if b0["batch_rows"]
                else f"K={args.in_flight}"))
    result = {"command": "python experiments/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setup": setup, "emulated": True, "machine": {"cpus": os.cpu_count()},
              "rows": rows, "elapsed_s": time.perf_counter() - t0}
    (args.out / "throughput.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "throughput.png", setup)

    t = Table(title=setup)
    for c in ("plan", "decoder layers per device", "tok/s measured", "tok/s predicted", "measured/predicted",
              "vs uniform", "tokens = HF"):
        t.add_column(c, justify="left" if c in ("plan", "decoder layers per device") else "right")
    for x in rows:
        t.add_row(x["method"], " ".join(f"{v}" for v in x["decoder_layers"].values()), f"{x['tokens_per_s']:.2f}",
                  f"{x['predicted_tokens_per_s'] or 0:.2f}", f"{x['measured_over_predicted'] or 0:.2f}",
                  f"{x['speedup_vs_uniform'] or 0:.2f}x", "yes" if x["tokens_match_hf"] else "NO")
    con.print(t)
    con.print(f"wrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'}")
    return 0 if all(x["tokens_match_hf"] and x["completed"] == args.requests for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
