"""`adaptlink plan`, `adaptlink simulate`, `adaptlink show`: make, predict and draw a plan.json.

    adaptlink plan --model preset:llava-1.5-7b --cluster experiments/clusters/hetero4.json --out plan.json
    adaptlink plan --model DIR --cluster c.json --baseline uniform --out uniform.json
    adaptlink plan --model DIR --cluster c.json --solver highs --out plan.json   (pip install highspy)
    adaptlink simulate plan.json [--in-flight K] [--json]
    adaptlink show plan.json --out plan.png
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from adaptlink.model.emulation import fmt_bytes
from adaptlink.graph_cli import parse_image_size, workload_prefill
from adaptlink.model.graph import build_graph
from partitioner.costs import CostModel
from partitioner.errors import PlanError
from partitioner.planner import METHODS, make_plan
from partitioner.show import draw_plan
from partitioner.simulate import simulate
from partitioner.solvers import check_solver
from partitioner.synthetic import PREFIX, synthetic_graph
from partitioner.types import load_plan, save_plan
from partitioner.validate import load_cluster


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="place the model's blocks on a cluster (ILP or a baseline) -> plan.json")
    p.add_argument("--model", required=True,
                   help="preset:NAME, a LLaVA checkpoint directory, or synthetic:NAME (no torch)")
    p.add_argument("--cluster", required=True, help="cluster.json (from `adaptlink profile` or by hand)")
    p.add_argument("--out", required=True, help="where to write plan.json")
    p.add_argument("--objective", default="throughput", choices=["throughput", "latency"])
    p.add_argument("--baseline", choices=[m for m in METHODS if m != "ilp"],
                   help="plan with a baseline instead of the ILP")
    p.add_argument("--resilience", default="none", choices=["none", "n-1"],
                   help="n-1: also minimise the worst throughput after any one device drops out")
    p.add_argument("--resilience-slack", type=float, default=0.1,
                   help="with n-1: the fraction of throughput the plan may give up for a better worst dropout")
    p.add_argument("--no-backups", action="store_true", help="preload no backups (no dropout is survived)")
    p.add_argument("--batch-rows", default="auto", metavar="B|auto|none",
                   help="rows (requests) per micro-batch to plan for: auto (default) tries the row counts "
                        "the cluster was profiled at and keeps the one of most tokens/s that memory holds; "
                        "none: one request per forward, --in-flight of them (as before micro-batches)")
    p.add_argument("--micro-batches", type=int, metavar="M",
                   help="micro-batches in flight to size KV memory for (default: devices + 1)")
    p.add_argument("--in-flight", type=int, default=4,
                   help="K: requests in the pipeline at once, with --batch-rows none (else B x M)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="S: prompt tokens, image tokens included (default: 640, or the image tokens + 64 "
                        "when they are more)")
    p.add_argument("--decode-tokens", type=int, default=64, help="T: generated tokens per request")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--image-size", type=parse_image_size, default=None, metavar="WxH",
                   help="a representative image (LLaVA-NeXT's tiles and image tokens depend on it; "
                        "default: the vision tower's own square)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the model graph is costed in (each device converts to its own)")
    p.add_argument("--coordinator", help="device where requests arrive (default: the cluster's first)")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit, seconds")
    p.add_argument("--solver", choices=["cbc", "highs"],
                   help="ILP solver: cbc (default, bundled with pulp) or highs (needs `pip install highspy`)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for presets (model.seed)")
    p.add_argument("--json", action="store_true", help="print the plan's summary as JSON")
    p.set_defaults(func=_cmd_plan)

    s = sub.add_parser("simulate", help="predict a plan's throughput and latency with K requests in flight")
    s.add_argument("plan", help="plan.json")
    s.add_argument("--in-flight", type=int, help="K (default: the plan's workload.in_flight)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_simulate)

    w = sub.add_parser("show", help="draw a plan: placement and pipeline timeline (PNG)")
    w.add_argument("plan", help="plan.json")
    w.add_argument("--out", required=True, help="PNG to write")
    w.add_argument("--requests", type=int, default=6, help="requests drawn on the timeline")
    w.set_defaults(func=_cmd_show)


def load_graph(source: str, *, prefill_tokens: int, decode_tokens: int, images: int, dtype: str,
               image_size: tuple[int, int] | None = None):
    """The block graph of a model source (synthetic:NAME needs no torch)."""
    for name, v in (("--prefill-tokens", 1 if prefill_tokens is None else prefill_tokens),
                    ("--decode-tokens", decode_tokens + 1),
                    ("--images", images + 1)):
        if v < 1:
            raise PlanError(f"{name}: must be {'positive' if name == '--prefill-tokens' else '>= 0'}")
    if source.startswith(PREFIX):
        return synthetic_graph(source, prefill_tokens=640 if prefill_tokens is None else prefill_tokens, decode_tokens=decode_tokens,
                               images_per_request=images, dtype=dtype)

    prefill_tokens = workload_prefill(source, prefill_tokens, images, image_size)
    return build_graph(source, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                       images_per_request=images, dtype=dtype, image_size=image_size)


def _console():
    c = Console()
    if not c.is_terminal:
        c.width = 160
    return c


def _span(blocks) -> str:
    """decoder.layer.3..decoder.layer.9 style ranges of a block list."""
    if not blocks:
        return "-"
    out, run = [], [blocks[0]]

    def close():
        out.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1].rsplit('.', 1)[-1]}")

    for b in blocks[1:]:
        prev = run[-1]
        same = (prev.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] and prev.rsplit(".", 1)[-1].isdigit()
                and b.rsplit(".", 1)[-1].isdigit() and int(b.rsplit(".", 1)[-1]) == int(prev.rsplit(".", 1)[-1]) + 1)
        if same:
            run.append(b)
        else:
            close()
            run = [b]
    close()
    return ", ".join(out)


def print_plan(plan, console=None) -> None:
    console = console or _console()
    pr = plan.predicted
    emu = " [emulated cluster]" if pr.get("emulated") else ""
    title = (f"{plan.method} plan ({plan.objective}) of {plan.model['source']}: "
             f"{pr.get('requests_per_s')} req/s, {pr.get('tokens_per_s')} tok/s, latency {pr.get('latency_s')} s "
             f"with {pr.get('in_flight')} in flight"
             + (f" (micro-batches of {pr['batch_rows']} rows, {pr['micro_batches']} in flight)"
                if pr.get("batch_rows") else "")
             + f"; bottleneck {pr.get('bottleneck')}{emu}")
    t = Table(title=title)
    for col in ("rank", "device", "blocks", "memory used / available", "busy s/req", "util", "backups held"):
        t.add_column(col, justify="left" if col in ("device", "blocks", "backups held") else "right")
    for s in plan.devices:
        p = s.predicted
        mark = " (coordinator)" if s.rank == plan.coordinator else ""
        held = "; ".join(f"rank {b.for_rank}: {_span(list(b.blocks))}" for b in s.backups) or "-"
        t.add_row(str(s.rank), s.name + mark, _span(list(s.blocks)),
                  f"{fmt_bytes(p.get('memory_bytes', 0))} / {fmt_bytes(p.get('capacity_bytes', s.memory_bytes))}",
                  f"{p.get('busy_s_per_request', 0):.4f}", f"{p.get('utilisation', 0):.0%}", held)
    console.print(t)
    if plan.solver:
        sv = plan.solver
        console.print(f"solver {sv.get('name')}: {sv.get('status')}, objective {sv.get('objective')}, "
                      f"bound {sv.get('bound')}, gap {sv.get('gap')}, {sv.get('seconds')} s")
    r = plan.resilience or {}
    if r.get("dropouts"):
        worst = r.get("worst_single_dropout_requests_per_s")
        console.print(f"resilience ({r.get('mode')}): worst single dropout -> {worst} req/s; "
                      + ", ".join(f"{d['name']}: " + (f"{d['requests_per_s']} req/s on {d['holder']}"
                                                     if d["survived"] and d.get("holder")
                                                     else ("idle" if d["survived"] else "not survived"))
                                  for d in r["dropouts"]))


def _batch_rows(text: str) -> int | str | None:
    """--batch-rows: auto, none, or a positive integer."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise PlanError(f"--batch-rows: must be auto, none or a positive integer, got {text!r}")
    return int(text)


