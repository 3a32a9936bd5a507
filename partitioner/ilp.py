"""The placement ILP: every block on one device, backups on another, solved by CBC (pulp),
or by HiGHS (`solver="highs"`: pulp's interface to highspy, `pip install highspy`).

Variables (B blocks, E edges, N devices; times are divided by a scale so that they are ~1):

    x[b, d]      binary   block b runs on device d (text.embed and head fixed on rank 0)
    c[e, a, b]   >= 0     edge e runs from device a to device b; for each e, c[e] is a joint
                          distribution with marginals x[src(e)] and x[dst(e)], so it is exactly
                          x[src, a] * x[dst, b] when x is integral (tight "transportation" form)
    p[d], q[b]   in [0, N-1]   device positions: q[b] = p[d] where b runs; every cut edge
                          (edges into head excepted) goes to a strictly higher position, so the
                          device graph is acyclic and each device's layers of a chain contiguous
    y[k, h]      binary   device h preloads device k's share (k is not the coordinator)
    Z            the cycle: >= every device's busy time and every link's transfer time (the
                          bottleneck), and >= one request's latency / K with K requests in flight

Objectives: `throughput` minimises Z (1 / Z bounds the requests/s, CostModel.cycle_s);
`latency` minimises all busy time plus all transfers (one request alone). `resilience="n-1"`
then minimises W, the worst bottleneck after any one non-coordinator device drops out and its
backup holder runs its share too, keeping Z within `resilience_slack` of its optimum.

Each phase is solved in stages (`PlacementModel.solve_staged`): first a relaxation without
the devices' order (`topology="ends"`), whose optimum bounds the phase from below and whose
holdings, backups and runs' ends give a placement; that placement, proven optimal when it
meets the bound, is on the LLaVA-7B bench the answer (8 and 16 devices, throughput and n-1);
otherwise tighter relaxations and the whole ILP follow, each bound a cut in the next.

Both solvers run with zero gap tolerance and report status, objective, bound and gap
(partitioner/solvers.py runs them and reads their bounds). A phase that stops without a bound
(a time limit hit before the MIP's root finished) records null.

Length: ~1000 lines, over the ~500 of the house style, because it is one formulation read
together: `PlacementModel`'s sections (one method each), the n-1 phase and the staged solve
share its variables, and `solve_ilp`/`diagnose_memory` are its two drivers. The solver
plumbing, which knows nothing of placements, is apart in partitioner/solvers.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pulp

from partitioner import solvers
from partitioner.baselines import baseline_assign, choose_backups, memory_overflow
from partitioner.costs import CostModel
from partitioner.errors import InfeasiblePlanError, PlanError
from partitioner.solvers import SOLVERS, check_solver
from partitioner.vocab import LAYER_KINDS

log = logging.getLogger(__name__)

TOPOLOGIES = ("full", "paths", "ends", "none")
"""How much of the devices' order and links a `PlacementModel` has (its `topology`)."""
STAGE0_TOPOLOGY = "ends"
"""The relaxation that stage 0 of `PlacementModel.solve_staged` solves."""


@dataclass
class Solution:
    """A placement and what the solver said about it (objective and bound in seconds)."""

    assign: list[int]
    """Rank of each block (CostModel order)."""
    backups: dict[int, int] = field(default_factory=dict)
    """Rank whose share is preloaded -> rank that preloads it."""
    status: str = "optimal"
    """optimal | feasible (stopped at the time limit) | heuristic"""
    objective: float = math.nan
    bound: float = math.nan
    gap: float = math.nan
    seconds: float = 0.0
    solver: str = "CBC"
    phases: list[dict] = field(default_factory=list)

    def solver_dict(self) -> dict:
        return {"name": self.solver, "status": self.status, "objective": _num(self.objective),
                "bound": _num(self.bound), "gap": _num(self.gap), "seconds": round(self.seconds, 4),
                "phases": self.phases}


def _num(x: float):
    return None if x is None or not math.isfinite(x) else float(x)


def _lin(terms) -> pulp.LpAffineExpression:
    """Sum of (var-or-number, coefficient) pairs, without pulp's slow operator chains."""
    expr = pulp.LpAffineExpression()
    for v, c in terms:
        if c == 0:
            continue
        if isinstance(v, (int, float)):
            expr.constant += v * c
        elif isinstance(v, pulp.LpAffineExpression):
            expr.addInPlace(v * c)
        else:
            expr.addterm(v, c)
    return expr


