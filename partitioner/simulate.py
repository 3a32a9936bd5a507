"""Discrete-event simulation of a placement: K requests in flight through the pipeline.

The cost model's bottleneck (1 / the busiest device or link) is what a pipeline reaches
with enough requests in flight; with K requests it may not get there, because every
decode step of a request passes through all its stages one after the other. This
simulator plays the schedule out, with the same per-block times and per-edge transfer
times as the cost model:

- a request is one prefill step (the whole block DAG; the vision branch only with images)
  and then T decode steps (the text chain), each step starting when the previous one's
  head has run (the coordinator feeds the token back to text.embed);
- in a step, the blocks that one device runs and that touch each other form one task;
  each cut edge is one message on its link (bytes / bandwidth + latency);
- every device and every directed link serves one task at a time, first come first
  served; the coordinator admits a new request as soon as one completes (K in flight).

With micro-batches (B rows each, `Workload.batch_rows`) the unit that circulates is a
micro-batch: M of them in flight, each step costing the micro-batch's time (`step_tasks`).

Steady state is measured after the first 2K completions: requests/s, tokens/s (T tokens
per request), mean latency and time to first token, and each device's utilisation.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from partitioner.costs import VISION_KINDS, CostModel


@dataclass
class Task:
    resource: tuple          # ("dev", rank) or ("link", src rank, dst rank)
    seconds: float
    preds: list[int]         # task indices within the same step
    label: str               # blocks it runs, or the edge it carries


@dataclass
class SimResult:
    """What the simulator measured in steady state (seconds, requests/s)."""

    requests_per_s: float
    tokens_per_s: float
    latency_s: float
    ttft_s: float
    in_flight: int
    utilisation: list[float]
    """[N] fraction of the steady-state window each device was busy."""
    link_utilisation: dict
    """(src rank, dst rank) -> fraction busy, for links that carried anything."""
    bound_requests_per_s: float
    """1 / the cost model's bottleneck: the limit with unbounded requests in flight."""
    bottleneck: str
    timeline: list[tuple] = field(default_factory=list, repr=False)
    """(resource, request, step, start_s, end_s, label) of the first requests."""

    def to_dict(self, names: Sequence[str]) -> dict:
        return {"requests_per_s": _r(self.requests_per_s), "tokens_per_s": _r(self.tokens_per_s),
                "latency_s": _r(self.latency_s), "ttft_s": _r(self.ttft_s), "in_flight": self.in_flight,
                "bound_requests_per_s": _r(self.bound_requests_per_s), "bottleneck": self.bottleneck,
                "utilisation": {names[d]: round(u, 4) for d, u in enumerate(self.utilisation)},
                "link_utilisation": {f"{names[a]}->{names[b]}": round(u, 4)
                                     for (a, b), u in sorted(self.link_utilisation.items())}}


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def step_tasks(cm: CostModel, assign: Sequence[int], decode: bool) -> tuple[list[Task], int]:
    """The tasks of one prefill (decode=False) or decode step of one micro-batch (B rows,
    `cm.workload.rows`), in topological order, and the index of the task that holds the head
    (the step's end). A prefill step runs the B rows' prompts (B x one prompt's time and
    bytes); a decode step costs `cm.decode_s` (already one micro-batch's) and B rows' bytes."""
    rows = cm.workload.rows
    with_images = cm.workload.images_per_request > 0
    blocks = [b for b in range(cm.n_blocks)
              if not (cm.kinds[b] in VISION_KINDS and (decode or not with_images))]
    keep = set(blocks)
    edges = [(e, u, v) for e, (u, v) in enumerate(cm.edges) if u in keep and v in keep]
    # tasks: components of same-device blocks joined by an edge
    g = nx.Graph()
    g.add_nodes_from(blocks)
    g.add_edges_from((u, v) for _, u, v in edges if assign[u] == assign[v])
    comp = {}
    comps = [sorted(c) for c in nx.connected_components(g)]
    for i, c in enumerate(comps):
        for b in c:
            comp[b] = i
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(comps)))
    for _, u, v in edges:
        if comp[u] != comp[v]:
            dag.add_edge(comp[u], comp[v])
    order = list(nx.lexicographical_topological_sort(dag, key=lambda c: comps[c][0]))
    times = cm.decode_s if decode else cm.prefill_s
    tasks: list[Task] = []
    index = {}
    for c in order:
        members = comps[c]
        d = assign[members[0]]
        preds = []
        for e, u, v in edges:
            if comp[v] != c or comp[u] == c:
                continue
            if assign[u] == d:
                preds.append(index[comp[u]])
                continue
            nbytes = rows * (cm.edge_bytes_decode[e] if decode else cm.edge_bytes_prefill[e])
            a = assign[u]
            secs = nbytes / cm.bandwidth[a, d] + cm.latency[a, d]
            tasks.append(Task(("link", a, d), float(secs), [index[comp[u]]],
                              f"{cm.blocks[u]}->{cm.blocks[v]}"))
            preds.append(len(tasks) - 1)
        secs = float(sum(times[b, d] for b in members)) * (1 if decode else rows)
        label = cm.blocks[members[0]] if len(members) == 1 else f"{cm.blocks[members[0]]}..{cm.blocks[members[-1]]}"
        index[c] = len(tasks)
        tasks.append(Task(("dev", d), secs, preds, label))
    head = [b for b in blocks if cm.kinds[b] == "head"]
    end = index[comp[head[0]]] if head else len(tasks) - 1
    return tasks, end


