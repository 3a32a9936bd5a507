"""Planner benchmark: the batch-aware planner's solve time on LLaVA-1.5-7B (preset graph)
over 8 and 16 heterogeneous devices, and predicted throughput on hetero4 against every
baseline.

    .venv/bin/python experiments/planner_bench.py [--seeds 2] [--time-limit 60] [--threads N]

Writes experiments/results/planner_bench.json. Clusters of 8/16 devices are
`partitioner.synthetic.synthetic_cluster(n, seed)` (datasheet rooflines of six device
classes, jittered, unequal links). The time measured is `partitioner.planner.search_batch`:
the cost model at every micro-batch size B of `batch_candidates` (1..32 rows, M = devices + 1
micro-batches in flight), each size's relaxed-LP bound, and the ILP at every size the bound
does not rule out (the simulation of the chosen plan is not in it). Predictions on hetero4
are the simulator's, every method at its own best B (`--batch-rows auto`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from partitioner.baselines import BASELINES
from partitioner.planner import make_plan, search_batch
from partitioner.synthetic import synthetic_cluster
from partitioner.validate import cluster_from_dict, load_cluster

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "planner_bench.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--model", default="preset:llava-1.5-7b")
    ap.add_argument("--threads", type=int, default=None,
                    help="the ILP solver's threads (default: every core; 1 on a shared machine)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the report (default {OUT.relative_to(ROOT.parent)})")
    args = ap.parse_args()

    from adaptlink.model.graph import build_graph

    t = time.perf_counter()
    graph = build_graph(args.model, dtype="float16")
    graph_s = time.perf_counter() - t
    print(f"graph of {args.model}: {graph.number_of_nodes()} blocks in {graph_s:.1f} s (torch meta model)")
    report = {"model": args.model, "graph_build_s": round(graph_s, 2), "machine": platform.processor() or platform.machine(),
              "threads": args.threads,
              "solve": [], "hetero4": {}}
    for n, goal in ((8, 1.0), (16, 10.0)):
        for seed in range(args.seeds):
            cl = cluster_from_dict(synthetic_cluster(n, seed))
            for res in ("none", "n-1"):
                t = time.perf_counter()
                cm, assign, _, info, search = search_batch(
                    graph, cl, list(cl.devices), micro_batches=None, time_limit_s=args.time_limit, method="ilp",
                    objective="throughput", resilience=res, backups=True, resilience_slack=0.1, solver="cbc",
                    threads=args.threads)
                wall = time.perf_counter() - t
                used = len(set(assign))
                row = {"devices": n, "seed": seed, "resilience": res, "status": info["status"],
                       "seconds": round(wall, 3), "goal_s": goal, "met": info["status"] == "optimal" and wall < goal,
                       "gap": info["gap"], "objective_s": info["objective"], "bound_s": info["bound"],
                       "batch_rows": cm.workload.rows, "micro_batches": cm.customers,
                       "tokens_per_s_bound": round(cm.workload.decode_tokens / cm.evaluate(assign).cycle_s(cm.customers), 1),
                       "devices_used": used, "search": search["tried"], "stages": info["phases"][0]["stages"]}
                if res == "n-1":  # the n-1 phase's objective: the least worst-dropout bottleneck
                    n1 = info["phases"][-1]
                    row.update(n1_status=n1["status"], n1_objective_s=n1.get("objective"), n1_bound_s=n1.get("bound"),
                               n1_stages=n1.get("stages"))
                report["solve"].append(row)
                print(f"{n} devices seed {seed} {res:4s}: {info['status']} in {wall:.2f} s (goal {goal} s), "
                      f"gap {info['gap']}, cycle {info['objective']:.6g} s"
                      + (f", worst dropout {row['n1_objective_s'] or math.nan:.6g} s" if res == "n-1" else "")
                      + f", B={cm.workload.rows} M={cm.customers}, {used} devices used, "
                      f"ILP at B = {[t_['batch_rows'] for t_ in search['tried'] if t_['result'] == 'placed']}")
    cl = load_cluster(ROOT / "clusters" / "hetero4.json")
    plans = {}
    for method in ("ilp", *BASELINES):
        plans[method] = make_plan(graph, cl, method=method, batch_rows="auto")
    plans["ilp n-1"] = make_plan(graph, cl, method="ilp", resilience="n-1", batch_rows="auto")
    uni = plans["uniform"].predicted["requests_per_s"]
    for name, p in plans.items():
        pr = p.predicted
        report["hetero4"][name] = {"requests_per_s": pr["requests_per_s"], "tokens_per_s": pr["tokens_per_s"],
                                   "latency_s": pr["latency_s"], "bound_requests_per_s": pr["bound_requests_per_s"],
                                   "batch_rows": pr.get("batch_rows"), "micro_batches": pr.get("micro_batches"),
                                   "speedup_over_uniform": round(pr["requests_per_s"] / uni, 3),
                                   "worst_single_dropout_requests_per_s": p.resilience.get("worst_single_dropout_requests_per_s"),
                                   "blocks_per_device": {s.name: len(s.blocks) for s in p.devices}}
        print(f"hetero4 {name:9s}: {pr['requests_per_s']} req/s, {pr['tokens_per_s']} tok/s, "
              f"{pr['requests_per_s'] / uni:.2f}x uniform, worst dropout "
              f"{p.resilience.get('worst_single_dropout_requests_per_s')} req/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