def _cmd_plan(args) -> int:
    if args.baseline and args.solver:
        raise PlanError(f"--solver: --baseline {args.baseline} solves no ILP; drop one of them")
    solver = args.solver or "cbc"
    if not args.baseline:
        check_solver(solver)  # before anything is loaded or solved
    cluster = load_cluster(args.cluster)
    if args.in_flight < 1:
        raise PlanError(f"--in-flight: must be a positive integer, got {args.in_flight}")
    batch_rows = _batch_rows(args.batch_rows)
    if args.micro_batches is not None and args.micro_batches < 1:
        raise PlanError(f"--micro-batches: must be a positive integer, got {args.micro_batches}")
    graph = load_graph(args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                       images=args.images, dtype=args.dtype, image_size=args.image_size)
    plan = make_plan(graph, cluster, method=args.baseline or "ilp", objective=args.objective,
                     resilience=args.resilience, in_flight=args.in_flight, time_limit_s=args.time_limit,
                     backups=not args.no_backups, coordinator=args.coordinator, seed=args.seed,
                     resilience_slack=args.resilience_slack, solver=solver, batch_rows=batch_rows,
                     micro_batches=args.micro_batches)
    digest = save_plan(plan, args.out)
    if args.json:
        print(json.dumps({"out": args.out, "hash": digest, "method": plan.method, "solver": plan.solver,
                          "predicted": plan.predicted, "resilience": plan.resilience,
                          "devices": [{"rank": s.rank, "name": s.name, "blocks": list(s.blocks),
                                       "backups": [b.to_dict() for b in s.backups], "predicted": s.predicted}
                                      for s in plan.devices]}, indent=1))
        return 0
    console = _console()
    print_plan(plan, console)
    console.print(f"wrote {args.out} (sha256 {digest[:12]})")
    return 0


