"""From a block graph and a cluster to a `Plan`: place, back up, predict.

    plan = make_plan(graph, cluster, method="ilp", objective="throughput", resilience="n-1")
    save_plan(plan, "plan.json")

`method` is `ilp` or one of `partitioner.baselines.BASELINES`; every plan gets backups
(the ILP chooses its own, a baseline gets `choose_backups`), predictions from the
simulator with the workload's K requests in flight, and the per-block cost model, so
that `simulate` and `show` need nothing but plan.json.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import networkx as nx
import pulp

from partitioner.baselines import BASELINES, baseline_assign, check_fits, choose_backups
from partitioner.costs import CostModel
from partitioner.errors import InfeasiblePlanError, PlanError
from partitioner.ilp import find_runs, solve_ilp
from partitioner.simulate import simulate
from partitioner.solvers import check_solver
from partitioner.types import Backup, Cluster, Plan, Stage
from partitioner.vocab import PROFILE_ROWS

log = logging.getLogger(__name__)

METHODS = ("ilp", *BASELINES)


def device_order(cluster: Cluster, coordinator: str | None = None) -> list:
    """Devices in rank order: the coordinator first (default: the cluster's first device)."""
    devs = list(cluster.devices)
    if coordinator is None:
        return devs
    names = [d.name for d in devs]
    if coordinator not in names:
        raise PlanError(f"--coordinator: no device {coordinator!r} in {cluster.source} "
                        f"(devices: {', '.join(names)})")
    i = names.index(coordinator)
    return [devs[i]] + devs[:i] + devs[i + 1:]


def batch_candidates(cluster: Cluster) -> list[int]:
    """Micro-batch sizes B the planner tries: the row counts the cluster's devices were
    profiled at (`decode_s_by_rows`), else `PROFILE_ROWS`."""
    rows = {int(k) for d in cluster.devices
            for t in (d.compute.get("measured") or {}).get("blocks", {}).values()
            for k in (t.get("decode_s_by_rows") or {})}
    return sorted(rows) or list(PROFILE_ROWS)


def relaxed_cycle(cm: CostModel) -> float:
    """A lower bound on the ILP's cycle (seconds per request) for `cm`, from a small MIP: how
    many layers of each run of identical layers (`ilp.find_runs`) and which other blocks each
    device holds, within memory (backups, order and links left out), against the busiest
    device's load and one request's compute / M (the closed-pipeline bound). Used to skip a
    micro-batch size that cannot beat the best plan found; math.inf: nothing fits."""
    N = cm.n_devices
    runs = find_runs(cm)
    in_run = {b for run in runs for b in run}
    # times in PlacementModel's unit (Z ~ 1): CBC's tolerances are absolute, and a model's
    # microseconds would be within them
    scale = float(cm.compute_s.min(axis=1).sum() / N) or 1.0
    ts = cm.compute_s / scale
    prob = pulp.LpProblem("relaxed", pulp.LpMinimize)
    Z = pulp.LpVariable("Z", lowBound=0)
    prob += Z
    load = [[] for _ in range(N)]
    mem = [[] for _ in range(N)]
    for r, run in enumerate(runs):
        n = [pulp.LpVariable(f"n_{r}_{d}", 0, len(run), cat="Integer") for d in range(N)]
        prob += pulp.lpSum(n) == len(run)
        for d in range(N):
            load[d].append(n[d] * ts[run[0], d])
            mem[d].append(n[d] * (cm.mem_bytes[run[0], d] / cm.capacity[d]))
    for b in range(cm.n_blocks):
        if b in in_run:
            continue
        if b in cm.pinned:
            x = [1.0 if d == cm.coordinator else 0.0 for d in range(N)]
        else:
            x = [pulp.LpVariable(f"x_{b}_{d}", cat="Binary") for d in range(N)]
            prob += pulp.lpSum(x) == 1
        for d in range(N):
            load[d].append(x[d] * ts[b, d])
            mem[d].append(x[d] * (cm.mem_bytes[b, d] / cm.capacity[d]))
    for d in range(N):
        prob += pulp.lpSum(load[d]) <= Z
        prob += pulp.lpSum(mem[d]) <= 1
    prob += pulp.lpSum(t for d in range(N) for t in load[d]) <= cm.customers * Z
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=10))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return math.inf
    # the MIP's own bound would be tighter; its value at the time limit is not a bound, 0.0 is
    return float(Z.value() or 0.0) * scale if status == "Optimal" else 0.0


