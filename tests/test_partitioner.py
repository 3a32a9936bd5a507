"""The partitioner against independent oracles: brute-force enumeration of every placement
and backup choice on small random instances, the plan format's own validation, and
queueing identities for the simulator."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import re
import subprocess
import sys
import time

import numpy as np
import pulp
import pytest

from adaptlink.cli import main as cli_main
from partitioner.baselines import BASELINES, baseline_assign, choose_backups
from partitioner.costs import CostModel
from partitioner.errors import ClusterSpecError, InfeasiblePlanError, PlanError
from partitioner.ilp import PlacementModel, find_runs, identical_pairs, solve_ilp
from partitioner.planner import make_plan
from partitioner.simulate import simulate
from partitioner.solvers import check_solver
from partitioner.synthetic import random_instance, synthetic_cluster, synthetic_graph
from partitioner.types import Plan, load_plan
from partitioner.validate import cluster_from_dict, load_cluster

CLUSTERS = "experiments/clusters"


# ---------------------------------------------------------------------------------------------
# the oracle: every placement, every choice of backup holders


def brute_force(cm: CostModel, objective: str = "throughput", resilience: bool = False,
                cycle_max: float | None = None) -> float:
    """The least objective over all valid placements with a backup for every non-coordinator
    device (math.inf if none fits). Valid: text.embed and head on the coordinator, the
    device graph acyclic (validate.placement_problems), everything within memory."""
    B, N, K = cm.n_blocks, cm.n_devices, cm.workload.in_flight
    free = [b for b in range(B) if b not in cm.pinned]
    others = [k for k in range(N) if k != cm.coordinator]
    best = math.inf
    for combo in itertools.product(range(N), repeat=len(free)):
        assign = [cm.coordinator] * B
        for b, d in zip(free, combo):
            assign[b] = d
        if cm.structure_problems(assign):
            continue
        ev = cm.evaluate(assign)
        cycle = max(ev.bottleneck_s, ev.latency_s / K)
        if cycle_max is not None and cycle > cycle_max * (1 + 1e-7) + 1e-12:
            continue
        if not resilience:
            value = cycle if objective == "throughput" else ev.latency_s
            if value >= best:
                continue
        for holders in itertools.product(*[[h for h in range(N) if h != k] for k in others]):
            bk = dict(zip(others, holders))
            if np.any(cm.memory(assign, bk)["total"] > cm.capacity):
                continue
            if resilience:
                value = max(cm.dropout_bottlenecks(assign, bk).values())
            best = min(best, value)
    return best


def instance(rng, devices=(2, 3), **kw):
    G, cd = random_instance(rng, devices=devices, **kw)
    cl = cluster_from_dict(cd)
    return CostModel.build(G, cl, cl.devices, in_flight=rng.randint(1, 4))


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


CHUNKS, PER_CHUNK = 10, 20  # 200 instances


def check_against_brute_force(rng, n, label, **kw) -> dict:
    """ILP = brute force on `n` instances drawn from `rng`; returns how many were infeasible
    and how many optima had a link as their bottleneck."""
    infeasible = link_bound = 0
    for i in range(n):
        cm = instance(rng, **kw)
        if kw.get("identical_layers"):  # the premise: the ILP places these layers as runs
            assert find_runs(cm), f"instance {label}/{i}: no run of identical layers"
        if kw.get("identical_devices"):  # and breaks the twins' symmetry
            assert identical_pairs(cm), f"instance {label}/{i}: no identical devices"
        objective = "latency" if i % 4 == 3 else "throughput"
        want = brute_force(cm, objective)
        try:
            sol = solve_ilp(cm, objective=objective, time_limit_s=30)
        except InfeasiblePlanError as e:
            assert want == math.inf, f"instance {label}/{i}: ILP says infeasible ({e}), brute force found {want}"
            assert "bytes" in str(e)
            infeasible += 1
            continue
        assert want < math.inf, f"instance {label}/{i}: brute force finds nothing, ILP found {sol.assign}"
        assert sol.status == "optimal" and sol.gap == 0.0
        ev = cm.evaluate(sol.assign)
        got = max(ev.bottleneck_s, ev.latency_s / cm.workload.in_flight) if objective == "throughput" else ev.latency_s
        link_bound += objective == "throughput" and "->" in ev.bottleneck
        assert close(got, want), f"instance {label}/{i} ({objective}): ILP placement {got}, optimum {want}"
        assert close(sol.objective, want, 1e-5), f"instance {label}/{i}: reported objective {sol.objective} != {want}"
        assert not cm.structure_problems(sol.assign)
        assert np.all(cm.memory(sol.assign, sol.backups)["total"] <= cm.capacity * (1 + 1e-9))
        assert sorted(sol.backups) == [k for k in range(cm.n_devices) if k != cm.coordinator]
    return {"infeasible": infeasible, "link_bottleneck": link_bound}


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_ilp_objective_equals_brute_force(chunk):
    infeasible = check_against_brute_force(random.Random(1000 + chunk), PER_CHUNK, chunk)["infeasible"]
    # the sample holds both kinds: infeasible ones (both must say so) and feasible ones
    assert 0 < infeasible < PER_CHUNK, infeasible


@pytest.mark.parametrize("label, n, kw", [
    ("runs", 60, dict(identical_layers=True)),
    ("twins", 40, dict(identical_layers=True, identical_devices=True, devices=(3, 3))),
    ("slow links", 60, dict(bandwidth_scale=0.005)),
])
def test_ilp_equals_brute_force_with_identical_layers_devices_slow_links(label, n, kw):
    """What real models and clusters have and the draws above never do: runs of identical
    layers (placed by counts, not block by block), interchangeable devices (whose symmetry
    the ILP breaks), and links slow enough to be the bottleneck (above, a link never is:
    the ILP passed them with its link constraints removed)."""
    counts = check_against_brute_force(random.Random(77), n, label, **kw)
    assert 0 < counts["infeasible"] < n, counts
    if "bandwidth_scale" in kw:
        assert counts["link_bottleneck"] > 0, counts


def n_minus_1_cases(n: int, make):
    """`n` feasible instances `make(i)` planned with --resilience n-1, each with the brute
    force's answer: (i, cost model, solution, throughput optimum, worst dropout: brute force,
    worst dropout: the plan's)."""
    checked = 0
    while checked < n:
        cm = make(checked)
        try:
            sol = solve_ilp(cm, resilience="n-1", time_limit_s=30)
        except InfeasiblePlanError:
            continue
        cycle = brute_force(cm)
        want = brute_force(cm, resilience=True, cycle_max=cycle)
        yield checked, cm, sol, cycle, want, max(cm.dropout_bottlenecks(sol.assign, sol.backups).values())
        checked += 1