class PlacementModel:
    """The ILP of one cost model; build once, solve in phases.

    A run of identical consecutive layers (same kind, same costs; e.g. the 32 decoder
    layers of LLaVA-7B) is not placed layer by layer: each device gets a count n[r, d] of
    the run's layers, and binaries f0/f1/g say which device holds the run's first layer,
    its last, and which device follows which along the run. The layers being identical,
    this is the same set of placements without the (L choose counts) symmetric copies that
    would make branch-and-bound slow. Every other block is a single x[b, d] row.

    `__init__` builds the sections in this order (each a method below; the order fixes the
    order of rows and columns the solver sees): `_singles`, `_runs`, `_cut_edges`, `_loads`,
    `_convexity`, `_linear_order` or `_positions`, `_activations`, `_backups`, `_memory`,
    `_symmetry`, `_objective`.
    """

    def __init__(self, cm: CostModel, *, objective: str = "throughput", backups: bool = True,
                 overflow: bool = False, symmetry: bool = True, runs: bool = True,
                 order: str = "lop", in_flight: int | None | str = "workload", solver: str = "cbc",
                 topology: str = "full"):
        check_solver(solver)
        self.solver = solver
        # topology other than "full": a relaxation of the whole model, each of its rows one of
        # the whole model's (terms that are >= 0 dropped from Z's rows), for solve_staged:
        # "none": the holdings alone (x, n, u, backups, memory, loads), no order, no links;
        # "ends": and which device holds each run's first and last layer (f0, f1), and the
        #         links of every edge between units (c), no order, no steps along runs (g);
        # "paths": and the steps along runs (g) with their links, no order of the devices.
        if topology not in TOPOLOGIES:
            raise PlanError(f"topology: must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
        self.topology = topology
        self.cm, self.objective, self.with_backups = cm, objective, backups and cm.n_devices > 1
        self.overflow = overflow
        N = cm.n_devices
        # Time unit: the balanced share of the least possible compute, so Z* >= ~1.
        self.scale = float(cm.compute_s.min(axis=1).sum() / N) or 1.0
        self.ts = cm.compute_s / self.scale                     # [B, N]
        self.es = cm.edge_s / self.scale                        # [E, N, N]
        self.cap = cm.capacity                                  # [N]
        self.mem = cm.mem_bytes                                 # [B, N]
        self.prob = pulp.LpProblem("placement", pulp.LpMinimize)
        self.fits = self.mem + cm.act_bytes[:, None] <= self.cap[None, :]   # [B, N] the block fits alone

        self.symmetry, self.use_runs = symmetry, runs
        self.runs = find_runs(cm) if runs else []
        self.run_of = {b: r for r, run in enumerate(self.runs) for b in run}
        self.singles = [b for b in range(cm.n_blocks) if b not in self.run_of]
        self._singles()
        self._runs()
        self._cut_edges()
        self.in_flight = cm.customers if in_flight == "workload" else in_flight
        self._loads()
        self._convexity()
        self.order_kind = order
        if N > 1 and order == "lop" and topology == "full":
            self._linear_order()
        elif N > 1 and topology == "full":
            self._positions()
        self._activations()
        self._memory(self._backups())
        if symmetry and N > 2:
            self._symmetry()
        self._objective()

    # -- building blocks of the sections ----------------------------------------------------

    def _src_row(self, b):
        """Where the tail of an edge leaving b sits: x[b], or the device of its run's last layer."""
        return self.x[b] if b in self.x else self.f1[self.run_of[b]]

    def _dst_row(self, b):
        """Where the head of an edge entering b sits: x[b], or the device of its run's first layer."""
        return self.x[b] if b in self.x else self.f0[self.run_of[b]]

    def _allowed(self, row) -> list[int]:
        """The devices a placement row does not fix at 0."""
        return [d for d in range(self.cm.n_devices) if not (isinstance(row[d], int) and row[d] == 0)]

    def per_device(self, values_single, values_run, d) -> list:
        """[(var, value)] summing a per-block value over what device d holds (singles and run counts)."""
        return ([(self.x[b][d], values_single[b]) for b in self.singles]
                + [(self.n[r][d], values_run[r]) for r in range(len(self.runs))])

    def share(self, k, h):
        """[(var, bytes at h)] of device k's share, and its largest possible size in bytes at h."""
        mem = self.mem
        terms = self.per_device(mem[:, h], [mem[run[0], h] for run in self.runs], k)
        big = sum((mem[b, h] if not isinstance(self.x[b][k], int) else 0) for b in self.singles)
        big += sum(mem[run[0], h] * (self.n[r][k].upBound if not isinstance(self.n[r][k], int) else 0)
                   for r, run in enumerate(self.runs))
        return terms, big

    def _hold(self, un, d):
        """Whether device d holds unit `un` (("x", block) or ("r", run)): x[b, d] or u[r, d]."""
        return self.x[un[1]][d] if un[0] == "x" else self.u[un[1]][d]

    # -- the sections -------------------------------------------------------------------------

    def _singles(self) -> None:
        """x: every single block on exactly one device it fits on (text.embed and head on the coordinator)."""
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        self.x: dict[int, list] = {}
        for b in self.singles:
            if b in cm.pinned:
                row = [1 if d == cm.coordinator else 0 for d in range(N)]
            else:
                row = [pulp.LpVariable(f"x_{b}_{d}", cat="Binary") if (self.fits[b, d] or self.overflow) else 0
                       for d in range(N)]
            self.x[b] = row
            prob += _lin((v, 1) for v in row) == 1, f"place_{b}"

    def _runs(self) -> None:
        """n, u, f0, f1, g: each run's layers counted out to devices, entered and left once, as one path."""
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        Var, cap, mem = pulp.LpVariable, self.cap, self.mem
        self.n, self.u, self.f0, self.f1, self.g = [], [], [], [], []
        self.run_edge = []
        edge_index = {uv: e for e, uv in enumerate(cm.edges)}
        for r, run in enumerate(self.runs):
            rep, L = run[0], len(run)
            self.run_edge.append(edge_index[(run[0], run[1])])
            n, u, f0, f1 = [], [], [], []
            for d in range(N):
                if self.overflow:
                    ub = L
                elif not self.fits[rep, d]:
                    ub = 0
                elif mem[rep, d] > 0:
                    ub = min(L, int((cap[d] - cm.act_bytes[rep]) // mem[rep, d]))
                else:
                    ub = L
                if ub == 0:
                    n.append(0), u.append(0), f0.append(0), f1.append(0)
                    continue
                n.append(Var(f"n_{r}_{d}", lowBound=0, upBound=ub, cat="Integer"))
                u.append(Var(f"u_{r}_{d}", cat="Binary"))
                f0.append(Var(f"f0_{r}_{d}", cat="Binary") if self.topology != "none" else 0)
                f1.append(Var(f"f1_{r}_{d}", cat="Binary") if self.topology != "none" else 0)
                prob += n[d] - u[d] >= 0, f"nu_lo_{r}_{d}"
                prob += n[d] - ub * u[d] <= 0, f"nu_hi_{r}_{d}"
            ok = [d for d in range(N) if not isinstance(u[d], int)]
            prob += _lin((n[d], 1) for d in ok) == L, f"run_{r}"
            g = {}
            if self.topology in ("none", "ends"):
                if self.topology == "ends":  # in_ and out_ below, without g
                    prob += _lin((f0[d], 1) for d in ok) == 1, f"first_{r}"
                    prob += _lin((f1[d], 1) for d in ok) == 1, f"last_{r}"
                    for d in ok:
                        prob += f0[d] - u[d] <= 0, f"in_{r}_{d}"
                        prob += f1[d] - u[d] <= 0, f"out_{r}_{d}"
                self.n.append(n), self.u.append(u), self.f0.append(f0), self.f1.append(f1), self.g.append(g)
                continue
            g = {(a, b): Var(f"g_{r}_{a}_{b}", cat="Binary") for a in ok for b in ok if a != b}
            prob += _lin((f0[d], 1) for d in ok) == 1, f"first_{r}"
            prob += _lin((f1[d], 1) for d in ok) == 1, f"last_{r}"
            for d in ok:  # each used device is entered once and left once along the run
                prob += _lin([(g[(a, d)], 1) for a in ok if a != d] + [(f0[d], 1), (u[d], -1)]) == 0, f"in_{r}_{d}"
                prob += _lin([(g[(d, b)], 1) for b in ok if b != d] + [(f1[d], 1), (u[d], -1)]) == 0, f"out_{r}_{d}"
            self.n.append(n), self.u.append(u), self.f0.append(f0), self.f1.append(f1), self.g.append(g)

    def _cut_edges(self) -> None:
        """c: each edge between units a joint distribution over device pairs with its ends' placements as marginals."""
        cm, prob = self.cm, self.prob
        self.internal = {e for e, (u_, v_) in enumerate(cm.edges)
                         if u_ in self.run_of and self.run_of.get(v_) == self.run_of[u_]}
        self.c: dict[int, dict] = {}
        for e, (u_, v_) in enumerate(cm.edges):
            if e in self.internal or self.topology == "none":
                continue
            ru, rv = self._src_row(u_), self._dst_row(v_)
            cu, cv = self._allowed(ru), self._allowed(rv)
            if len(cu) == 1:
                ce = {(cu[0], b): rv[b] for b in cv}
            elif len(cv) == 1:
                ce = {(a, cv[0]): ru[a] for a in cu}
            else:
                ce = {(a, b): pulp.LpVariable(f"c_{e}_{a}_{b}", lowBound=0) for a in cu for b in cv}
                for a in cu:
                    prob += _lin([(ce[(a, b)], 1) for b in cv] + [(ru[a], -1)]) == 0, f"cu_{e}_{a}"
                for b in cv:
                    prob += _lin([(ce[(a, b)], 1) for a in cu] + [(rv[b], -1)]) == 0, f"cv_{e}_{b}"
            self.c[e] = ce

    def _loads(self) -> None:
        """Z: at least every device's busy time and every link's transfer time, and latency / K in flight."""
        prob, N, ts, es = self.prob, self.cm.n_devices, self.ts, self.es
        self.busy = [_lin(self.per_device(ts[:, d], [ts[run[0], d] for run in self.runs], d)) for d in range(N)]
        self.pairs = [(a, b) for a in range(N) for b in range(N) if a != b]
        self.link = {}
        for a, b in self.pairs:
            terms = [(ce[(a, b)], es[e, a, b]) for e, ce in self.c.items() if (a, b) in ce]
            terms += [(g[(a, b)], es[self.run_edge[r], a, b]) for r, g in enumerate(self.g) if (a, b) in g]
            if terms:
                self.link[(a, b)] = _lin(terms)
        self.Z = pulp.LpVariable("Z", lowBound=0)
        for d in range(N):
            prob += self.busy[d] - self.Z <= 0, f"busy_{d}"
        for (a, b), expr in self.link.items():
            prob += expr - self.Z <= 0, f"link_{a}_{b}"
        if self.in_flight and self.objective == "throughput" and not self.overflow:
            # K requests in flight keep at most K busy at once: the cycle is also at least
            # one request's latency / K (closed-pipeline bound, see CostModel.cycle_s)
            K = float(self.in_flight)
            prob += _lin([(e, 1 / K) for e in self.busy] + [(e, 1 / K) for e in self.link.values()]
                         + [(self.Z, -1)]) <= 0, "in_flight"

    def _convexity(self) -> None:
        """A device holding two blocks holds every block on a path between them (no request leaves and returns)."""
        # Implied by the ordering sections, but stated on holdings it makes the LP (and
        # stage 1 of solve_staged) much tighter.
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        units = nx.DiGraph()
        unit = {b: (("r", self.run_of[b]) if b in self.run_of else ("x", b)) for b in range(cm.n_blocks)}
        units.add_nodes_from(sorted(set(unit.values())))  # sorted: the same constraints, hence plan, every run  # sorted: the same constraints, hence plan, every run
        for e, (u_, v_) in enumerate(cm.edges):
            if not cm.exempt[e] and unit[u_] != unit[v_]:
                units.add_edge(unit[u_], unit[v_])
        reach = nx.transitive_closure_dag(units)
        for A, Bu in reach.edges:
            for d in range(N):
                ha, hb = self._hold(A, d), self._hold(Bu, d)
                if isinstance(ha, int) and ha == 0 or isinstance(hb, int) and hb == 0:
                    continue
                both = _lin([(ha, 1), (hb, 1)]) - 1
                for J in reach.successors(A):
                    if J != Bu and reach.has_edge(J, Bu):
                        if J[0] == "x":
                            prob += both - self.x[J[1]][d] <= 0, f"cvx_{A[1]}{A[0]}_{Bu[1]}{Bu[0]}_{J[1]}{J[0]}_{d}"
                        else:
                            prob += both * len(self.runs[J[1]]) - self.n[J[1]][d] <= 0, \
                                f"cvx_{A[1]}{A[0]}_{Bu[1]}{Bu[0]}_{J[1]}{J[0]}_{d}"
                if self.topology == "none":
                    continue
                if A[0] == "r":  # d holds the end of run A
                    prob += both - self.f1[A[1]][d] <= 0, f"cvxl_{A[1]}{A[0]}_{Bu[1]}{Bu[0]}_{d}"
                if Bu[0] == "r":  # and the start of run B
                    prob += both - self.f0[Bu[1]][d] <= 0, f"cvxf_{A[1]}{A[0]}_{Bu[1]}{Bu[0]}_{d}"

    def _linear_order(self) -> None:
        """o: one total order of the devices (order="lop"); every cut edge and run step goes forward in it."""
        # o(a, b) = 1: a comes before b (linear ordering: antisymmetric, transitive); edges
        # into head (cm.exempt) may return to the coordinator.
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        self.o = {}
        for a in range(N):
            for b in range(a + 1, N):
                v = pulp.LpVariable(f"o_{a}_{b}", cat="Binary")
                self.o[(a, b)], self.o[(b, a)] = v, 1 - v
        for a in range(N):
            for b in range(N):
                for c_ in range(N):
                    if len({a, b, c_}) == 3 and a < c_:
                        prob += self.o[(a, b)] + self.o[(b, c_)] - self.o[(a, c_)] <= 1, f"tri_{a}_{b}_{c_}"
                        prob += self.o[(c_, b)] + self.o[(b, a)] - self.o[(c_, a)] <= 1, f"tri_{c_}_{b}_{a}"
        for e, ce in self.c.items():
            if cm.exempt[e]:
                continue
            for (a, b), v in ce.items():
                if a != b and not isinstance(v, int):
                    prob += v - self.o[(a, b)] <= 0, f"fwd_{e}_{a}_{b}"
        for r, g in enumerate(self.g):
            for (a, b), v in g.items():
                prob += v - self.o[(a, b)] <= 0, f"gfwd_{r}_{a}_{b}"

    def _position(self, name, row):
        """q[name] in [0, N-1]: the position p[d] of the device d where `row` places its unit."""
        al, M = self._allowed(row), self.cm.n_devices - 1
        if len(al) == 1:
            return self.p[al[0]]
        q = pulp.LpVariable(f"q_{name}", lowBound=0, upBound=M)
        for d in al:
            self.prob.addConstraint(q - self.p[d] + M * row[d] <= M, f"qa_{name}_{d}")
            self.prob.addConstraint(self.p[d] - q + M * row[d] <= M, f"qb_{name}_{d}")
        return q

    def _positions(self) -> None:
        """p, q: device positions (order="pos"); every cut edge and run step goes to a higher position."""
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        self.p = [pulp.LpVariable(f"p_{d}", lowBound=0, upBound=N - 1) for d in range(N)]
        qs: dict = {}
        for e, (u_, v_) in enumerate(cm.edges):
            if e in self.internal or cm.exempt[e]:
                continue
            ku = ("x", u_) if u_ in self.x else ("last", self.run_of[u_])
            kv = ("x", v_) if v_ in self.x else ("first", self.run_of[v_])
            for key, row in ((ku, self._src_row(u_)), (kv, self._dst_row(v_))):
                if key not in qs:
                    qs[key] = self._position(f"{key[0]}{key[1]}", row)
            same = _lin((self.c[e][(d, d)], 1) for d in range(N) if (d, d) in self.c[e])
            prob += _lin([(qs[kv], 1), (qs[ku], -1)]) + same >= 1, f"order_{e}"
        for r, g in enumerate(self.g):
            for (a, b), v in g.items():  # the run passes from a to b: b comes later
                prob += self.p[b] - self.p[a] - N * v >= 1 - N, f"gorder_{r}_{a}_{b}"

    def _activations(self) -> None:
        """act[d]: at least the largest activation buffer (share of capacity) of any block on device d."""
        cm, prob, cap = self.cm, self.prob, self.cap
        self.act = [pulp.LpVariable(f"act_{d}", lowBound=0) for d in range(cm.n_devices)]
        for d in range(cm.n_devices):
            for b in self.singles:
                if cm.act_bytes[b] > 0 and not isinstance(self.x[b][d], int):
                    prob += self.act[d] - (cm.act_bytes[b] / cap[d]) * self.x[b][d] >= 0, f"act_{b}_{d}"
                elif cm.act_bytes[b] > 0 and self.x[b][d] == 1:
                    prob += self.act[d] >= cm.act_bytes[b] / cap[d], f"act_{b}_{d}"
            for r, run in enumerate(self.runs):
                if cm.act_bytes[run[0]] > 0 and not isinstance(self.u[r][d], int):
                    prob += self.act[d] - (cm.act_bytes[run[0]] / cap[d]) * self.u[r][d] >= 0, f"actr_{r}_{d}"

    def _backups(self) -> dict[int, list]:
        """y, bk: each non-coordinator device's share preloaded on exactly one other; returns bk per holder."""
        prob, N, cap = self.prob, self.cm.n_devices, self.cap
        self.y: dict[tuple[int, int], object] = {}
        held: dict[int, list] = {d: [] for d in range(N)}
        if not self.with_backups:
            return held
        for k in range(N):
            if k == self.cm.coordinator or not self.can_hold(k):
                continue
            for h in range(N):
                if h != k:
                    self.y[(k, h)] = pulp.LpVariable(f"y_{k}_{h}", cat="Binary")
            prob += _lin((self.y[(k, h)], 1) for h in range(N) if h != k) == 1, f"backup_{k}"
            for h in range(N):
                if h == k:
                    continue
                terms, big = self.share(k, h)
                bk = pulp.LpVariable(f"bk_{k}_{h}", lowBound=0)
                expr = _lin([(v, w / cap[h]) for v, w in terms])
                prob += bk - expr - (big / cap[h]) * self.y[(k, h)] >= -big / cap[h], f"bk_{k}_{h}"
                held[h].append(bk)
        return held

    def _memory(self, held: dict[int, list]) -> None:
        """Weights, KV cache, activations and held backups within each device's capacity (+ slack if overflow)."""
        prob, mem = self.prob, self.mem
        self.slack = []
        for d in range(self.cm.n_devices):
            used = _lin([(v, w / self.cap[d])
                         for v, w in self.per_device(mem[:, d], [mem[run[0], d] for run in self.runs], d)]
                        + [(self.act[d], 1)] + [(bk, 1) for bk in held[d]])
            if self.overflow:
                s = pulp.LpVariable(f"over_{d}", lowBound=0)
                self.slack.append(s)
                prob += used - s <= 1, f"mem_{d}"
            else:
                prob += used <= 1, f"mem_{d}"

    def _symmetry(self) -> None:
        """Interchangeable devices in a fixed order, the earlier one holding blocks if the later does."""
        prob, B = self.prob, self.cm.n_blocks
        for d1, d2 in identical_pairs(self.cm):
            if self.topology != "full":
                pass
            elif self.order_kind == "lop":
                prob += self.o[(d1, d2)] == 1, f"sym_o_{d1}_{d2}"
            else:
                prob += self.p[d1] - self.p[d2] <= 0, f"sym_p_{d1}_{d2}"
            n1 = _lin(self.per_device([1] * B, [1] * len(self.runs), d1))
            n2 = _lin(self.per_device([1] * B, [1] * len(self.runs), d2))
            prob += n2 - B * n1 <= 0, f"sym_n_{d1}_{d2}"

    def _objective(self) -> None:
        """Minimise the overflow (bytes), the cycle Z (throughput), or all busy time and transfers (latency)."""
        if self.overflow:
            self.prob.setObjective(_lin((s, self.cap[d] / 1e9) for d, s in enumerate(self.slack)))
        elif self.objective == "throughput":
            self.prob.setObjective(_lin([(self.Z, 1)]))
        elif self.objective == "latency":
            self.prob.setObjective(_lin([(e, 1) for e in self.busy] + [(e, 1) for e in self.link.values()]))
        else:
            raise PlanError(f"objective: must be throughput or latency, got {self.objective!r}")

    def can_hold(self, k: int) -> bool:
        """Whether device k can run any block (else its share is always empty)."""
        return (any(not isinstance(row[k], int) for row in self.x.values())
                or any(not isinstance(u[k], int) for u in self.u))

    # -- n-1 --------------------------------------------------------------------------------

    def add_resilience(self, z_max: float) -> None:
        """Objective W: the worst bottleneck after one dropout, with Z <= z_max (scaled)."""
        cm, prob, N = self.cm, self.prob, self.cm.n_devices
        co = cm.coordinator
        ts = cm.compute_s / self.scale
        self.W = W = pulp.LpVariable("W", lowBound=0)
        prob += self.Z <= z_max, "keep_Z"
        scenarios = [k for k in range(N) if k != co]
        # Bytes and messages on each pair, so that a rerouted pair costs a few terms.
        nbytes, msgs, load = {}, {}, {}
        for a, b in self.pairs:
            for name, store, w in (("nb", nbytes, cm.edge_bytes), ("nm", msgs, cm.edge_messages)):
                terms = [(ce[(a, b)], w[e] / 1e6) for e, ce in self.c.items() if (a, b) in ce]
                terms += [(g[(a, b)], w[self.run_edge[r]] / 1e6) for r, g in enumerate(self.g) if (a, b) in g]
                v = store[(a, b)] = pulp.LpVariable(f"{name}_{a}_{b}", lowBound=0)
                prob += v - _lin(terms) == 0, f"{name}_{a}_{b}"
            v = load[(a, b)] = pulp.LpVariable(f"ld_{a}_{b}", lowBound=0)
            prob += v - self.link.get((a, b), 0) == 0, f"ld_{a}_{b}"

        def via(a, b, frm):  # seconds (scaled) of frm's traffic if it ran over a -> b
            return [(nbytes[frm], 1e6 / cm.bandwidth[a, b] / self.scale),
                    (msgs[frm], 1e6 * cm.latency[a, b] / self.scale)]

        plain = set()
        for k in scenarios:
            plain.update(("dev", d) for d in range(N) if d != k)
            plain.update(("link", a, b) for a, b in self.pairs if k not in (a, b))
        for item in sorted(plain):
            if item[0] == "dev":
                prob += self.busy[item[1]] - W <= 0, f"w_dev_{item[1]}"
            else:
                prob += load[item[1:]] - W <= 0, f"w_link_{item[1]}_{item[2]}"
        for k in scenarios:
            for h in range(N):
                if (k, h) not in self.y:
                    continue
                y = self.y[(k, h)]
                # h runs its own blocks and k's
                big = float(ts[:, h].sum())
                extra = _lin(self.per_device(ts[:, h], [ts[run[0], h] for run in self.runs], k))
                prob += self.busy[h] + extra + big * y - W <= big, f"w_take_{k}_{h}"
                # k's links now start or end at h
                for j in range(N):
                    if j in (k, h):
                        continue
                    for a, b, frm in ((h, j, (k, j)), (j, h, (j, k))):
                        big_l = float(cm.edge_s[:, a, b].sum() / self.scale)
                        prob += (_lin([(load[(a, b)], 1)] + via(a, b, frm)) + big_l * y - W <= big_l,
                                 f"w_route_{k}_{h}_{a}_{b}")
        prob.setObjective(_lin([(W, 1)]))

    # -- solving ----------------------------------------------------------------------------

    def solve(self, time_limit_s: float | None, threads: int | None = None, warm: bool = False) -> dict:
        """One solver run: {"status": optimal | feasible | infeasible | no solution,
        "objective", "bound" (when the solver gives one), "result", "seconds"}."""
        return solvers.solve(self.prob, self.solver, time_limit_s, threads, warm)

    def topology_vars(self) -> list:
        """Binaries that only say how devices are ordered and linked (not what they hold)."""
        out = [v for f in self.f0 + self.f1 for v in f if not isinstance(v, int)]
        out += [v for g in self.g for v in g.values()]
        if self.order_kind == "lop" and self.cm.n_devices > 1 and self.topology == "full":
            out += [v for (a, b), v in self.o.items() if a < b]
        return out

    def _fix_idle_order(self) -> None:
        """With holdings fixed, devices that hold nothing take no part in the order: put
        them last, by index, so that the solver does not branch over their places."""
        if self.order_kind != "lop" or self.cm.n_devices < 2 or self.topology != "full":
            return
        N = self.cm.n_devices

        def val(v):
            return v if isinstance(v, (int, float)) else (v.value() or 0.0)

        used = set()
        for row in self.x.values():
            used.update(d for d in range(N) if val(row[d]) > 0.5)
        for row in self.n:
            used.update(d for d in range(N) if val(row[d]) > 0.5)
        for a in range(N):
            for b in range(a + 1, N):
                if a in used and b in used:
                    continue
                v = self.o[(a, b)]  # o(a, b) = v, o(b, a) = 1 - v
                v.lowBound = v.upBound = 0 if (a not in used and b in used) else 1

    def relaxed_placement(self) -> tuple[list[int], dict] | None:
        """(assign, backups) from this model's solution where its topology is "ends" (stage 0
        of solve_staged): its holdings and backups, and each run's layers on a path from the
        device of its first layer (f0) to that of its last (f1) through its other devices:
        one whose every step's link carries the run's edge within this solution's cycle Z
        (a depth-first search, fastest links first, of bounded length), else each step to
        the device of the fastest link. Where f0 and f1 are one device and the run has
        others, that device's layers come first or last (the path is then built from it
        forwards or backwards), whichever makes a placement of the lesser cycle. None if no
        such choice is a placement."""
        if self.topology != "ends":
            return None
        cm, N = self.cm, self.cm.n_devices

        def val(v):
            return v if isinstance(v, int) else (v.value() or 0.0)

        limit, budget = val(self.Z), [0]

        def within(path, todo, end, es):  # a path on from `path` through `todo`, every link within limit
            budget[0] -= 1
            if budget[0] < 0:
                return None
            if not todo:
                return path if end is None or es[path[-1], end] <= limit else None
            for d in sorted(todo, key=lambda d: (es[path[-1], d], d)):
                if es[path[-1], d] > limit:
                    break
                found = within(path + [d], todo - {d}, end, es)
                if found is not None:
                    return found
            return None

        def fastest(start, between, es):  # each step to the fastest link
            path, todo = [start], set(between)
            while todo:
                path.append(min(sorted(todo), key=lambda d: es[path[-1], d]))
                todo.discard(path[-1])
            return path

        def path_of(start, between, end, es):  # start -> between -> end (None: wherever)
            budget[0] = 20000
            path = within([start], frozenset(between), end, es) or fastest(start, between, es)
            return path + ([end] if end is not None else [])

        base = [-1] * cm.n_blocks
        for b, row in self.x.items():
            base[b] = int(np.argmax([val(v) for v in row]))
        options = []  # per run: [(path, counts)]
        for r, run in enumerate(self.runs):
            counts = {d: int(round(val(self.n[r][d]))) for d in range(N)}
            devs = {d for d, c in counts.items() if c > 0}
            first = int(np.argmax([val(v) for v in self.f0[r]]))
            last = int(np.argmax([val(v) for v in self.f1[r]]))
            if first not in devs or last not in devs or sum(counts.values()) != len(run):
                return None
            es = self.es[self.run_edge[r]]
            if len(devs) == 1:
                paths = [[first]]
            elif first != last:
                paths = [path_of(first, devs - {first, last}, last, es)]
            else:
                paths = [path_of(first, devs - {first}, None, es),
                         path_of(first, devs - {first}, None, es.T)[::-1]]
            options.append([(p, counts) for p in paths])
        best = None
        for choice in itertools.product(*options):
            out = list(base)
            for run, (path, counts) in zip(self.runs, choice):
                layers = iter(run)
                for d in path:
                    for _ in range(counts[d]):
                        out[next(layers)] = d
            if cm.structure_problems(out):
                continue
            cycle = cm.evaluate(out).cycle_s(self.in_flight)
            if best is None or cycle < best[0]:
                best = (cycle, out)
        return None if best is None else (best[1], self.backups())

    def holding_vars(self) -> list:
        """Integers that say what each device holds: singles x, run counts n and their use u."""
        out = [v for row in self.x.values() for v in row if not isinstance(v, int)]
        out += [v for rows in (self.n, self.u) for row in rows for v in row if not isinstance(v, int)]
        return out

    def solve_staged(self, time_limit_s: float | None, threads: int | None = None,
                     lower: float | None = None, setup=None, start=None) -> dict:
        """Solve to optimality in stages (CBC alone finds good placements slowly). `lower`: a
        proven lower bound on the objective (scaled; e.g. planner.relaxed_cycle's), or None;
        `setup`: what was done to this model after it was built (e.g. add_resilience), to be
        done to stage 0's model too; `start`: (assign, backups), a placement to start from.

        0. holdings only (`topology=STAGE0_TOPOLOGY`: no order of the devices): a lower
           bound, and holdings;
        1. stage 0's placement (`relaxed_placement`), everything fixed; then holdings fixed
           at stage 0's, topology integral: placements; one that meets the bound is optimal;
        2. topology relaxed (orders and links fractional, holdings integral), started from
           the best placement: a tighter bound; then holdings fixed at its holdings, if they
           are not stage 0's: another placement;
        3. otherwise the whole ILP, started from the best placement.

        Each bound is a cut (objective >= bound) in the stages after it: valid, since every
        stage before 3 is a relaxation or a restriction of the whole ILP, and it lets CBC stop
        as soon as it has a placement at the bound. The answer is optimal only where a
        placement meets a bound.
        """
        t0 = time.perf_counter()

        def left():
            return None if time_limit_s is None else max(0.5, time_limit_s - (time.perf_counter() - t0))

        topo, hold = self.topology_vars(), self.holding_vars()
        stages: list[dict] = []
        best: list = []  # [objective, assign, backups] of the best placement found
        bound = [lower]

        def raise_bound(b):
            if b is not None and math.isfinite(b) and (bound[0] is None or b > bound[0]):
                bound[0] = b
            if bound[0] is not None:
                self._lower_cut(bound[0])

        def proven() -> bool:
            return bool(best) and bound[0] is not None and best[0] <= bound[0] + 1e-9 * max(1.0, abs(bound[0]))

        def optimal() -> dict:
            return {"status": "optimal", "objective": best[0], "bound": bound[0], "stages": stages,
                    "seconds": time.perf_counter() - t0, "assign": best[1], "backups": best[2]}

        ys = list(self.y.values())

        def holdings_fixed(values: dict, name: str) -> None:
            saved = [(v, v.lowBound, v.upBound) for v in hold + topo + ys]
            for v in hold:
                v.lowBound = v.upBound = values.get(v.name, 0)
                v.setInitialValue(values.get(v.name, 0))
            for v in topo + ys:  # and those of the others given
                if v.name in values:
                    v.lowBound = v.upBound = values[v.name]
                    v.setInitialValue(values[v.name])
            self._fix_idle_order()
            s = self.solve(left(), threads)
            for v, lo, hi in saved:
                v.lowBound, v.upBound = lo, hi
            stages.append({"stage": name, "status": s["status"], "seconds": round(s["seconds"], 4),
                           "objective": s.get("objective")})
            if s["status"] in ("optimal", "feasible"):
                obj = s.get("objective", pulp.value(self.prob.objective))
                if not best or obj < best[0]:
                    best[:] = [obj, self.assignment(), self.backups()]

        raise_bound(None)
        # stage 0: the holdings alone
        m0 = PlacementModel(self.cm, objective=self.objective, backups=self.with_backups, symmetry=self.symmetry,
                            runs=self.use_runs, order=self.order_kind, in_flight=self.in_flight,
                            solver=self.solver, topology=STAGE0_TOPOLOGY)
        if setup is not None:
            setup(m0)
        if bound[0] is not None:
            m0._lower_cut(bound[0])
        if start is not None:
            m0.set_start(*start)
        s0 = m0.solve(left(), threads, warm=start is not None)
        stages.append({"stage": "holdings only", "status": s0["status"], "seconds": round(s0["seconds"], 4),
                       "objective": s0.get("objective")})
        if s0["status"] == "infeasible":  # a relaxation: nothing fits the whole ILP either
            return {"status": "infeasible", "stages": stages}
        raise_bound(s0.get("objective") if s0["status"] == "optimal" else s0.get("bound"))
        values0 = None
        if s0["status"] in ("optimal", "feasible"):
            values0 = {v.name: round(v.value() or 0) for v in m0.holding_vars()}
            placed = m0.relaxed_placement()
            if placed is not None:
                # its holdings and backups, each run's layers along a path of fast links
                # between the devices of its first and last layers: all fixed
                self.set_start(*placed)
                holdings_fixed({v.name: round(v.varValue) for v in hold + topo + ys if v.varValue is not None},
                               "stage 0's placement")
                if proven():
                    return optimal()
            holdings_fixed(values0, "holdings fixed (stage 0's)")
            if proven():
                return optimal()
        # stage 2: topology relaxed
        for v in topo:
            v.cat = pulp.LpContinuous
        if best or start is not None:
            self.set_start(*(best[1:] if best else start))
        s1 = self.solve(left(), threads, warm=bool(best) or start is not None)
        for v in topo:
            v.cat = pulp.LpInteger
        stages.append({"stage": "topology relaxed", "status": s1["status"], "seconds": round(s1["seconds"], 4)})
        if s1["status"] == "infeasible":
            return {"status": "infeasible", "stages": stages}
        raise_bound(s1.get("objective") if s1["status"] == "optimal" else s1.get("bound"))
        if proven():
            return optimal()
        if s1["status"] in ("optimal", "feasible"):
            values1 = {v.name: round(v.value() or 0) for v in hold}
            if values1 != values0:
                holdings_fixed(values1, "holdings fixed")
                if proven():
                    return optimal()
        # stage 3: the whole ILP
        if best or start is not None:
            self.set_start(*(best[1:] if best else start))
        s3 = self.solve(left(), threads, warm=bool(best) or start is not None)
        stages.append({"stage": "full", "status": s3["status"], "seconds": round(s3["seconds"], 4)})
        s3["stages"] = stages
        if s3["status"] in ("optimal", "feasible"):
            s3["assign"], s3["backups"] = self.assignment(), self.backups()
            if best and s3["status"] == "feasible" and best[0] < s3["objective"]:
                s3.update(objective=best[0], assign=best[1], backups=best[2])
        elif s3["status"] == "no solution" and best:
            # stopped at the time limit: an earlier stage's placement is still a placement
            s3.update(status="feasible", objective=best[0], assign=best[1], backups=best[2])
        if bound[0] is not None and s3["status"] == "feasible":
            s3["bound"] = max(s3.get("bound", bound[0]), bound[0])
        s3["seconds"] = time.perf_counter() - t0
        return s3

    def _lower_cut(self, lower: float) -> None:
        """The row objective >= `lower` (a proven lower bound, scaled), replacing an earlier one."""
        self.prob.constraints.pop("lower_bound", None)
        # a hair below the bound: it is a solver's optimum, exact to its tolerances only
        self.prob += _lin([(self.prob.objective, 1)]) >= lower * (1 - 1e-6), "lower_bound"

    def assignment(self) -> list[int]:
        """Rank of every block in the solver's solution."""
        def val(v):
            return v if isinstance(v, int) else (v.value() or 0.0)

        out = [-1] * self.cm.n_blocks
        for b, row in self.x.items():
            out[b] = int(np.argmax([val(v) for v in row]))
        for r, run in enumerate(self.runs):
            N = self.cm.n_devices
            d = int(np.argmax([val(v) for v in self.f0[r]]))
            order = [d]
            while val(self.f1[r][d]) < 0.5:
                d = next(b for b in range(N) if (d, b) in self.g[r] and val(self.g[r][(d, b)]) > 0.5)
                order.append(d)
                assert len(order) <= N, "run path does not end"
            i = 0
            for d in order:
                for _ in range(int(round(val(self.n[r][d])))):
                    out[run[i]] = d
                    i += 1
            assert i == len(run), f"run {r}: counts add up to {i}, not {len(run)}"
        return out

    def backups(self) -> dict[int, int]:
        return {k: h for (k, h), v in self.y.items() if (v.value() or 0) > 0.5}

    def set_start(self, assign, backups) -> None:
        """Give CBC a starting placement (warm start)."""
        def put(v, value):
            if not isinstance(v, int):
                v.setInitialValue(value)

        for b, row in self.x.items():
            for d, v in enumerate(row):
                put(v, 1 if assign[b] == d else 0)
        for r, run in enumerate(self.runs):
            seq = [assign[b] for b in run]
            order = [d for i, d in enumerate(seq) if i == 0 or seq[i - 1] != d]
            for d in range(self.cm.n_devices):
                put(self.n[r][d], seq.count(d))
                put(self.u[r][d], int(d in seq))
                put(self.f0[r][d], int(d == seq[0]))
                put(self.f1[r][d], int(d == seq[-1]))
            pairs = set(zip(order, order[1:]))
            for key, v in self.g[r].items():
                put(v, int(key in pairs))
        for (k, h), v in self.y.items():
            v.setInitialValue(1 if backups.get(k) == h else 0)
        if self.topology == "full" and self.order_kind == "lop" and self.cm.n_devices > 1:
            pos = {d: i for i, d in enumerate(self.device_order(assign))}
            for (a, b), v in self.o.items():
                if a < b:
                    v.setInitialValue(int(pos[a] < pos[b]))

    def device_order(self, assign) -> list[int]:
        """Devices in an order that every cut edge (edges into head excepted) of `assign` goes
        forward in, the devices it leaves idle last (by index, as `_fix_idle_order`)."""
        cm = self.cm
        used = sorted(set(assign))
        dg = nx.DiGraph()
        dg.add_nodes_from(used)
        dg.add_edges_from((assign[u], assign[v]) for e, (u, v) in enumerate(cm.edges)
                          if not cm.exempt[e] and assign[u] != assign[v])
        try:
            order = list(nx.lexicographical_topological_sort(dg))
        except nx.NetworkXUnfeasible:  # not a placement of this model: any order (the start is then refused)
            order = used
        return order + [d for d in range(cm.n_devices) if d not in dg]


def find_runs(cm: CostModel) -> list[list[int]]:
    """Maximal chains (length >= 2) of identical consecutive layers: same kind, same costs on
    every device, one edge in and one out, and the same bytes on every edge between them."""
    outs: dict[int, list[int]] = {}
    ins: dict[int, list[int]] = {}
    for e, (u, v) in enumerate(cm.edges):
        outs.setdefault(u, []).append(e)
        ins.setdefault(v, []).append(e)

    def same(a, b):
        return (cm.kinds[a] == cm.kinds[b] and cm.kinds[a] in LAYER_KINDS
                and np.array_equal(cm.compute_s[a], cm.compute_s[b])
                and np.array_equal(cm.mem_bytes[a], cm.mem_bytes[b])
                and cm.act_bytes[a] == cm.act_bytes[b])

    def link(e):  # the edge joins two identical layers of one chain
        u, v = cm.edges[e]
        return len(outs.get(u, [])) == 1 and len(ins.get(v, [])) == 1 and same(u, v)

    def same_edge(e1, e2):
        return (cm.edge_bytes_prefill[e1] == cm.edge_bytes_prefill[e2]
                and cm.edge_bytes_decode[e1] == cm.edge_bytes_decode[e2])

    runs, seen = [], set()
    for b in range(cm.n_blocks):
        if b in seen:
            continue
        # b starts a run if no identical layer links into it
        if len(ins.get(b, [])) == 1 and link(ins[b][0]):
            continue
        run, prev_edge = [b], None
        while len(outs.get(run[-1], [])) == 1 and link(outs[run[-1]][0]):
            e = outs[run[-1]][0]
            v = cm.edges[e][1]
            if prev_edge is not None and not same_edge(prev_edge, e):
                if len(run) >= 2:  # the bytes change here: this edge is a boundary
                    runs.append(run)
                seen.update(run)
                run, prev_edge = [v], None
                continue
            prev_edge = e
            run.append(v)
        seen.update(run)
        if len(run) >= 2:
            runs.append(run)
    return runs


def identical_pairs(cm: CostModel) -> list[tuple[int, int]]:
    """Consecutive pairs (d1 < d2) of interchangeable non-coordinator devices."""
    N = cm.n_devices
    others = [d for d in range(N) if d != cm.coordinator]

    def same(d1, d2):
        if not (np.array_equal(cm.compute_s[:, d1], cm.compute_s[:, d2])
                and np.array_equal(cm.mem_bytes[:, d1], cm.mem_bytes[:, d2])
                and cm.capacity[d1] == cm.capacity[d2]):
            return False
        for m in (cm.bandwidth, cm.latency):
            if m[d1, d2] != m[d2, d1]:
                return False
            for e in range(N):
                if e not in (d1, d2) and (m[d1, e] != m[d2, e] or m[e, d1] != m[e, d2]):
                    return False
        return True

    classes: list[list[int]] = []
    for d in others:
        for cls in classes:
            if same(cls[0], d):
                cls.append(d)
                break
        else:
            classes.append([d])
    return [(a, b) for cls in classes for a, b in zip(cls, cls[1:])]


def solve_ilp(cm: CostModel, *, objective: str = "throughput", backups: bool = True,
              resilience: str = "none", resilience_slack: float = 0.0, time_limit_s: float = 60.0,
              threads: int | None = None, start: tuple[list[int], dict] | None = None,
              solver: str = "cbc", lower_bound: float | None = None,
              throughput: Solution | None = None) -> Solution:
    """Optimal placement of `cm`'s blocks (and backups) under its cost model, by `solver`
    (`SOLVERS`: cbc, or highs where highspy is installed; check_solver says why not).

    `lower_bound` (seconds, objective throughput): a proven lower bound on the cycle (e.g.
    `planner.relaxed_cycle`), a cut for the solver. `throughput` (resilience n-1): this
    function's answer for the same `cm` with resilience none, so that the n-1 phase starts
    from it rather than solving the throughput phase again.

    Raises InfeasiblePlanError (by how many bytes, on which devices) when nothing fits,
    PlanError when the time limit passes before any placement is found.
    """
    check_solver(solver)
    if resilience not in ("none", "n-1"):
        raise PlanError(f"resilience: must be none or n-1, got {resilience!r}")
    if resilience == "n-1" and objective != "throughput":
        raise PlanError("--resilience n-1 goes with --objective throughput (it ranks plans by throughput)")
    if resilience == "n-1" and not backups:
        raise PlanError("--resilience n-1 needs backups (drop --no-backups)")
    t0 = time.perf_counter()
    model = PlacementModel(cm, objective=objective, backups=backups, solver=solver)
    build_s = time.perf_counter() - t0
    if throughput is not None and resilience == "n-1" and throughput.status in ("optimal", "feasible"):
        # the throughput phase, solved before: its answer, in this model's units
        info = {"status": throughput.status, "objective": throughput.objective / model.scale,
                "bound": throughput.bound / model.scale, "assign": list(throughput.assign),
                "backups": dict(throughput.backups), "stages": throughput.phases[0]["stages"]}
        phases = [dict(throughput.phases[0], reused=True)]
        if throughput.status == "optimal":
            model._lower_cut(info["objective"])
    else:
        lower = lower_bound / model.scale if lower_bound is not None and objective == "throughput" else None
        info = model.solve_staged(time_limit_s, threads, lower=lower)
        phases = [{"phase": objective, "status": info["status"], "build_s": round(build_s, 4),
                   "solve_s": round(info.get("seconds", 0.0), 4), "stages": info["stages"]}]
    if info["status"] == "infeasible":
        raise InfeasiblePlanError(diagnose_memory(cm, backups, solver))
    if info["status"] == "no solution" and objective == "throughput" and not (resilience == "n-1"):
        fallback = _baseline_fallback(cm, backups)
        if fallback is not None:
            log.warning("no ILP placement within %g s: using the chain-dp placement (status heuristic)",
                        time_limit_s)
            assign, bk = fallback
            ev = cm.evaluate(assign)
            phases[0]["fallback"] = "chain-dp"
            return Solution(assign=assign, backups=bk, status="heuristic", objective=ev.cycle_s(cm.customers),
                            bound=math.nan, gap=math.nan, seconds=time.perf_counter() - t0, solver=SOLVERS[solver],
                            phases=phases)
    if info["status"] == "no solution":
        raise PlanError(f"the solver found no placement within the time limit of {time_limit_s:g} s "
                        f"({info.get('result', 'stopped')}); raise --time-limit")
    assign, bk = info["assign"], info["backups"]
    scale = model.scale
    status = info["status"]
    obj = info["objective"] * scale
    bound = obj if status == "optimal" else info.get("bound", math.nan) * scale
    if resilience == "n-1":
        z = max(cm.evaluate(assign).cycle_s(model.in_flight) / scale, info["objective"])
        left = None if time_limit_s is None else max(1.0, time_limit_s - (time.perf_counter() - t0))
        t1 = time.perf_counter()
        z_max = z * (1 + resilience_slack) + 1e-9
        model.add_resilience(z_max)
        build2 = time.perf_counter() - t1
        info2 = model.solve_staged(left, threads, setup=lambda m: m.add_resilience(z_max), start=(assign, bk))
        phases.append({"phase": "n-1", "status": info2["status"], "build_s": round(build2, 4),
                       "solve_s": round(info2["seconds"], 4), "keep_throughput_within": resilience_slack,
                       "stages": info2["stages"]})
        if info2["status"] in ("optimal", "feasible"):
            assign, bk = info2["assign"], info2["backups"]
            status = "optimal" if status == info2["status"] == "optimal" else "feasible"
            w = info2.get("objective", pulp.value(model.W)) * scale
            phases[-1].update(objective=w, bound=(w if info2["status"] == "optimal"
                                                  else info2.get("bound", math.nan) * scale))
        else:
            log.warning("n-1 phase: %s; keeping the throughput-optimal plan", info2["status"])
            status = "feasible"
    seconds = time.perf_counter() - t0
    gap = 0.0 if status == "optimal" else (abs(obj - bound) / abs(obj) if obj else math.nan)
    if resilience == "n-1" and status != "optimal":
        # the n-1 phase stopped early: its gap is the one that says how far from optimal
        last = phases[-1]
        w, wb = last.get("objective"), last.get("bound")
        if w is not None and wb is not None and math.isfinite(wb) and w:
            last["gap"] = abs(w - wb) / abs(w)
            gap = max(gap if math.isfinite(gap) else 0.0, last["gap"])
        elif last["status"] not in ("optimal",):
            gap = math.nan
    return Solution(assign=assign, backups=bk, status=status, objective=obj, bound=bound, gap=gap,
                    seconds=seconds, solver=SOLVERS[solver], phases=phases)


def _baseline_fallback(cm: CostModel, backups: bool):
    """The chain-dp placement with its backups, if it fits (what the ILP returns when its
    time limit passes before it finds any placement)."""
    try:
        assign = baseline_assign(cm, "chain-dp")
    except InfeasiblePlanError:
        return None
    if memory_overflow(cm, assign):
        return None
    bk = choose_backups(cm, assign) if backups else {}
    return assign, bk


def diagnose_memory(cm: CostModel, backups: bool, solver: str = "cbc") -> str:
    """Why no placement fits, in bytes and devices (solves the least-overflow placement)."""
    names = cm.device_names
    cap = cm.capacity
    fits = cm.mem_bytes + cm.act_bytes[:, None] <= cap[None, :]
    for b in range(cm.n_blocks):
        need = cm.mem_bytes[b] + cm.act_bytes[b]
        if b in cm.pinned:
            if not fits[b, cm.coordinator]:
                short = int(need[cm.coordinator] - cap[cm.coordinator])
                return (f"{cm.blocks[b]} must run on the coordinator {names[cm.coordinator]}, which is "
                        f"{short:,} bytes short for it ({int(need[cm.coordinator]):,} needed, "
                        f"{int(cap[cm.coordinator]):,} available)")
        elif not fits[b].any():
            d = int(np.argmax(cap - need))
            return (f"{cm.blocks[b]} fits on no device: it needs {int(need[d]):,} bytes (weights, KV cache "
                    f"for {cm.workload.in_flight} requests in flight, activations); the best, "
                    f"{names[d]}, is {int(need[d] - cap[d]):,} bytes short")
    model = PlacementModel(cm, objective="throughput", backups=backups, overflow=True, solver=solver)
    info = model.solve(60.0)
    if info["status"] not in ("optimal", "feasible"):
        return "no placement fits in memory (the least-overflow placement was not found in 60 s)"
    over = [(names[d], s.value() * cap[d]) for d, s in enumerate(model.slack) if (s.value() or 0) > 1e-9]
    total = sum(v for _, v in over)
    parts = ", ".join(f"{n} by {int(math.ceil(v)):,} bytes" for n, v in over)
    what = "the model and one backup of every non-coordinator device's share" if backups else "the model"
    msg = (f"{what} does not fit in the devices' memory: {int(math.ceil(total)):,} bytes short in the "
           f"closest placement ({parts}); total capacity {int(cap.sum()):,} bytes")
    if backups:
        m2 = PlacementModel(cm, objective="throughput", backups=False, overflow=True, solver=solver)
        i2 = m2.solve(60.0)
        if i2["status"] == "optimal" and sum((s.value() or 0) for s in m2.slack) < 1e-9:
            msg += "; it fits without backups (--no-backups), but then no dropout is survived"
    return msg
