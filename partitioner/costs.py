"""The cost model: what a block costs on a device, what an edge costs on a link, what a
device must hold. The ILP, the baselines, the simulator and the plan's predictions all
read the same `CostModel`.

A plan is costed at a micro-batch size B (rows, one request each) and a count M of
micro-batches in flight (`Workload.batch_rows`, `.micro_batches`; B = 1 and M = K for a plan
of one request per forward). Per request (prefill of S tokens with its images, then T decode
steps, each a row of a micro-batch of B rows):

- block b on device d:  prefill_s[b, d] + T * decode_s[b, d] / B, where decode_s is one
  decode step of the whole micro-batch of B rows (`measured_seconds`, the one rule):
  - `compute.measured` for b's kind wins. cluster/2 tables (`prefill_s_by_tokens`,
    `decode_s_by_rows`) interpolate linearly between measured counts; beyond the largest
    count they extrapolate in proportion (the per-row / per-token cost of the largest
    count), and the cost model records that it did (`notes`). A /1 entry (one prompt
    length, one row) scales prefill linearly from the measured prompt length (vision:
    from the measured images per request) and decode linearly in rows: B rows cost B x one
    row, i.e. no gain from batching, which over-estimates where the device's cost is flat
    in rows (4-16 rows on MKL fp32, 1-8 in bf16) but under-estimates 2-3 rows on MKL fp32
    by up to 1.5x (BATCHING_FACTS.md): re-profile (`adaptlink profile`) for a /2 table;
  - else `compute.roofline`: max(B * FLOPs / flops_per_s, bytes moved / memory_bytes_per_s)
    (+ overhead_s), bytes moved = the weights (at the device's dtype, read once for the
    micro-batch) plus, for a decode step, the KV cache of the B rows at the mean decode
    context; an embedding lookup moves only its output;
  - else a roofline calibrated from the device's measured kinds (effective FLOP/s and B/s);
  - times `emulation.slowdown`.
- edge u -> v cut from device a to b: (bytes_prefill + T * bytes_decode) / bandwidth
  + latency * messages, messages = 1 + T / B if the edge carries decode traffic else 1
  (one message carries a micro-batch's B rows).
- memory on d: weights + KV cache (kv_bytes_per_token * (S + T) * B * M, at d's dtype)
  + an activation buffer (ACT_FACTOR x the largest prefill output among d's blocks)
  + the shares d preloads as backups (their weights and KV cache, so a takeover fits).

A device's busy time and a link's transfer time per request are independent resources of
a pipeline: steady-state throughput is 1 / (the largest of them), the bottleneck; with M
micro-batches in flight it is also at most M / (one micro-batch's latency) (`cycle_s`).
tokens/s = T / cycle = B / (the bottleneck's seconds per micro-batch step) once prefill is
amortised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from partitioner.checks import placement_problems
from partitioner.errors import ClusterSpecError, PlanError
from partitioner.types import Cluster, Device, Workload
from partitioner.vocab import COORDINATOR_KINDS, DTYPE_BYTES, KIND_ORDER, SINK_KINDS, VISION_KINDS

log = logging.getLogger(__name__)

ACT_FACTOR = 4
"""Activation buffer = this x the block's prefill output: input, output, two temporaries."""


def block_order(graph: nx.DiGraph) -> list[str]:
    """A deterministic topological order: vision branch, text.embed, merge, decoder, head."""
    def key(b):
        a = graph.nodes[b]
        return (KIND_ORDER.get(a.get("kind"), 99), a.get("index") or 0, b)
    return list(nx.lexicographical_topological_sort(graph, key=key))