def test_n_minus_1_equals_brute_force_with_identical_layers_and_devices():
    rng = random.Random(9)

    def make(i):
        cm = instance(rng, devices=(3, 3), identical_layers=True, identical_devices=i % 2 == 0)
        assert find_runs(cm)
        return cm

    for i, _cm, _sol, _cycle, want, got in n_minus_1_cases(12, make):
        assert close(got, want), f"instance {i}: worst dropout {got}, optimum {want}"


def test_n_minus_1_equals_brute_force_with_slow_links():
    """Dropouts that reroute a failed share's traffic through its holder's links onto slow
    links: the n-1 phase's rerouting constraints (the fast links of the other tests pass
    without them)."""
    rng = random.Random(21)
    make = lambda i: instance(rng, devices=(3, 3), bandwidth_scale=0.001)  # noqa: E731
    for i, _cm, _sol, _cycle, want, got in n_minus_1_cases(50, make):
        assert close(got, want), f"instance {i}: worst dropout {got}, optimum {want}"


def test_n_minus_1_equals_brute_force():
    """--resilience n-1: the least worst-dropout bottleneck among the throughput-optimal plans."""
    rng = random.Random(7)
    for i, cm, sol, cycle, want, got in n_minus_1_cases(20, lambda i: instance(rng, devices=(3, 3))):
        ev = cm.evaluate(sol.assign)
        assert max(ev.bottleneck_s, ev.latency_s / cm.workload.in_flight) <= cycle * (1 + 1e-6)
        assert close(got, want), f"instance {i}: worst dropout {got}, optimum {want}"
        assert sol.status == "optimal" and close(sol.phases[-1]["objective"], want, 1e-5), sol.phases[-1]
        assert close(sol.objective, cycle, 1e-5)  # the throughput phase's optimum


HIGHSPY = importlib.util.find_spec("highspy") is not None