def make_plan(graph: nx.DiGraph, cluster: Cluster, *, method: str = "ilp", objective: str = "throughput",
              resilience: str = "none", in_flight: int = 4, time_limit_s: float = 60.0,
              backups: bool = True, coordinator: str | None = None, seed: int = 0,
              resilience_slack: float = 0.1, solver: str = "cbc", batch_rows: int | str | None = None,
              micro_batches: int | None = None) -> Plan:
    """Place `graph`'s blocks on `cluster` and predict how the plan runs. `solver` (cbc or
    highs) is the ILP's; the plan's solver.name records which one ran.

    `batch_rows`: None plans one request per forward with `in_flight` requests (plans
    before micro-batches); B plans micro-batches of B rows, `micro_batches` M of them in
    flight (default: devices + 1), so B * M requests; "auto" places at every B of
    `batch_candidates` (`search_batch`) and keeps the one of the least cycle that every
    device's memory holds (weights, backups, KV for B * M rows). The plan's workload
    records B and M."""
    if batch_rows is not None and batch_rows != "auto" and (not isinstance(batch_rows, int) or batch_rows < 1):
        raise PlanError(f"--batch-rows: must be a positive integer or auto, got {batch_rows!r}")
    if micro_batches is not None and micro_batches < 1:
        raise PlanError(f"--micro-batches: must be a positive integer, got {micro_batches!r}")
    if method not in METHODS:
        raise PlanError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    if resilience not in ("none", "n-1"):
        raise PlanError(f"--resilience: must be none or n-1, got {resilience!r}")
    if resilience == "n-1" and method != "ilp":
        # a baseline places for throughput alone: a plan saying "mode n-1" would claim an
        # optimisation that never ran (every plan still reports each dropout's throughput)
        raise PlanError(f"--resilience n-1: the {method} baseline does not optimise for dropouts; "
                        "use the ILP (no --baseline) for n-1, or drop --resilience (every plan still "
                        "reports its throughput after each single dropout)")
    if method == "ilp":
        check_solver(solver)
    if objective not in ("throughput", "latency"):
        raise PlanError(f"--objective: must be throughput or latency, got {objective!r}")
    devices = device_order(cluster, coordinator)
    t0 = time.perf_counter()
    place = dict(method=method, objective=objective, resilience=resilience, backups=backups,
                 resilience_slack=resilience_slack, solver=solver)
    search = None
    if batch_rows == "auto":
        cm, assign, bk, solver_info, search = search_batch(graph, cluster, devices, micro_batches=micro_batches,
                                                           time_limit_s=time_limit_s, **place)
    else:
        cm = CostModel.build(graph, cluster, devices, in_flight=in_flight, batch_rows=batch_rows,
                             micro_batches=micro_batches)
        # the relaxation's bound is a valid cut for the ILP's cycle (as in search_batch)
        cut = relaxed_cycle(cm) if method == "ilp" and objective == "throughput" else 0.0
        assign, bk, solver_info, _ = _place(cm, time_limit_s=time_limit_s, **place,
                                            lower_bound=cut if 0 < cut < math.inf else None)
    plan = plan_from_assignment(cm, assign, bk, devices=devices, cluster=cluster,
                                model={"source": str(graph.graph.get("model", "?")),
                                       "dtype": graph.graph.get("dtype", "float32"), "seed": seed},
                                method=method, objective=objective, solver=solver_info, resilience=resilience)
    if search is not None:
        plan.predicted["batch_search"] = search
    log.info("%s plan in %.2f s: %s", method, time.perf_counter() - t0,
             "; ".join(f"{s.name}: {len(s.blocks)} blocks" for s in plan.devices))
    return plan


def place_blocks(cm: CostModel, *, method: str, objective: str, resilience: str, backups: bool,
                 resilience_slack: float, solver: str, time_limit_s: float, threads: int | None = None):
    """(assign, backups, solver info or None) of `method` on `cm`; `threads`: the solver's
    (default: every core)."""
    return _place(cm, method=method, objective=objective, resilience=resilience, backups=backups,
                  resilience_slack=resilience_slack, solver=solver, time_limit_s=time_limit_s, threads=threads)[:3]