@dataclass
class Evaluation:
    """Per-request loads of one placement (seconds), as the cost model sees it."""

    busy_s: np.ndarray
    """[N] compute seconds per request on each device."""
    link_s: dict
    """(src rank, dst rank) -> transfer seconds per request on that link."""
    bottleneck_s: float
    bottleneck: str
    """Device name, or `a->b` for a link."""
    latency_s: float
    """One request alone, blocks one after another: all compute plus all transfers."""

    @property
    def requests_per_s(self) -> float:
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else math.inf

    def cycle_s(self, in_flight: int | None) -> float:
        """Seconds per request in steady state with `in_flight` requests at once, at best:
        the bottleneck, or one request's latency / K when K requests cannot keep the
        pipeline busy (the asymptotic bounds of a closed queueing network: X(K) <=
        min(1 / D_max, K / D), Lazowska et al., Quantitative System Performance, ch. 5).
        The `throughput` objective minimises it."""
        if not in_flight:
            return self.bottleneck_s
        return max(self.bottleneck_s, self.latency_s / in_flight)


class CostModel:
    """Dense cost arrays of one model on one ordered list of devices (rank order).

    Shapes: B blocks (topological order), E edges, N devices. Rank 0 is the coordinator.
    """

    def __init__(self, *, blocks: Sequence[str], kinds: Sequence[str], edges: Sequence[tuple[int, int]],
                 edge_bytes_prefill, edge_bytes_decode, prefill_s, decode_s, weight_bytes, kv_bytes,
                 act_bytes, capacity, bandwidth, latency, device_names: Sequence[str],
                 workload: Workload, coordinator: int = 0):
        self.blocks = list(blocks)
        self.kinds = list(kinds)
        self.index = {b: i for i, b in enumerate(self.blocks)}
        self.edges = [tuple(e) for e in edges]
        self.edge_bytes_prefill = np.asarray(edge_bytes_prefill, dtype=float)  # [E]
        self.edge_bytes_decode = np.asarray(edge_bytes_decode, dtype=float)    # [E]
        self.prefill_s = np.asarray(prefill_s, dtype=float)                    # [B, N]
        self.decode_s = np.asarray(decode_s, dtype=float)                      # [B, N]
        self.weight_bytes = np.asarray(weight_bytes, dtype=float)              # [B, N]
        self.kv_bytes = np.asarray(kv_bytes, dtype=float)                      # [B, N]
        self.act_bytes = np.asarray(act_bytes, dtype=float)                    # [B]
        self.capacity = np.asarray(capacity, dtype=float)                      # [N]
        self.bandwidth = np.asarray(bandwidth, dtype=float)                    # [N, N]
        self.latency = np.asarray(latency, dtype=float)                        # [N, N]
        self.device_names = list(device_names)
        self.workload = workload
        self.coordinator = coordinator
        B, N, E = len(self.blocks), len(self.device_names), len(self.edges)
        assert self.prefill_s.shape == (B, N) and self.weight_bytes.shape == (B, N)
        assert self.edge_bytes_prefill.shape == (E,) and self.bandwidth.shape == (N, N)
        T, rows = workload.decode_tokens, workload.rows
        # decode_s is one step of a micro-batch of `rows` rows: a request's share is 1/rows of it
        self.compute_s = self.prefill_s + T * self.decode_s / rows             # [B, N] per request
        self.mem_bytes = self.weight_bytes + self.kv_bytes                     # [B, N]
        self.edge_bytes = self.edge_bytes_prefill + T * self.edge_bytes_decode  # [E]
        self.edge_messages = 1.0 + T / rows * (self.edge_bytes_decode > 0)     # [E]
        self.notes: list[str] = []
        """How the costs were had where a rule extrapolated (beyond a measured table)."""
        bw = self.bandwidth.copy()
        np.fill_diagonal(bw, np.inf)
        lat = self.latency.copy()
        np.fill_diagonal(lat, 0.0)
        # [E, N, N] seconds per request if edge e runs from device a to device b
        self.edge_s = self.edge_bytes[:, None, None] / bw[None] + self.edge_messages[:, None, None] * lat[None]
        self.pinned = [i for i, k in enumerate(self.kinds) if k in COORDINATOR_KINDS]
        self.exempt = [k in SINK_KINDS for k in (self.kinds[v] for _, v in self.edges)]

    @property
    def customers(self) -> int:
        """M: micro-batches in flight (requests in flight for a plan of one per forward)."""
        return self.workload.customers

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_devices(self) -> int:
        return len(self.device_names)

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def build(cls, graph: nx.DiGraph, cluster: Cluster, devices: Sequence[Device], *,
              in_flight: int = 4, batch_rows: int | None = None,
              micro_batches: int | None = None) -> "CostModel":
        """Costs of `graph` (adaptlink.model.graph.build_graph form) on `devices` in rank order.

        `batch_rows` B: cost micro-batches of B rows, `micro_batches` M of them in flight
        (default: one per device, plus one), so that `in_flight` becomes B * M; None: one
        request per forward with `in_flight` requests in flight (as before micro-batches)."""
        g = graph.graph
        if batch_rows is not None:
            micro_batches = micro_batches or default_micro_batches(len(devices))
            in_flight = batch_rows * micro_batches
        workload = Workload(int(g.get("prefill_tokens", 640)), int(g.get("decode_tokens", 64)),
                            int(g.get("images_per_request", 1)), int(in_flight), batch_rows, micro_batches)
        context = int(g.get("decode_context", workload.decode_context))
        graph_dtype = g.get("dtype", "float32")
        if graph_dtype not in DTYPE_BYTES:
            raise PlanError(f"model graph: dtype: must be one of {', '.join(DTYPE_BYTES)}, got {graph_dtype!r}")
        blocks = block_order(graph)
        nodes = [graph.nodes[b] for b in blocks]
        kinds = [a.get("kind", "unknown") for a in nodes]
        index = {b: i for i, b in enumerate(blocks)}
        edges = [(index[u], index[v]) for u, v in graph.edges]
        edges.sort()
        ebp = [graph.edges[blocks[u], blocks[v]].get("bytes_prefill", nodes[u].get("out_bytes_prefill", 0))
               for u, v in edges]
        ebd = [graph.edges[blocks[u], blocks[v]].get("bytes_decode", nodes[u].get("out_bytes_decode", 0))
               for u, v in edges]
        B, N = len(blocks), len(devices)
        pre, dec = np.zeros((B, N)), np.zeros((B, N))
        wb, kv = np.zeros((B, N)), np.zeros((B, N))
        tokens = workload.prefill_tokens + workload.decode_tokens
        notes: list[str] = []
        for j, dev in enumerate(devices):
            scale = DTYPE_BYTES[dev.dtype] / DTYPE_BYTES[graph_dtype]
            timer = _DeviceTimer(dev, cluster.source, g.get("model", ""), workload, context, scale,
                                 nodes, kinds, notes)
            for i, a in enumerate(nodes):
                pre[i, j], dec[i, j] = timer.seconds(a, kinds[i])
                wb[i, j] = math.ceil(a.get("param_bytes", 0) * scale)
                kv[i, j] = math.ceil(a.get("kv_bytes_per_token", 0) * scale) * tokens * workload.in_flight
        act = [ACT_FACTOR * a.get("out_bytes_prefill", 0) for a in nodes]
        names = [d.name for d in devices]
        bw = np.array([[cluster.link(a, b).bandwidth_bytes_per_s for b in names] for a in names])
        lat = np.array([[cluster.link(a, b).latency_s for b in names] for a in names])
        cm = cls(blocks=blocks, kinds=kinds, edges=edges, edge_bytes_prefill=ebp, edge_bytes_decode=ebd,
                 prefill_s=pre, decode_s=dec, weight_bytes=wb, kv_bytes=kv, act_bytes=act,
                 capacity=[d.capacity_bytes for d in devices], bandwidth=bw, latency=lat,
                 device_names=names, workload=workload)
        cm.notes = sorted(set(notes))
        return cm

    def to_dict(self) -> dict:
        """The `cost_model` section of plan.json (per-rank lists)."""
        return {
            "devices": list(self.device_names),
            "blocks": [{"id": b, "kind": k,
                        "prefill_s": [float(x) for x in self.prefill_s[i]],
                        "decode_s": [float(x) for x in self.decode_s[i]],
                        "weight_bytes": [int(x) for x in self.weight_bytes[i]],
                        "kv_bytes": [int(x) for x in self.kv_bytes[i]],
                        "act_bytes": int(self.act_bytes[i])}
                       for i, (b, k) in enumerate(zip(self.blocks, self.kinds))],
            "edges": [{"src": self.blocks[u], "dst": self.blocks[v],
                       "bytes_prefill": int(self.edge_bytes_prefill[e]),
                       "bytes_decode": int(self.edge_bytes_decode[e])}
                      for e, (u, v) in enumerate(self.edges)],
        }

    @classmethod
    def from_plan(cls, plan) -> "CostModel":
        """Rebuild the cost model stored in a plan (`plan.cost_model`, `plan.links`)."""
        cm = plan.cost_model
        if cm is None:
            raise PlanError("plan.json: cost_model: missing; re-run `adaptlink plan` to write it")
        names = [s.name for s in plan.devices]
        if cm.get("devices") != names:
            raise PlanError(f"plan.json: cost_model.devices: must be {names}, got {cm.get('devices')}")
        try:
            blocks = [b["id"] for b in cm["blocks"]]
            index = {b: i for i, b in enumerate(blocks)}
            edges = [(index[e["src"]], index[e["dst"]]) for e in cm["edges"]]
            arr = {k: [b[k] for b in cm["blocks"]] for k in ("prefill_s", "decode_s", "weight_bytes", "kv_bytes")}
            kinds = [b["kind"] for b in cm["blocks"]]
            act = [b["act_bytes"] for b in cm["blocks"]]
            ebp = [e["bytes_prefill"] for e in cm["edges"]]
            ebd = [e["bytes_decode"] for e in cm["edges"]]
        except (KeyError, TypeError) as e:
            raise PlanError(f"plan.json: cost_model: malformed ({e!r})") from None
        links = plan.link_table()
        bw = np.array([[links.link(a, b).bandwidth_bytes_per_s for b in names] for a in names])
        lat = np.array([[links.link(a, b).latency_s for b in names] for a in names])
        cap = [Device.usable_bytes(s.memory_bytes, s.emulation) for s in plan.devices]
        return cls(blocks=blocks, kinds=kinds, edges=edges, edge_bytes_prefill=ebp, edge_bytes_decode=ebd,
                   capacity=cap, bandwidth=bw, latency=lat, device_names=names, workload=plan.workload,
                   act_bytes=act, coordinator=plan.coordinator, **arr)

    # -- evaluating a placement --------------------------------------------------------------

    def evaluate(self, assign: Sequence[int]) -> Evaluation:
        """Loads of a placement: `assign[b]` is the rank of block b."""
        N = self.n_devices
        busy = np.zeros(N)
        for b, d in enumerate(assign):
            busy[d] += self.compute_s[b, d]
        links: dict[tuple[int, int], float] = {}
        for e, (u, v) in enumerate(self.edges):
            a, b = assign[u], assign[v]
            if a != b:
                links[(a, b)] = links.get((a, b), 0.0) + self.edge_s[e, a, b]
        worst_dev = int(np.argmax(busy))
        bottleneck_s, name = float(busy[worst_dev]), self.device_names[worst_dev]
        for (a, b), s in sorted(links.items()):
            if s > bottleneck_s:
                bottleneck_s, name = s, f"{self.device_names[a]}->{self.device_names[b]}"
        return Evaluation(busy_s=busy, link_s=links, bottleneck_s=bottleneck_s, bottleneck=name,
                          latency_s=float(busy.sum() + sum(links.values())))

    def share_memory(self, assign: Sequence[int], rank: int, on: int | None = None) -> float:
        """Weights + KV of `rank`'s share, held at device `on`'s dtype (default: its own)."""
        on = rank if on is None else on
        return float(sum(self.mem_bytes[b, on] for b, d in enumerate(assign) if d == rank))

    def memory(self, assign: Sequence[int], backups: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
        """Bytes per device: weights, kv, activations, backups ({failed rank: holder})."""
        N = self.n_devices
        out = {k: np.zeros(N) for k in ("weights", "kv", "activations", "backups")}
        for b, d in enumerate(assign):
            out["weights"][d] += self.weight_bytes[b, d]
            out["kv"][d] += self.kv_bytes[b, d]
            out["activations"][d] = max(out["activations"][d], self.act_bytes[b])
        for k, h in (backups or {}).items():
            out["backups"][h] += self.share_memory(assign, k, on=h)
        out["total"] = out["weights"] + out["kv"] + out["activations"] + out["backups"]
        return out

    def after_dropout(self, assign: Sequence[int], failed: int, holder: int) -> list[int]:
        """The placement once `failed` dropped out and `holder` runs its share too."""
        return [holder if d == failed else d for d in assign]

    def dropout_bottlenecks(self, assign: Sequence[int], backups: Mapping[int, int]) -> dict[int, float]:
        """Bottleneck seconds per request after each backed-up device's dropout."""
        out = {}
        for k in range(self.n_devices):
            if k == self.coordinator:
                continue
            if any(d == k for d in assign):
                if k not in backups:
                    continue
                ev = self.evaluate(self.after_dropout(assign, k, backups[k]))
            else:  # an empty share: its loss changes nothing but removes its links
                ev = self.evaluate(assign)
            out[k] = ev.bottleneck_s
        return out

    def structure_problems(self, assign: Sequence[int]) -> list[str]:
        rank_of = {self.blocks[b]: d for b, d in enumerate(assign)}
        edges = [(self.blocks[u], self.blocks[v]) for u, v in self.edges]
        return placement_problems(rank_of, edges, dict(zip(self.blocks, self.kinds)), self.coordinator)


def default_micro_batches(n_devices: int) -> int:
    """M the planner sizes memory for when not told: one micro-batch per device (a plan has at
    most that many stages), plus one to cover the hand-offs; one for a single device. The
    runtime keeps the plan's stages + 1 (`runtime.scheduler.BatchLimits.in_flight`), never more."""
    return n_devices + 1 if n_devices > 1 else 1


def _from_table(table: dict, n: int, what: str, unit: str, notes: list[str] | None) -> float:
    """`table_seconds(table, n)`, noting in `notes` when `n` lies beyond the measured counts."""
    seconds, out = table_seconds(table, n)
    if out and notes is not None:
        notes.append(f"{what}: extrapolated in proportion beyond the measured {max(map(int, table))}{unit}")
    return seconds


def table_seconds(table: Mapping[str, float], n: float) -> tuple[float, bool]:
    """Seconds at count `n` from a measured table {"count": seconds}: linear between the two
    measured counts around n; below the smallest, the smallest's time (a cost does not fall
    with fewer rows or tokens, so this is an upper bound); above the largest, in proportion
    to it (its per-unit cost, True: extrapolated)."""
    pts = sorted((int(k), float(v)) for k, v in table.items())
    if n <= pts[0][0]:
        return pts[0][1], False
    for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
        if n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0), False
    nl, tl = pts[-1]
    return tl * n / nl, True