def highs_here() -> bool:
    """Whether HiGHS runs here: it must where highspy is importable; elsewhere asking for it
    is a one-line error that names --solver and says how to install it."""
    if HIGHSPY:
        check_solver("highs")
        return True
    with pytest.raises(PlanError, match=r"^--solver highs: .*pip install highspy"):
        check_solver("highs")
    return False


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_time_limit_records_status_objective_bound_gap(solver):
    """16 devices of the 7B graph under 0.5 s (several seconds to optimality on a 2-core
    machine): what comes back is a valid placement whose status, objective, bound and gap
    say how good it is."""
    if solver == "highs" and not highs_here():
        return
    cl = cluster_from_dict(synthetic_cluster(16, 0))
    cm = CostModel.build(synthetic_graph("synthetic:llava-1.5-7b", dtype="float16"), cl, cl.devices, in_flight=4)
    t0 = time.perf_counter()
    sol = solve_ilp(cm, time_limit_s=0.5, solver=solver)
    assert time.perf_counter() - t0 < 15  # the limit applies (it takes 4-8 s to optimality)
    d = sol.solver_dict()
    assert {"name", "status", "objective", "bound", "gap", "seconds"} <= d.keys()
    assert d["name"] == {"cbc": "CBC", "highs": "HiGHS"}[solver]
    assert not cm.structure_problems(sol.assign)
    assert np.all(cm.memory(sol.assign, sol.backups)["total"] <= cm.capacity * (1 + 1e-9))
    cycle = cm.evaluate(sol.assign).cycle_s(4)
    assert close(d["objective"], cycle, 1e-6), (d, cycle)  # the objective is the placement's own
    if d["status"] == "heuristic":  # no ILP placement in time: chain-dp's, and no bound
        assert d["bound"] is None and d["gap"] is None
        assert sol.assign == baseline_assign(cm, "chain-dp")
    else:
        assert d["status"] in ("optimal", "feasible"), d
        assert 0 < d["bound"] <= d["objective"] * (1 + 1e-9)
        if d["status"] == "optimal":
            assert d["gap"] == 0.0 and d["bound"] == d["objective"], d
        else:
            assert close(d["gap"], (d["objective"] - d["bound"]) / d["objective"], 1e-6), d


def test_highs_objective_equals_cbc_and_records_bound_and_gap():
    """HiGHS (where highspy is installed) reaches CBC's optimum (itself checked against brute
    force above) on random instances, throughput, latency and n-1; stopped by its time
    limit, it reports the bound and gap it had."""
    if not highs_here():
        return
    rng = random.Random(11)
    solved = 0
    for i in range(40):
        cm = instance(rng)
        objective = "latency" if i % 4 == 3 else "throughput"
        resilience = "n-1" if i % 5 == 4 and objective == "throughput" else "none"
        try:
            cbc = solve_ilp(cm, objective=objective, resilience=resilience, time_limit_s=30)
        except InfeasiblePlanError:
            with pytest.raises(InfeasiblePlanError, match="bytes"):
                solve_ilp(cm, objective=objective, resilience=resilience, time_limit_s=30, solver="highs")
            continue
        hi = solve_ilp(cm, objective=objective, resilience=resilience, time_limit_s=30, solver="highs")
        d = hi.solver_dict()
        assert d["name"] == "HiGHS" and d["status"] == "optimal" and d["gap"] == 0.0, d
        assert d["bound"] == d["objective"] and close(d["objective"], cbc.objective, 1e-6), (i, d, cbc)
        if resilience == "n-1":  # the worst-dropout phase too
            assert close(hi.phases[-1]["objective"], cbc.phases[-1]["objective"], 1e-6), (hi.phases, cbc.phases)
        solved += 1
    assert solved >= 15
    # 32 devices in 1 s: HiGHS stops at its limit with a placement, its bound and gap
    cl = cluster_from_dict(synthetic_cluster(32, 1))
    cm = CostModel.build(synthetic_graph("synthetic:llava-1.5-7b", dtype="float16"), cl, cl.devices, in_flight=4)
    d = solve_ilp(cm, time_limit_s=1.0, solver="highs").solver_dict()
    assert d["status"] in ("feasible", "optimal"), d
    assert 0 < d["bound"] <= d["objective"] * (1 + 1e-9)
    if d["status"] == "feasible":
        assert close(d["gap"], (d["objective"] - d["bound"]) / d["objective"], 1e-6), d


