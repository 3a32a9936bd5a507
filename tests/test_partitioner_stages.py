"""The staged solve's shortcuts keep the optimum: its relaxations bound the whole ILP from
below, a placement proven optimal by meeting a bound has the whole ILP's objective, the
planner's relaxed-LP cut and its reuse of the throughput phase for n-1 change no objective,
and the micro-batch search pruned by bounds finds the least cycle of all sizes."""

from __future__ import annotations

import math
import random

import pytest

from partitioner.costs import CostModel
from partitioner.errors import InfeasiblePlanError
from partitioner.ilp import TOPOLOGIES, PlacementModel, solve_ilp
from partitioner.planner import batch_candidates, place_blocks, relaxed_cycle, search_batch
from partitioner.synthetic import random_instance, synthetic_cluster, synthetic_graph
from partitioner.validate import cluster_from_dict


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def feasible_instances(seed: int, n: int, **kw):
    """`n` random instances (as in test_partitioner) that fit in memory, with their whole ILP
    solved in one run (no stages): (cost model, its optimum, scaled)."""
    rng = random.Random(seed)
    found = 0
    while found < n:
        G, cd = random_instance(rng, **kw)
        cl = cluster_from_dict(cd)
        cm = CostModel.build(G, cl, cl.devices, in_flight=rng.randint(1, 4))
        whole = PlacementModel(cm).solve(30, threads=1)
        if whole["status"] == "infeasible":
            continue
        assert whole["status"] == "optimal", whole
        found += 1
        yield cm, whole["objective"]


@pytest.mark.parametrize("kw", [dict(), dict(identical_layers=True, devices=(3, 3)),
                                dict(bandwidth_scale=0.005, devices=(3, 3))])
def test_relaxations_bound_the_whole_ilp_and_the_staged_solve_meets_it(kw):
    """Each topology short of "full" is a relaxation (its optimum <= the whole ILP's), and the
    staged solve, which stops where a placement meets such a bound, has the whole ILP's
    optimum, on instances with runs, and with links slow enough to bind."""
    for cm, whole in feasible_instances(31, 5, **kw):
        for topology in TOPOLOGIES[1:]:
            r = PlacementModel(cm, topology=topology).solve(30, threads=1)
            assert r["status"] == "optimal" and r["objective"] <= whole * (1 + 1e-7), (topology, r, whole)
        staged = PlacementModel(cm).solve_staged(30, threads=1)
        assert staged["status"] == "optimal" and close(staged["objective"], whole), (staged, whole)
        assert not cm.structure_problems(staged["assign"])


def test_the_relaxed_cycle_cut_and_the_reused_throughput_phase_change_no_objective():
    """solve_ilp with planner.relaxed_cycle's bound as a cut = without it; n-1 started from the
    throughput phase's answer = n-1 solving that phase itself (both phases' objectives)."""
    checked = 0
    for cm, _ in feasible_instances(43, 6, devices=(3, 3)):
        lb = relaxed_cycle(cm)
        plain = solve_ilp(cm, time_limit_s=30, threads=1)
        cut = solve_ilp(cm, time_limit_s=30, threads=1, lower_bound=lb)
        assert lb <= plain.objective * (1 + 1e-7)
        assert plain.status == cut.status == "optimal" and close(plain.objective, cut.objective), (plain, cut)
        n1 = solve_ilp(cm, resilience="n-1", resilience_slack=0.1, time_limit_s=30, threads=1)
        reused = solve_ilp(cm, resilience="n-1", resilience_slack=0.1, time_limit_s=30, threads=1, throughput=cut)
        assert reused.phases[0].get("reused") and len(reused.phases) == 2
        assert n1.status == reused.status == "optimal"
        assert close(n1.objective, reused.objective)
        assert close(n1.phases[1]["objective"], reused.phases[1]["objective"]), (n1.phases, reused.phases)
        checked += 1
    assert checked == 6


def test_the_pruned_batch_search_finds_the_least_cycle_of_every_size():
    """search_batch (sizes in order of their relaxed bound, a size skipped whose bound cannot
    beat the best cycle found, the bound a cut in the ILP, n-1 from the chosen size's
    throughput phase) = the ILP at every size B, the least cycle kept."""
    graph = synthetic_graph("synthetic:tiny", prefill_tokens=64, decode_tokens=8, dtype="float32")
    skipped = 0
    for seed in (0, 1):
        cl = cluster_from_dict(synthetic_cluster(3, seed))
        devices = list(cl.devices)
        place = dict(method="ilp", objective="throughput", backups=True, resilience_slack=0.1, solver="cbc",
                     threads=1)
        every = math.inf
        for B in batch_candidates(cl):
            cm = CostModel.build(graph, cl, devices, batch_rows=B)
            try:
                assign, _, info = place_blocks(cm, time_limit_s=30, resilience="none", **place)
            except InfeasiblePlanError:
                continue
            assert info["status"] == "optimal"
            every = min(every, cm.evaluate(assign).cycle_s(cm.customers))
        assert math.isfinite(every)
        for resilience in ("none", "n-1"):
            cm, assign, _, info, search = search_batch(graph, cl, devices, micro_batches=None, time_limit_s=30,
                                                       resilience=resilience, **place)
            assert info["status"] == "optimal", info
            assert close(info["objective"], every), (seed, resilience, info["objective"], every, search)
            if resilience == "none":
                assert close(cm.evaluate(assign).cycle_s(cm.customers), every)
            skipped += sum(t["result"] == "skipped: bound" for t in search["tried"])
    assert skipped > 0  # the search did prune