def measured_seconds(measured: Mapping, kind: str, workload: Workload, rows: int | None = None,
                     notes: list | None = None) -> tuple[float, float]:
    """(prefill seconds of one request, seconds of one decode step of a micro-batch of `rows`
    rows (default: the workload's B)) of a `kind` block at `workload` from a device's
    `compute.measured`, before any slowdown. The one rule; the profiler's prediction uses it.

    - prefill: `prefill_s_by_tokens` interpolated at the workload's prompt length (cluster/2),
      else scaled linearly from the measured prompt length; vision kinds: per image, times
      the workload's images per request (they have no decode step);
    - decode: `decode_s_by_rows` interpolated at `rows` (cluster/2), else `rows` x the one-row
      `decode_s` (a /1 profile: no gain from batching assumed).
    See `table_seconds` for between and beyond measured counts; an extrapolation is appended
    to `notes`."""
    t = measured["blocks"][kind]
    rows = workload.rows if rows is None else rows
    if kind in VISION_KINDS:
        scale = workload.images_per_request / measured.get("images_per_request", 1)
        return float(t["prefill_s"]) * scale, 0.0
    S = workload.prefill_tokens
    if t.get("prefill_s_by_tokens"):
        pre = _from_table(t["prefill_s_by_tokens"], S, f"{kind} prefill of {S} tokens", "", notes)
    else:
        pre = float(t["prefill_s"]) * S / measured["prefill_tokens"]
    if t.get("decode_s_by_rows"):
        dec = _from_table(t["decode_s_by_rows"], rows, f"{kind} decode of {rows} rows", " rows", notes)
    else:
        dec = float(t["decode_s"]) * rows
        if rows > 1 and notes is not None:
            notes.append(f"{kind} decode of {rows} rows: {rows} x the one-row time (a cluster/1 "
                         f"profile has no rows table; re-profile for one)")
    return pre, dec