def test_solver_option_on_the_command_line(tmp_path, capsys):
    """`adaptlink plan --solver highs` records HiGHS in plan.json (and keeps --json's stdout
    JSON); without highspy it is refused on one line before anything is read or solved."""
    base = [sys.executable, "-m", "adaptlink.cli", "plan", "--model", "synthetic:llava-1.5-7b",
            "--out", str(tmp_path / "p.json"), "--json"]
    # highspy hidden: the clear error, even before the (missing) cluster file is looked at
    hide = "import sys; sys.modules['highspy'] = None; from adaptlink.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", hide, *base[3:], "--cluster", str(tmp_path / "none.json"),
                           "--solver", "highs"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--solver" in proc.stderr, proc.stderr
    assert "pip install highspy" in proc.stderr and "Traceback" not in proc.stderr
    # a baseline solves no ILP: --solver with it is a mistake, said so
    rc = cli_main(["plan", "--model", "synthetic:tiny", "--cluster", f"{CLUSTERS}/local4.json",
                   "--baseline", "uniform", "--solver", "cbc", "--out", str(tmp_path / "u.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--solver" in err and len(err.strip().splitlines()) == 1, err
    if not highs_here():
        return
    got = {}
    for solver in ("cbc", "highs"):
        proc = subprocess.run([*base, "--cluster", f"{CLUSTERS}/hetero4.json", "--solver", solver],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        got[solver] = json.loads(proc.stdout)["solver"]  # stdout is JSON and nothing else
        assert load_plan(tmp_path / "p.json").solver == got[solver]
    assert got["cbc"]["name"] == "CBC" and got["highs"]["name"] == "HiGHS"
    for sv in got.values():
        assert sv["status"] == "optimal" and sv["gap"] == 0.0 and sv["bound"] == sv["objective"], sv
    assert close(got["highs"]["objective"], got["cbc"]["objective"], 1e-6), got


def test_cbc_infeasible_at_the_time_limit_is_no_proof(monkeypatch):
    """CBC 2.10 answers 'infeasible' when its time runs out in preprocessing (32 devices of
    the 7B graph, 4 s): that must not become 'the model does not fit in memory'."""
    rng = random.Random(5)
    while True:
        cm = instance(rng)
        try:
            solve_ilp(cm, time_limit_s=30)
            break
        except InfeasiblePlanError:
            continue
    real = pulp.LpProblem.solve

    def cbc_says_infeasible(self, solver=None, **kw):  # as CBC does, after a while
        if self.name != "placement":
            return real(self, solver, **kw)
        time.sleep(0.6)
        self.status, self.sol_status = pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible
        return self.status

    monkeypatch.setattr(pulp.LpProblem, "solve", cbc_says_infeasible)
    assert PlacementModel(cm).solve(0.5)["status"] == "no solution"   # stopped at its limit
    assert PlacementModel(cm).solve(30)["status"] == "infeasible"     # well within it
    sol = solve_ilp(cm, time_limit_s=0.5)  # stages get 0.5 s at least: each one runs out
    assert sol.status == "heuristic" and sol.assign == baseline_assign(cm, "chain-dp")


# ---------------------------------------------------------------------------------------------
# plans: ILP and baselines on LLaVA-7B-shaped graphs


@pytest.fixture(scope="module")
def hetero4():
    return load_cluster(f"{CLUSTERS}/hetero4.json")


@pytest.fixture(scope="module")
def graph7b():
    return synthetic_graph("synthetic:llava-1.5-7b", dtype="float16")


@pytest.mark.parametrize("method", ["ilp", *BASELINES])
def test_every_method_gives_a_valid_plan_with_backups(method, hetero4, graph7b):
    plan = make_plan(graph7b, hetero4, method=method, time_limit_s=30)
    d = json.loads(json.dumps(plan.to_dict()))
    again = Plan.from_dict(d)  # validates: every block once, coordinator, acyclic, backups exact
    assert again.plan_hash() == plan.plan_hash()
    assert sorted(again.block_ranks()) == sorted(graph7b.nodes)
    coord = again.devices[again.coordinator]
    assert {"text.embed", "head"} <= set(coord.blocks)
    for s in again.devices:
        assert s.predicted["memory_bytes"] <= s.predicted["capacity_bytes"]
    holders = {s.rank for s in again.devices if s.blocks and s.rank != again.coordinator}
    if method == "ilp":  # the ILP backs up every share; a baseline where there is room
        assert all(again.backup_holder(r) is not None for r in holders)
    assert plan.predicted["requests_per_s"] > 0


def test_hetero4_ilp_beats_uniform_by_1_5x(hetero4, graph7b):
    ilp = make_plan(graph7b, hetero4, method="ilp")
    uni = make_plan(graph7b, hetero4, method="uniform")
    ratio = ilp.predicted["requests_per_s"] / uni.predicted["requests_per_s"]
    assert ratio >= 1.5, ratio
    for name in BASELINES:  # and it is at least as good as every baseline, at its own objective
        cm = CostModel.build(graph7b, hetero4, hetero4.devices)
        ev = cm.evaluate(baseline_assign(cm, name))
        mine = cm.evaluate([ilp.block_ranks()[b] for b in cm.blocks])
        assert mine.cycle_s(4) <= ev.cycle_s(4) * (1 + 1e-9), name


def test_uniform_and_memory_split_the_layers_as_named(hetero4, graph7b):
    """uniform: equal layer counts (within one) in rank order; memory: counts in proportion
    to each device's memory (exo style), each cut within one layer of its target."""
    from partitioner.baselines import chain_order
    from partitioner.types import LAYER_KINDS

    cm = CostModel.build(graph7b, hetero4, hetero4.devices)
    chain = [b for b in chain_order(cm) if cm.kinds[b] in LAYER_KINDS]
    L, N = len(chain), cm.n_devices
    for name, share in (("uniform", np.ones(N)), ("memory", cm.capacity)):
        a = baseline_assign(cm, name)
        seq = [a[b] for b in chain]
        assert seq == sorted(seq), f"{name}: devices take the layers out of rank order"
        counts = np.array([seq.count(d) for d in range(N)])
        target = np.cumsum(share / share.sum() * L)
        assert np.all(np.abs(np.cumsum(counts) - target) <= 1 + 1e-9), (name, counts, target)
    assert len({seq.count(d) for d in range(N)}) > 1  # memory is not uniform on hetero4


def test_chain_dp_is_optimal_among_contiguous_splits():
    rng = random.Random(3)
    from partitioner.baselines import _from_counts, chain_order

    for i in range(40):  # half with slow links, where charging text.embed -> merge per cut showed
        cm = instance(rng, devices=(3, 3), bandwidth_scale=1.0 if i % 2 else 0.01)
        chain = chain_order(cm)
        L = len(chain)
        best = math.inf
        for k in range(1, cm.n_devices + 1):
            for order in itertools.permutations([d for d in range(cm.n_devices) if d != 0], k - 1):
                for cuts in itertools.combinations(range(1, L), k - 1):
                    a = _from_counts(cm, chain, [*cuts, L], [0, *order])
                    if np.all(cm.memory(a)["total"] <= cm.capacity):
                        best = min(best, cm.evaluate(a).bottleneck_s)
        try:
            got = cm.evaluate(baseline_assign(cm, "chain-dp")).bottleneck_s
        except InfeasiblePlanError:
            got = math.inf
        # the DP's split is one of those enumerated, and it costs links as the cost model does
        assert close(got, best, 1e-9) or (got == best == math.inf), (i, got, best)


def test_backups_fill_spare_memory_first():
    """A baseline's backups (choose_backups): as many shares backed up as fit in the spare
    memory, then the least worst bottleneck after a dropout, against every choice of holders."""
    rng = random.Random(11)
    checked = 0
    for i in range(40):
        cm = instance(rng, bandwidth_scale=1.0 if i % 2 else 0.01)
        a = baseline_assign(cm, "compute")
        bk = choose_backups(cm, a)
        if np.any(cm.memory(a)["total"] > cm.capacity):
            continue
        assert np.all(cm.memory(a, bk)["total"] <= cm.capacity * (1 + 1e-9))
        shares = [k for k in range(cm.n_devices) if k != cm.coordinator and k in a]
        best = (0, 0.0)
        for holders in itertools.product(*[[None] + [h for h in range(cm.n_devices) if h != k] for k in shares]):
            b = {k: h for k, h in zip(shares, holders) if h is not None}
            if np.any(cm.memory(a, b)["total"] > cm.capacity):
                continue
            worst = max((cm.evaluate(cm.after_dropout(a, k, h)).bottleneck_s for k, h in b.items()), default=0.0)
            best = max(best, (len(b), -worst))
        got = max((cm.evaluate(cm.after_dropout(a, k, h)).bottleneck_s for k, h in bk.items()), default=0.0)
        assert len(bk) == best[0], (i, bk, best)
        assert close(got, -best[1], 1e-6) or got == -best[1] == 0.0, (i, got, best)
        checked += 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------
# simulator


def test_simulator_agrees_with_queueing_identities(hetero4, graph7b):
    cm = CostModel.build(graph7b, hetero4, hetero4.devices, in_flight=4)
    assign = baseline_assign(cm, "chain-dp")
    ev = cm.evaluate(assign)
    one = simulate(cm, assign, in_flight=1)
    # one request alone: nothing waits, so its latency is the critical path, at most the sum
    assert one.latency_s <= ev.latency_s * (1 + 1e-9)
    assert close(one.requests_per_s, 1 / one.latency_s, 1e-6)
    rates = []
    for K in (1, 2, 4, 8, 32):
        s = simulate(cm, assign, in_flight=K)
        assert s.requests_per_s <= ev.requests_per_s * (1 + 1e-6)        # never past the bottleneck
        assert close(s.requests_per_s * s.latency_s, K, 1e-3)            # Little's law
        assert all(0 <= u <= 1 + 1e-9 for u in s.utilisation)
        rates.append(s.requests_per_s)
    assert rates == sorted(rates)                                         # more in flight, more done
    # everything on one device: it is never idle, whatever K
    whole = [0] * cm.n_blocks
    for K in (1, 3):
        s = simulate(cm, whole, in_flight=K)
        assert close(s.requests_per_s, 1 / cm.evaluate(whole).busy_s[0], 1e-6)
        assert close(s.utilisation[0], 1.0, 1e-6)


# ---------------------------------------------------------------------------------------------
# CLI and files


def _bad_cluster(tmp_path, mutate):
    d = json.loads(open(f"{CLUSTERS}/local4.json").read())
    mutate(d)
    p = tmp_path / "bad_cluster.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["devices"][1].pop("memory_bytes"), "devices[1].memory_bytes"),
    (lambda d: d["devices"][2]["compute"]["roofline"].update(flops_per_s=-1), "devices[2].compute.roofline.flops_per_s"),
    (lambda d: d["links"]["pairs"][0].update(dst="nope"), "links.pairs[0].dst"),
    (lambda d: d.update(schema="adaptlink.cluster/9"), "schema"),
    # emulation can only slow a device down, and a misspelt knob must not pass for no knob
    (lambda d: d["devices"][1]["emulation"].update(slowdown=0.5), "devices[1].emulation.slowdown"),
    (lambda d: d["devices"][2]["emulation"].update(memroy_cap=10**9), "devices[2].emulation.memroy_cap"),
    # a kind no block has: with a roofline beside it, it used to be ignored without a word
    (lambda d: d["devices"][3]["compute"].update(measured={"prefill_tokens": 64, "blocks": {
        "decoder_layers": {"prefill_s": 0.01, "decode_s": 0.001}}}),
     "devices[3].compute.measured.blocks.decoder_layers"),
])
def test_malformed_cluster_exits_2_naming_file_and_field(tmp_path, capsys, mutate, field):
    p = _bad_cluster(tmp_path, mutate)
    rc = cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(p), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(p) in err and field in err, err
    assert len(err.strip().splitlines()) == 1


def test_committed_clusters_validate():
    """Every cluster.json in the repository passes the (strict) loader."""
    import glob

    paths = sorted(glob.glob(f"{CLUSTERS}/*.json") + glob.glob("experiments/results/**/cluster*.json", recursive=True))
    assert f"{CLUSTERS}/hetero4.json" in paths
    for p in paths:
        load_cluster(p)


def test_plan_links_keep_what_the_transport_is_to_enforce(tmp_path):
    """A profiled emulated link carries its measured fit (what the planner costs with) and
    `emulated_as` (what was asked for): plan.json must keep the latter, or the runtime
    enforces the measured figure instead."""
    from runtime.transport import Link as WireLink
    from runtime.transport import LinkEmulation

    d = json.loads(open(f"{CLUSTERS}/local4.json").read())
    d["links"]["default"]["emulated_as"] = {"bandwidth_bytes_per_s": 2e8, "latency_s": 0.0}
    d["links"]["pairs"][0].update(bandwidth_bytes_per_s=6.3e7, latency_s=0.0027,
                                  emulated_as={"bandwidth_bytes_per_s": 1.25e8, "latency_s": 0.0})
    p = tmp_path / "profiled.json"
    p.write_text(json.dumps(d))
    cluster = load_cluster(p)
    assert cluster_from_dict(cluster.to_dict()).links_dict() == cluster.links_dict()
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(p), "--prefill-tokens", "32",
                     "--decode-tokens", "4", "--out", str(out)]) == 0
    plan = load_plan(out)
    src, dst = d["links"]["pairs"][0]["src"], d["links"]["pairs"][0]["dst"]
    (pair,) = [q for q in plan.links["pairs"] if (q["src"], q["dst"]) == (src, dst)]
    assert pair["bandwidth_bytes_per_s"] == 6.3e7  # measured: what the cost model used
    assert pair["emulated_as"] == {"bandwidth_bytes_per_s": 1.25e8, "latency_s": 0.0}
    emu = LinkEmulation.from_spec(plan.links, {s.name: s.rank for s in plan.devices})
    a, b = plan.rank_of(src), plan.rank_of(dst)
    assert emu.link(a, b) == WireLink(1.25e8, 0.0) == emu.link(b, a)
    assert emu.default == WireLink(2e8, 0.0)


