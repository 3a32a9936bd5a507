"""Planner scaling: ILP solve time and optimality gap against the number of devices (2..32)
and the model size (LLaVA-1.5-7B and -13B shapes), under a time limit.

    .venv/bin/python experiments/planner_scaling.py [--time-limit 20] [--devices 2,4,8,12,16,24,32]

Graphs are `partitioner.synthetic` LLaVA shapes (no torch needed; block costs close to the
preset graphs'), clusters `synthetic_cluster(n, seed=0)`. Writes
experiments/results/planner_scaling.json and planner_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from partitioner.costs import CostModel
from partitioner.errors import AdaptLinkError
from partitioner.ilp import solve_ilp
from partitioner.synthetic import synthetic_cluster, synthetic_graph
from partitioner.validate import cluster_from_dict

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--devices", default="2,4,8,12,16,24,32")
    ap.add_argument("--models", default="llava-1.5-7b,llava-1.5-13b")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        graph = synthetic_graph(f"synthetic:{model}", dtype="float16")
        for n in map(int, args.devices.split(",")):
            cl = cluster_from_dict(synthetic_cluster(n, 0))
            cm = CostModel.build(graph, cl, cl.devices, in_flight=4)
            t = time.perf_counter()
            try:
                sol = solve_ilp(cm, time_limit_s=args.time_limit)
                row = {"status": sol.status, "gap": sol.gap, "objective_s": sol.objective, "bound_s": sol.bound,
                       "devices_used": len(set(sol.assign))}
            except (AdaptLinkError, Exception) as e:  # record and go on
                row = {"status": "error", "error": str(e)}
            row.update(model=model, blocks=cm.n_blocks, devices=n, seconds=round(time.perf_counter() - t, 3),
                       time_limit_s=args.time_limit)
            rows.append(row)
            print(f"{model} {n:2d} devices: {row['status']} in {row['seconds']:.2f} s, gap {row.get('gap')}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner_scaling.json").write_text(json.dumps({"rows": rows, "time_limit_s": args.time_limit}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for model in args.models.split(","):
        rs = [r for r in rows if r["model"] == model]
        a1.plot([r["devices"] for r in rs], [r["seconds"] for r in rs], "o-", label=model)
        for r in rs:
            if r["status"] != "optimal":
                a1.annotate(r["status"], (r["devices"], r["seconds"]), fontsize=7)
        a2.plot([r["devices"] for r in rs], [100 * (r.get("gap") or 0) for r in rs], "o-", label=model)
    a1.axhline(args.time_limit, ls=":", c="grey", label="time limit")
    a1.set(xlabel="devices", ylabel="solve seconds", yscale="log", title="ILP solve time (CBC)")
    a2.set(xlabel="devices", ylabel="optimality gap at the end, %", title="gap (0 = proven optimal)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "planner_scaling.png", dpi=110)
    print(f"wrote {RESULTS / 'planner_scaling.json'} and planner_scaling.png")


if __name__ == "__main__":
    main()