class _DeviceTimer:
    """Seconds of one block of a kind on one device (see module docstring for the rules)."""

    def __init__(self, dev: Device, source: str, model: str, workload: Workload, context: int,
                 scale: float, nodes: Sequence[dict], kinds: Sequence[str], notes: list | None = None):
        self.dev, self.workload, self.context, self.scale = dev, workload, context, scale
        self.notes = notes
        where = self.where = f"{source}: devices[{dev.index}].compute"
        self.calibrated = None
        m = dev.compute.get("measured")
        if m and m.get("model") and model and m["model"] != model:
            if "roofline" not in dev.compute:
                raise ClusterSpecError(
                    f"{where}.measured.model: measured on {m['model']}, not {model}, and there is "
                    f"no roofline to fall back on; profile this model or add compute.roofline")
            log.warning("%s: measured on %s, planning %s: using the roofline", where, m["model"], model)
            m = None
        self.measured = m
        self.roofline = dev.compute.get("roofline")
        if self.roofline is None:
            # Calibrate a roofline from the kinds that were measured, on this graph's blocks.
            ref = {}
            for a, k in zip(nodes, kinds):
                ref.setdefault(k, a)
            flops = secs = nbytes = dsecs = 0.0
            for k, t in (m or {}).get("blocks", {}).items():
                if k not in ref:
                    continue
                pre, dec = measured_seconds(m, k, workload, rows=1)
                if pre > 0 and ref[k].get("flops_prefill", 0) > 0:
                    flops, secs = flops + ref[k]["flops_prefill"], secs + pre
                if dec > 0 and k not in VISION_KINDS:
                    nbytes, dsecs = nbytes + self._decode_bytes(ref[k], k, 1), dsecs + dec
            if secs > 0 and dsecs > 0:
                self.calibrated = {"flops_per_s": flops / secs, "memory_bytes_per_s": nbytes / dsecs}

    def _decode_bytes(self, a: dict, kind: str, rows: int) -> float:
        """Bytes one decode step of `rows` rows moves: the weights once, each row's KV."""
        if kind == "text_embed":
            return a.get("out_bytes_decode", 0) * rows
        return (a.get("param_bytes", 0) * self.scale
                + a.get("kv_bytes_per_token", 0) * self.scale * self.context * rows)

    def seconds(self, a: dict, kind: str) -> tuple[float, float]:
        """(prefill seconds, seconds of one decode step) of block `a`, slowdown included."""
        rows = self.workload.rows
        if self.measured and kind in self.measured["blocks"]:
            pre, dec = measured_seconds(self.measured, kind, self.workload, notes=self.notes)
        else:
            r = self.roofline or self.calibrated
            if r is None:
                raise ClusterSpecError(
                    f"{self.where}: no measured time for {kind} blocks and no roofline; "
                    f"add compute.roofline or measure {kind}")
            fps, bps = r["flops_per_s"], r["memory_bytes_per_s"]
            over = r.get("overhead_s", 0.0)
            pre_bytes = a.get("out_bytes_prefill", 0) if kind == "text_embed" else a.get("param_bytes", 0) * self.scale
            pre = max(a.get("flops_prefill", 0) / fps, pre_bytes / bps) + over
            dec = 0.0
            if kind not in VISION_KINDS:
                dec = max(rows * a.get("flops_decode", 0) / fps, self._decode_bytes(a, kind, rows) / bps) + over
        s = self.dev.slowdown
        return pre * s, dec * s