def simulate(cm: CostModel, assign: Sequence[int], *, in_flight: int | None = None,
             requests: int | None = None, keep_timeline: int = 0) -> SimResult:
    """Play `requests` requests through the placement with `in_flight` at once (default:
    the workload's); keep the timeline of the first `keep_timeline` requests.

    What circulates is a micro-batch of B rows (`cm.workload.rows`; B = 1: a request):
    M = in_flight / B of them, rates counted in requests (B per micro-batch); `requests`
    and `keep_timeline` count micro-batches then."""
    rows = cm.workload.rows
    K = cm.customers if in_flight is None else max(1, math.ceil(int(in_flight) / rows))
    T = cm.workload.decode_tokens
    # Request r + K takes request r's place, so completions come in waves of K: measure
    # whole waves, after 2 of warm-up and before the last one (which drains the pipeline).
    warm = 2 * K
    waves = max(3, math.ceil(8 / K)) if requests is None else max(1, (int(requests) - warm) // K - 1)
    n_req = warm + (waves + 1) * K
    steps = [step_tasks(cm, assign, decode=False)[0]]
    if T > 0:
        steps.append(step_tasks(cm, assign, decode=True)[0])
    succs = [[[j for j, t in enumerate(tasks) if i in t.preds] for i in range(len(tasks))] for tasks in steps]
    free: dict[tuple, float] = {}
    busy: dict[tuple, list] = {}
    heap: list = []           # (ready time, seq, request, step, task index)
    seq = 0
    admitted = 0
    start = np.zeros(n_req)
    first_token = np.zeros(n_req)
    done_at = np.full(n_req, np.nan)
    state: dict[int, list] = {}   # request -> [finish times, preds left, tasks left, step end]
    timeline = []

    def begin_step(r: int, k: int, t: float):
        nonlocal seq
        tasks = steps[min(k, 1)]
        state[r] = [[0.0] * len(tasks), [len(t_.preds) for t_ in tasks], len(tasks), t]
        for i, t_ in enumerate(tasks):
            if not t_.preds:
                heapq.heappush(heap, (t, seq, r, k, i))
                seq += 1

    def admit(t: float):
        nonlocal admitted
        r = admitted
        admitted += 1
        start[r] = t
        begin_step(r, 0, t)

    for _ in range(min(K, n_req)):
        admit(0.0)
    while heap:
        ready, _, r, k, i = heapq.heappop(heap)
        tasks = steps[min(k, 1)]
        task = tasks[i]
        t0 = max(ready, free.get(task.resource, 0.0))
        t1 = t0 + task.seconds
        if task.seconds > 0:
            free[task.resource] = t1
            busy.setdefault(task.resource, []).append((t0, t1))
            if r < keep_timeline:
                timeline.append((task.resource, r, k, t0, t1, task.label))
        st = state[r]
        st[0][i] = t1
        st[3] = max(st[3], t1)
        for j in succs[min(k, 1)][i]:
            st[1][j] -= 1
            if st[1][j] == 0:
                heapq.heappush(heap, (max(st[0][p] for p in tasks[j].preds), seq, r, k, j))
                seq += 1
        st[2] -= 1
        if st[2]:
            continue
        t_end = st[3]  # the step is over: its last task (the head) has run
        if k == 0:
            first_token[r] = t_end
        if k < T:
            begin_step(r, k + 1, t_end)
        else:
            done_at[r] = t_end
            del state[r]
            if admitted < n_req:
                admit(t_end)
    order = np.sort(done_at)
    ev = cm.evaluate(assign)
    t_a, t_b = order[warm - 1] if warm else 0.0, order[warm + waves * K - 1]
    window = t_b - t_a
    rps = rows * waves * K / window if window > 0 else math.inf
    measured = (done_at > t_a) & (done_at <= t_b)
    lat = float(np.mean((done_at - start)[measured]))
    ttft = float(np.mean((first_token - start)[measured]))

    def util(res):
        if window <= 0:
            return 0.0
        s = sum(max(0.0, min(b, t_b) - max(a, t_a)) for a, b in busy.get(res, []))
        return s / window

    N = cm.n_devices
    return SimResult(requests_per_s=rps, tokens_per_s=rps * T, latency_s=lat, ttft_s=ttft, in_flight=K * rows,
                     utilisation=[util(("dev", d)) for d in range(N)],
                     link_utilisation={(res[1], res[2]): util(res) for res in busy if res[0] == "link"},
                     bound_requests_per_s=ev.requests_per_s, bottleneck=ev.bottleneck, timeline=timeline)