def _place(cm: CostModel, *, method: str, objective: str, resilience: str, backups: bool,
           resilience_slack: float, solver: str, time_limit_s: float, threads: int | None = None,
           lower_bound: float | None = None, throughput=None):
    """`place_blocks`, and the ILP's `Solution` (None for a baseline); `lower_bound` and
    `throughput` go to `solve_ilp`."""
    solver_info = sol = None
    if method == "ilp":
        sol = solve_ilp(cm, objective=objective, backups=backups, resilience=resilience,
                        resilience_slack=resilience_slack, time_limit_s=time_limit_s, solver=solver,
                        threads=threads, lower_bound=lower_bound, throughput=throughput)
        assign, bk = sol.assign, sol.backups
        solver_info = sol.solver_dict()
        solver_info["objective_unit"] = ("seconds per request (cycle)" if objective == "throughput"
                                         else "seconds per request alone")
        if resilience == "n-1":
            # objective/bound/gap are the throughput phase's: the best cycle of any plan. The
            # n-1 phase then chose this placement within keep_throughput_within of it, for
            # the least worst dropout (phases[1].objective): say what its own cycle is
            solver_info["objective_unit"] = ("seconds per request (cycle) of the throughput optimum; this plan's "
                                             "own is cycle_s, its worst single-dropout bottleneck phases[1].objective")
            solver_info["cycle_s"] = cm.evaluate(assign).cycle_s(cm.customers)
    else:
        assign = baseline_assign(cm, method)
        check_fits(cm, assign, method)
        bk = choose_backups(cm, assign) if backups else {}
    return assign, bk, solver_info, sol


def search_batch(graph, cluster, devices, *, micro_batches, time_limit_s, **place):
    """The micro-batch size B of `batch_candidates` whose placement (`place_blocks`) has the
    least cycle (seconds per request, `CostModel.cycle_s` with M micro-batches in flight),
    among those that fit in memory. Sizes are tried in order of their `relaxed_cycle` lower
    bound, and one whose bound cannot beat the best cycle so far is skipped (for the ILP; a
    baseline is costed at every size); the bound is also a cut in that size's ILP (it bounds
    the ILP's cycle from below). With `resilience="n-1"` sizes are compared on their
    throughput-optimal placements and the n-1 phase runs at the chosen size only, from that
    size's throughput phase (not solved again). For the latency objective, B = 1: one
    request alone is fastest when it shares no forward. Returns (cost model, assign, backups, solver info,
    the search's record)."""
    t0 = time.perf_counter()
    final = dict(place)
    if place["method"] == "ilp" and place["resilience"] == "n-1":
        # sizes are compared on their throughput optimum; the n-1 phase runs once, at the size chosen
        place = dict(place, resilience="none")
    cands = [1] if place["objective"] == "latency" else batch_candidates(cluster)
    order = []
    for B in cands:
        cm = CostModel.build(graph, cluster, devices, batch_rows=B, micro_batches=micro_batches)
        lb = relaxed_cycle(cm) if place["method"] == "ilp" else 0.0
        order.append((lb, -B, B, cm))
    tried, best, first_error = [], None, None
    for lb, _, B, cm in sorted(order, key=lambda o: o[:3]):
        if not math.isfinite(lb):
            tried.append({"batch_rows": B, "result": "does not fit (relaxed)"})
            continue
        if best is not None and lb >= best[0] * (1 - 1e-9):
            tried.append({"batch_rows": B, "result": "skipped: bound", "bound_cycle_s": _r(lb)})
            continue
        left = max(1.0, time_limit_s - (time.perf_counter() - t0))
        # the relaxation's bound is a valid cut for the ILP (throughput: a bound on its cycle)
        cut = lb if place["method"] == "ilp" and place["objective"] == "throughput" and lb > 0 else None
        try:
            assign, bk, info, sol = _place(cm, time_limit_s=left, lower_bound=cut, **place)
        except InfeasiblePlanError as e:
            first_error = first_error or e
            tried.append({"batch_rows": B, "result": "does not fit"})
            continue
        cycle = cm.evaluate(assign).cycle_s(cm.customers)
        tried.append({"batch_rows": B, "result": "placed", "cycle_s": _r(cycle),
                      "tokens_per_s_bound": _r(cm.workload.decode_tokens / cycle),
                      "bound_cycle_s": _r(lb) if lb else None})
        if best is None or cycle < best[0]:
            best = (cycle, cm, assign, bk, info, sol)
    if best is None:
        if first_error is None:  # every size failed its relaxation: the smallest one says why
            cm = min(order, key=lambda o: o[2])[3]
            place_blocks(cm, time_limit_s=time_limit_s, **place)
        raise first_error or PlanError("no micro-batch size gave a plan")
    _, cm, assign, bk, info, sol = best
    if final != place:
        # n-1 at the size chosen, from its throughput phase (solved above: not again)
        left = max(1.0, time_limit_s - (time.perf_counter() - t0))
        assign, bk, info, _ = _place(cm, time_limit_s=left, throughput=sol, **final)
    return cm, assign, bk, info, {"tried": tried, "chosen": cm.workload.rows,
                                  "seconds": round(time.perf_counter() - t0, 4)}