@pytest.mark.parametrize("emulated_as, field", [
    ({"bandwidth_bytes_per_s": 0}, "links.pairs[0].emulated_as.bandwidth_bytes_per_s"),
    ({"bandwith_bytes_per_s": 1e8}, "links.pairs[0].emulated_as.bandwith_bytes_per_s"),
    ("100Mbit", "links.pairs[0].emulated_as"),
])
def test_malformed_emulated_as_names_the_field(emulated_as, field):
    d = json.loads(open(f"{CLUSTERS}/local4.json").read())
    d["links"]["pairs"][0]["emulated_as"] = emulated_as
    with pytest.raises(ClusterSpecError, match=re.escape(f"c.json: {field}:")):
        cluster_from_dict(d, source="c.json")


def test_block_kinds_are_the_graphs():
    """The partitioner's plain list of kinds (no torch) is the one the graph and profiler use."""
    from adaptlink.model.graph import block_kind
    from adaptlink.profiler import REPRESENTATIVE
    from partitioner.types import BLOCK_KINDS
    from partitioner.validate import block_kind as plain_block_kind

    assert set(REPRESENTATIVE) == set(BLOCK_KINDS)
    for kind, bid in REPRESENTATIVE.items():
        assert block_kind(bid) == plain_block_kind(bid) == kind