def _cmd_simulate(args) -> int:
    plan = load_plan(args.plan)
    cm = CostModel.from_plan(plan)
    ranks = plan.block_ranks()
    assign = [ranks[b] for b in cm.blocks]
    if args.in_flight is not None and args.in_flight < 1:
        raise PlanError(f"--in-flight: must be a positive integer, got {args.in_flight}")
    sim = simulate(cm, assign, in_flight=args.in_flight)
    d = sim.to_dict(cm.device_names)
    d.update(plan=args.plan, method=plan.method, emulated=plan.emulated,
             busy_s_per_request={n: float(f"{x:.6g}") for n, x in zip(cm.device_names, cm.evaluate(assign).busy_s)})
    if args.json:
        print(json.dumps(d, indent=1))
        return 0

    console = _console()
    console.print(f"{args.plan} ({plan.method}): {d['requests_per_s']} req/s, {d['tokens_per_s']} tok/s, "
                  f"latency {d['latency_s']} s, TTFT {d['ttft_s']} s with {d['in_flight']} in flight "
                  f"(bound {d['bound_requests_per_s']} req/s, bottleneck {d['bottleneck']})"
                  + (" [emulated]" if plan.emulated else ""))
    t = Table()
    for col in ("device", "busy s/req", "utilisation"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for n in cm.device_names:
        t.add_row(n, f"{d['busy_s_per_request'][n]:.4f}", f"{d['utilisation'][n]:.0%}")
    for n, u in d["link_utilisation"].items():
        t.add_row(f"link {n}", "", f"{u:.0%}")
    console.print(t)
    return 0


def _cmd_show(args) -> int:
    plan = load_plan(args.plan)
    draw_plan(plan, args.out, requests=args.requests)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