def plan_assignment(cm: CostModel, plan: Plan) -> list[int]:
    """The rank of each of `cm`'s blocks in `plan`."""
    ranks = plan.block_ranks()
    return [ranks[b] for b in cm.blocks]


def _span(blocks: Sequence[str]) -> str:
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}"


def plan_from_assignment(cm: CostModel, assign: Sequence[int], backups: dict[int, int], *, devices,
                         cluster: Cluster, model: dict, method: str, objective: str,
                         solver: dict | None = None, resilience: str = "none") -> Plan:
    """A `Plan` of a placement: stages, backups, memory and predictions (see module docstring)."""
    problems = cm.structure_problems(assign)
    assert not problems, problems
    N = cm.n_devices
    ev = cm.evaluate(assign)
    sim = simulate(cm, assign)
    mem = cm.memory(assign, backups)
    names = cm.device_names
    stages = []
    for d, dev in enumerate(devices):
        blocks = tuple(cm.blocks[b] for b in range(cm.n_blocks) if assign[b] == d)
        held = tuple(Backup(k, tuple(cm.blocks[b] for b in range(cm.n_blocks) if assign[b] == k))
                     for k, h in sorted(backups.items()) if h == d)
        predicted = {"busy_s_per_request": float(ev.busy_s[d]),
                     "decode_s_per_micro_batch": _r(float(sum(cm.decode_s[b, d] for b in range(cm.n_blocks)
                                                              if assign[b] == d))),
                     "memory_bytes": int(math.ceil(mem["total"][d])),
                     "memory": {k: int(math.ceil(mem[k][d])) for k in ("weights", "kv", "activations", "backups")},
                     "capacity_bytes": int(cm.capacity[d]), "utilisation": round(float(sim.utilisation[d]), 4)}
        stages.append(Stage(rank=d, name=dev.name, host=dev.host, torch_device=dev.torch_device,
                            dtype=dev.dtype, threads=dev.threads, memory_bytes=dev.memory_bytes,
                            emulation=dict(dev.emulation) if dev.emulation else None, blocks=blocks,
                            backups=held, predicted=predicted))
    predicted = {"requests_per_s": _r(sim.requests_per_s), "tokens_per_s": _r(sim.tokens_per_s),
                 "latency_s": _r(sim.latency_s), "ttft_s": _r(sim.ttft_s), "in_flight": sim.in_flight,
                 "bottleneck": ev.bottleneck, "bottleneck_s_per_request": _r(ev.bottleneck_s),
                 "bound_requests_per_s": _r(ev.requests_per_s),
                 "link_s_per_request": {f"{names[a]}->{names[b]}": _r(s) for (a, b), s in sorted(ev.link_s.items())},
                 "how": "discrete-event simulation of the cost model (partitioner.simulate)",
                 "emulated": cluster.emulated}
    if cm.workload.batch_rows is not None:
        predicted["batch_rows"] = cm.workload.rows
        predicted["micro_batches"] = cm.customers
    if cm.notes:
        predicted["notes"] = list(cm.notes)
    res = {"mode": resilience, "coordinator": {"rank": cm.coordinator, "name": names[cm.coordinator],
                                               "survived": False}}
    dropouts = []
    for k in range(N):
        if k == cm.coordinator:
            continue
        holds = any(a == k for a in assign)
        if holds and k not in backups:
            dropouts.append({"rank": k, "name": names[k], "survived": False})
            continue
        after = cm.after_dropout(assign, k, backups[k]) if holds else list(assign)
        s2 = simulate(cm, after, requests=None) if holds else sim
        dropouts.append({"rank": k, "name": names[k], "survived": True,
                         "holder": names[backups[k]] if holds else None,
                         "requests_per_s": _r(s2.requests_per_s),
                         "bound_requests_per_s": _r(cm.evaluate(after).requests_per_s)})
    res["dropouts"] = dropouts
    ok = [d["requests_per_s"] for d in dropouts if d["survived"]]
    res["worst_single_dropout_requests_per_s"] = min(ok) if ok and len(ok) == len(dropouts) else (0.0 if dropouts else None)
    return Plan(model=model, workload=cm.workload, method=method, objective=objective, solver=solver,
                coordinator=cm.coordinator, devices=tuple(stages), links=cluster.links_dict(),
                predicted=predicted, resilience=res, cost_model=cm.to_dict(),
                extra={"cluster": {"name": cluster.name, "source": cluster.source}})


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