@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_with_n_minus_1_is_refused(tmp_path, capsys, baseline, hetero4, graph7b):
    """A baseline does not optimise for dropouts: asking for n-1 with one is an error, not a
    plan that records mode n-1."""
    out = tmp_path / "p.json"
    rc = cli_main(["plan", "--model", "synthetic:tiny", "--cluster", f"{CLUSTERS}/local4.json",
                   "--baseline", baseline, "--resilience", "n-1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    assert "--resilience n-1" in err and baseline in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(PlanError, match="does not optimise for dropouts"):
        make_plan(graph7b, hetero4, method=baseline, resilience="n-1")
    # without it, the baseline's plan says what it is and still reports every dropout
    plan = make_plan(graph7b, hetero4, method=baseline)
    assert plan.resilience["mode"] == "none" and plan.resilience["dropouts"]


def test_not_json_cluster_exits_2(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text("{ not json")
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(p), "--out", str(tmp_path / "p.json")]) == 2
    assert str(p) in capsys.readouterr().err


def test_model_that_does_not_fit_names_devices_and_bytes(tmp_path, capsys):
    p = _bad_cluster(tmp_path, lambda d: [dev.update(memory_bytes=2_000_000_000) for dev in d["devices"]])
    rc = cli_main(["plan", "--model", "synthetic:llava-1.5-7b", "--cluster", str(p), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "bytes short" in err and "cpu0" in err, err
    # "N bytes short in the closest placement (cpu0 by a bytes, cpu2 by b bytes, ...)": a + b + ... = N
    import re

    total = int(re.search(r"([\d,]+) bytes short", err).group(1).replace(",", ""))
    parts = {n: int(v.replace(",", "")) for n, v in re.findall(r"(cpu\d) by ([\d,]+) bytes", err)}
    assert parts and abs(sum(parts.values()) - total) <= len(parts), (total, parts)
    assert set(parts) <= {"cpu0", "cpu1", "cpu2", "cpu3"} and all(v > 0 for v in parts.values())


def test_block_too_big_for_the_coordinator_says_by_how_much(tmp_path, capsys):
    p = _bad_cluster(tmp_path, lambda d: d["devices"][0].update(memory_bytes=100_000_000))
    rc = cli_main(["plan", "--model", "synthetic:llava-1.5-7b", "--cluster", str(p), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "coordinator cpu0" in err, err
    import re

    short, need, have = (int(x.replace(",", "")) for x in re.search(
        r"([\d,]+) bytes short for it \(([\d,]+) needed, ([\d,]+) available\)", err).groups())
    assert have == 100_000_000 and short == need - have > 0


@pytest.fixture(scope="module")
def tiny_plan_dict(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", f"{CLUSTERS}/local4.json",
                     "--prefill-tokens", "32", "--decode-tokens", "4", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["devices"][1]["blocks"].append(d["devices"][0]["blocks"][0]), "devices[1].blocks"),
    (lambda d: d["links"]["default"].update(bandwidth_bytes_per_s=0), "links.default.bandwidth_bytes_per_s"),
    (lambda d: d["links"]["pairs"][0].update(src="nope"), "links.pairs[0].src"),
    (lambda d: d["cost_model"]["edges"][0].pop("src"), "cost_model.edges[0].src"),
    (lambda d: d["cost_model"]["blocks"][2].update(decode_s=[0.1]), "cost_model.blocks[2].decode_s"),
    (lambda d: d["cost_model"]["blocks"][0].pop("act_bytes"), "cost_model.blocks[0].act_bytes"),
    (lambda d: d["cost_model"].update(devices=["x"]), "cost_model.devices"),
])
@pytest.mark.parametrize("command", ["simulate", "show"])
def test_malformed_plan_exits_2_naming_file_and_field(tiny_plan_dict, tmp_path, capsys, mutate, field, command):
    d = json.loads(json.dumps(tiny_plan_dict))
    mutate(d)
    out = tmp_path / "my_plan.json"
    out.write_text(json.dumps(d))
    capsys.readouterr()
    extra = ["--out", str(tmp_path / "p.png")] if command == "show" else []
    assert cli_main([command, str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and field in err, err
    assert len(err.strip().splitlines()) == 1


def test_plan_simulate_show_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", "--model", str(tiny_ckpt), "--cluster", f"{CLUSTERS}/local4.json",
                   "--prefill-tokens", "64", "--decode-tokens", "8", "--resilience", "n-1", "--out", str(out)])
    assert rc == 0
    plan = load_plan(out)
    from adaptlink.model.config import ModelInfo, load_config
    from adaptlink.model.graph import block_ids

    assert sorted(plan.block_ranks()) == sorted(block_ids(ModelInfo.from_config(load_config(str(tiny_ckpt)))))
    assert Plan.from_dict(json.loads(out.read_text())).plan_hash() == plan.plan_hash()
    assert plan.model["source"] == str(tiny_ckpt) and plan.emulated
    assert all(s.threads == 1 and s.host == "127.0.0.1" for s in plan.devices)
    assert plan.solver["status"] == "optimal"
    cm = CostModel.from_plan(plan)
    ranks = plan.block_ranks()
    assert close(plan.solver["cycle_s"], cm.evaluate([ranks[b] for b in cm.blocks]).cycle_s(cm.customers))
    assert plan.solver["cycle_s"] >= plan.solver["objective"] * (1 - 1e-6)  # n-1 may give some up
    capsys.readouterr()
    assert cli_main(["simulate", str(out), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["requests_per_s"] > 0 and set(sim["utilisation"]) == {s.name for s in plan.devices}
    png = tmp_path / "plan.png"
    assert cli_main(["show", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_importing_the_partitioner_loads_no_torch():
    code = ("import sys, partitioner.planner, partitioner.show, partitioner.validate, partitioner.synthetic, "
            "partitioner.ilp, partitioner.baselines, partitioner.simulate, partitioner.costs, adaptlink.plan_cli; "
            "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
