"""Baseline placements, in the same plan format as the ILP's, for comparison.

All cut the blocks as one chain, in an order that keeps every edge pointing forward:
text.embed, the vision branch (vision.embed, layers, projector), merge, the decoder
layers; the head goes back to the coordinator (rank 0), which also takes the first
segment. Devices take contiguous segments in rank order.

- `uniform`: equal numbers of layers (vision and decoder layers alike) per device, the
  other blocks riding with the next layer: what one does knowing nothing of the devices.
- `memory`: layers in proportion to each device's memory (exo's default partitioning).
- `compute`: each device's share of the compute in proportion to its speed (1 / its time
  for the whole model), filled greedily along the chain, moving on early where memory runs out.
- `chain-dp`: the optimal contiguous split of the chain, device order included, minimising
  the bottleneck (largest stage compute or link transfer) under memory, by dynamic
  programming over (devices used, last block, last device) as in PipeEdge (Hu et al.,
  2022). Exact over device orders up to `DP_MAX_SUBSET` devices; beyond, devices keep one
  order, fastest first (each may be skipped), and the DP is over (last block, last device) alone.

A baseline never looks at the DAG beyond the chain; its placement is then costed by the
same `CostModel` as the ILP's. Backups are chosen for it by `choose_backups`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pulp

from partitioner.costs import CostModel
from partitioner.errors import InfeasiblePlanError
from partitioner.vocab import LAYER_KINDS

log = logging.getLogger(__name__)

BASELINES = ("uniform", "memory", "compute", "chain-dp")
DP_MAX_SUBSET = 8


def chain_order(cm: CostModel) -> list[int]:
    """Block indices in chain order (head left out: it is pinned to the coordinator)."""
    first = [b for b in range(cm.n_blocks) if cm.kinds[b] == "text_embed"]
    rest = [b for b in range(cm.n_blocks) if cm.kinds[b] not in ("text_embed", "head")]
    return first + rest  # cm.blocks is topological with the vision branch first


def _head(cm: CostModel) -> list[int]:
    return [b for b in range(cm.n_blocks) if cm.kinds[b] == "head"]


def _from_counts(cm: CostModel, chain: list[int], ends: Sequence[int], devices: Sequence[int]) -> list[int]:
    """Placement from segment ends (exclusive indices into `chain`) for `devices` in order."""
    assign = [cm.coordinator] * cm.n_blocks
    lo = 0
    for hi, d in zip(ends, devices):
        for b in chain[lo:hi]:
            assign[b] = d
        lo = hi
    assert lo == len(chain)
    for b in _head(cm):
        assign[b] = cm.coordinator
    return assign


def _split_by_weight(weights: np.ndarray, shares: np.ndarray) -> list[int]:
    """Segment ends so that segment d's weight is closest to shares[d] of the total.

    Each cut goes where the running weight is nearest to the cumulative share; a
    zero-weight block rides with the next weighted one."""
    total = float(weights.sum())
    cum = np.concatenate([[0.0], np.cumsum(weights)])
    targets = np.cumsum(shares / shares.sum())[:-1] * total
    ends = []
    lo = 0
    weighted = np.nonzero(weights > 0)[0]
    for t in targets:
        # candidate cut positions: just before a weighted block (or the end)
        cands = [int(i) for i in weighted if i >= lo] + [len(weights)]
        best = min(cands, key=lambda i: (abs(cum[i] - t), i))
        ends.append(best)
        lo = best
    ends.append(len(weights))
    return ends


def uniform(cm: CostModel) -> list[int]:
    chain = chain_order(cm)
    w = np.array([1.0 if cm.kinds[b] in LAYER_KINDS else 0.0 for b in chain])
    if not w.any():
        w[:] = 1.0
    ends = _split_by_weight(w, np.ones(cm.n_devices))
    return _from_counts(cm, chain, ends, range(cm.n_devices))


def memory(cm: CostModel) -> list[int]:
    chain = chain_order(cm)
    w = np.array([1.0 if cm.kinds[b] in LAYER_KINDS else 0.0 for b in chain])
    if not w.any():
        w[:] = 1.0
    ends = _split_by_weight(w, cm.capacity.astype(float))
    return _from_counts(cm, chain, ends, range(cm.n_devices))


def compute(cm: CostModel) -> list[int]:
    """Greedy: device d fills up to its speed share of the work, within its memory."""
    chain = chain_order(cm)
    N = cm.n_devices
    speed = 1.0 / np.maximum(cm.compute_s.sum(axis=0), 1e-30)           # [N] whole models per s
    share = speed / speed.sum()
    head = _head(cm)
    assign = [cm.coordinator] * cm.n_blocks
    i = 0
    for d in range(N):
        used = sum(cm.mem_bytes[b, d] for b in head) if d == cm.coordinator else 0.0
        act = max([cm.act_bytes[b] for b in head], default=0.0) if d == cm.coordinator else 0.0
        frac = sum(cm.compute_s[b, d] for b in head) / cm.compute_s[:, d].sum() if d == cm.coordinator else 0.0
        total_d = cm.compute_s[:, d].sum()
        while i < len(chain):
            b = chain[i]
            if d < N - 1:
                step = cm.compute_s[b, d] / total_d
                if frac + step / 2 > share[d] and frac > 0:
                    break
                if used + cm.mem_bytes[b, d] + max(act, cm.act_bytes[b]) > cm.capacity[d] and (used > 0 or d != cm.coordinator):
                    break
                frac += step
            assign[b] = d
            used += cm.mem_bytes[b, d]
            act = max(act, cm.act_bytes[b])
            i += 1
    return assign


def chain_dp(cm: CostModel) -> list[int]:
    """PipeEdge-style optimal contiguous split (see module docstring)."""
    chain = chain_order(cm)
    L, N, co = len(chain), cm.n_devices, cm.coordinator
    head = _head(cm)
    pos = {b: i for i, b in enumerate(chain)}
    # prefix sums along the chain: time and memory of chain[i:j] on device d
    t_pre = np.vstack([np.zeros(N), np.cumsum(cm.compute_s[chain], axis=0)])          # [L+1, N]
    m_pre = np.vstack([np.zeros(N), np.cumsum(cm.mem_bytes[chain], axis=0)])          # [L+1, N]
    act = cm.act_bytes[chain]                                                         # [L]
    # bytes and messages crossing the cut before chain position i (edges from < i to >= i),
    # but for the edges out of chain[0] (text.embed -> merge, across the vision branch):
    # chain[0] is always on the coordinator, so such an edge is one transfer from it to the
    # device of its head, charged there (as the cost model does), not once per cut it spans.
    # jump_*[j]: bytes and messages of those edges whose head is in chain[:j].
    cut_bytes, cut_msgs = np.zeros(L + 1), np.zeros(L + 1)
    jump_bytes, jump_msgs = np.zeros(L + 1), np.zeros(L + 1)
    for e, (u, v) in enumerate(cm.edges):
        if u in pos and v in pos:
            lo, hi = sorted((pos[u], pos[v]))
            if lo == 0 and pos[u] == 0:
                jump_bytes[hi + 1:] += cm.edge_bytes[e]
                jump_msgs[hi + 1:] += cm.edge_messages[e]
                continue
            cut_bytes[lo + 1:hi + 1] += cm.edge_bytes[e]
            cut_msgs[lo + 1:hi + 1] += cm.edge_messages[e]
    tail = [e for e, (u, v) in enumerate(cm.edges) if v in head and u in pos]  # into the head
    head_t = sum(cm.compute_s[b, co] for b in head)
    head_m = sum(cm.mem_bytes[b, co] for b in head)
    head_act = max([cm.act_bytes[b] for b in head], default=0.0)

    def seg_costs(i, d):
        """[L - i] compute seconds of chain[i:j] on d for j = i+1..L; inf where it does not fit."""
        t = t_pre[i + 1:, d] - t_pre[i, d]
        w = m_pre[i + 1:, d] - m_pre[i, d]
        a = np.maximum.accumulate(act[i:])            # activation buffer: the largest output
        if d == co:
            t, w, a = t + head_t, w + head_m, np.maximum(a, head_act)
        m = w + a
        return np.where(m <= cm.capacity[d], t, np.inf)

    def link_s(i, a, b):
        return cut_bytes[i] / cm.bandwidth[a, b] + cut_msgs[i] * cm.latency[a, b]

    def end_link(d):
        if d == co:
            return 0.0
        return float(sum(cm.edge_bytes[e] / cm.bandwidth[d, co] + cm.edge_messages[e] * cm.latency[d, co]
                         for e in tail))

    others = [d for d in range(N) if d != co]
    subset = N <= DP_MAX_SUBSET
    # without subsets, devices follow one order: fastest first (the coordinator leads)
    place = {d: i for i, d in enumerate(sorted(others, key=lambda d: cm.compute_s[:, d].sum()))}
    place[co] = -1
    # state: (set of devices used, as a bit mask; chain[:i] placed; last device d)
    # best[mask][i, d] = least bottleneck so far; back[mask][i, d] = (previous mask, i, d)
    best: dict[int, np.ndarray] = {}
    back: dict[tuple, tuple] = {}
    start = 1 << co
    best[start] = np.full((L + 1, N), np.inf)
    best[start][1:, co] = seg_costs(0, co)
    result, at = math.inf, None
    masks = [start]
    seen = {start}
    while masks:
        mask = min(masks)
        masks.remove(mask)
        table = best[mask]
        # ascending i, reading live rows: without subsets all states share one table
        for i, d in ((i, d) for i in range(L + 1) for d in np.nonzero(np.isfinite(table[i]))[0]):
            val = table[i, d]
            if val >= result:
                continue
            if i == L:
                total = max(val, end_link(d))
                if total < result:
                    result, at = total, (mask, i, d)
                continue
            for v in others:
                if mask >> v & 1 or (not subset and place[v] < place[d]):
                    continue
                lk = link_s(i, d, v)
                if max(val, lk) >= result:
                    continue
                # edges out of chain[0] whose head lands in chain[i:j], for j = i+1..L
                jb, jm = jump_bytes[i + 1:] - jump_bytes[i], jump_msgs[i + 1:] - jump_msgs[i]
                jl = jb / cm.bandwidth[co, v] + jm * cm.latency[co, v]
                lk = lk + jl if d == co else np.maximum(lk, jl)  # the same link, or one of its own
                cost = np.maximum(np.maximum(val, lk), seg_costs(i, v))    # [L - i] for j = i+1..L
                m2 = mask | (1 << v) if subset else mask
                if m2 not in best:
                    best[m2] = np.full((L + 1, N), np.inf)
                col = best[m2][i + 1:, v]
                better = np.nonzero(cost < col)[0]
                if len(better):
                    col[better] = cost[better]
                    for j in better:
                        back[(m2, i + 1 + j, v)] = (mask, i, d)
                    if m2 not in seen:
                        seen.add(m2)
                        masks.append(m2)
    if at is None:
        raise InfeasiblePlanError("chain-dp: no contiguous split of the chain fits in the devices' memory")
    ends, devs = [], []
    key = at
    while key is not None:
        ends.append(int(key[1]))
        devs.append(int(key[2]))
        key = back.get(key)
    return _from_counts(cm, chain, ends[::-1], devs[::-1])


def baseline_assign(cm: CostModel, name: str) -> list[int]:
    """The placement of baseline `name` (one of BASELINES)."""
    return {"uniform": uniform, "memory": memory, "compute": compute, "chain-dp": chain_dp}[name](cm)


# ----------------------------------------------------------------------------------------------
# backups for a fixed placement


def choose_backups(cm: CostModel, assign: Sequence[int], time_limit_s: float = 20.0) -> dict[int, int]:
    """Holders for a fixed placement: as many non-coordinator shares backed up as fit in
    memory, then the smallest worst bottleneck after one dropout. {failed rank: holder}."""
    N, co = cm.n_devices, cm.coordinator
    shares = [k for k in range(N) if k != co and any(d == k for d in assign)]
    if not shares:
        return {}
    base = cm.memory(assign)["total"]
    room = cm.capacity - base
    need = {(k, h): cm.share_memory(assign, k, on=h) for k in shares for h in range(N) if h != k}
    bn = {(k, h): cm.evaluate(cm.after_dropout(assign, k, h)).bottleneck_s for k, h in need}
    scale = max(bn.values()) or 1.0
    prob = pulp.LpProblem("backups", pulp.LpMinimize)
    y = {kh: pulp.LpVariable(f"y_{kh[0]}_{kh[1]}", cat="Binary") for kh in need if need[kh] <= room[kh[1]]}
    W = pulp.LpVariable("W", lowBound=0)
    for k in shares:
        prob += pulp.lpSum(v for (k2, _), v in y.items() if k2 == k) <= 1, f"one_{k}"
    for h in range(N):
        terms = [(v, need[(k, h2)]) for (k, h2), v in y.items() if h2 == h]
        if terms:
            prob += pulp.lpSum(v * w for v, w in terms) <= max(room[h], 0), f"mem_{h}"
    for kh, v in y.items():
        prob += W >= (bn[kh] / scale) * v, f"w_{kh[0]}_{kh[1]}"
    # every missing backup costs more than any bottleneck can
    prob += W - 2 * pulp.lpSum(y.values())
    if not y:
        return {}
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    out = {k: h for (k, h), v in y.items() if (v.value() or 0) > 0.5}
    missing = [cm.device_names[k] for k in shares if k not in out]
    if missing:
        log.warning("no room for a backup of %s: its loss would not be survived", ", ".join(missing))
    return out


def memory_overflow(cm: CostModel, assign: Sequence[int]) -> list[tuple[str, int, int]]:
    """(device, bytes needed, bytes available) for each device the placement overfills."""
    used = cm.memory(assign)["total"]
    return [(cm.device_names[d], int(math.ceil(used[d])), int(cm.capacity[d]))
            for d in range(cm.n_devices) if used[d] > cm.capacity[d]]


def check_fits(cm: CostModel, assign: Sequence[int], method: str) -> None:
    over = memory_overflow(cm, assign)
    if over:
        parts = ", ".join(f"{n} by {need - have:,} bytes ({need:,} needed, {have:,} available)"
                          for n, need, have in over)
        raise InfeasiblePlanError(f"the {method} split does not fit in memory: {parts}")

