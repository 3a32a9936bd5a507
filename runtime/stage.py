"""The stage executor: runs this rank's blocks for each micro-batch that reaches it, forwards outputs.

Every rank runs one. Work arrives as `act` messages: the outputs of one block for one
micro-batch (docs/BATCHING.md) — its rows `(req, epoch, pos, q, has_image)` and the packed
tensors — from whichever rank ran that block (or `input` from the coordinator). A block
here runs as soon as every predecessor it has in the micro-batch's graph has delivered;
its outputs go to the ranks that run its successors (the route table), so micro-batches
flow through the ranks as a pipeline and several are in flight at once.

A micro-batch's graph is the whole DAG when one of its rows carries its image, the text
chain otherwise. Blocks run through `LlavaBlocks.run_batch`: HF's own layers over the
packed tokens, attention per request against this stage's KV. The stage keeps one
`KVStore` per run of consecutive decoder layers it holds (a store's step is one
transaction: every row checked — `pos` equals the tokens held for that request — and given
room before anything runs, committed after its last layer), within the stage's KV budget.
A request's KV is freed when the coordinator says so (finished, cancelled) and when a
newer epoch of it arrives (replayed).

Failover: a request's `epoch` grows each time it is replayed; a micro-batch with a row of
an older epoch is dropped, a row of a newer epoch frees the request's state here first.
Routes carry a version; a message routed under a newer version than this rank knows waits
until the route update reaches it.

Senders: an act received from another rank (`handle(..., src=rank)`) is taken only from
the rank that its route version runs its producer block on (`input`: the coordinator);
any other is dropped and counted in `stats()["refused"]` (runtime.messages).

Wire (msgpack header, built by runtime.messages; tensors raw, see runtime.transport):
    act   {kind, mb, rows: [[req, epoch, pos, q, has_image], ...], block, rv} + the block's tensors
    route {kind, rv, routes: {block: rank}}       coordinator -> all
    free  {kind, req}                             coordinator -> all: drop the request's state
    error {kind, req, epoch, error, rows}         any -> coordinator: a micro-batch with this
                                                  request (of `rows` rows) failed here
    stop / stats                                  end of run
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from adaptlink.model.blocks import LlavaBlocks
from adaptlink.model.graph import block_dag
from adaptlink.model.kv import KVStore
from adaptlink.model.microbatch import MicroBatch
from partitioner.vocab import block_index, block_kind, is_vision
from runtime import messages
from runtime.messages import Kind, Refusals, Refused

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "output"  # pseudo-blocks: the coordinator's micro-batch in, logits out


@dataclass
class _BatchWork:
    mb: MicroBatch
    blocks: frozenset[str]                       # blocks of the graph that run in this micro-batch
    outputs: dict[str, dict] = field(default_factory=dict)  # producer block -> its tensors
    done: set[str] = field(default_factory=set)


class StageExecutor:
    """One rank's share of the pipeline. `handle(header, tensors)` for every act message."""

    def __init__(self, rank: int, blocks: LlavaBlocks, routes: dict[str, int], coordinator: int,
                 send: Callable[[int, dict, dict], None], *, pad=None, kv_budget: int | None = None):
        """`pad`: an `adaptlink.model.emulation.DeadlinePadder` for an emulated slowdown, or None.
        `kv_budget`: bytes this stage's KV may hold, over all its stores (None: unbounded)."""
        self.rank, self.blocks, self.coordinator = rank, blocks, coordinator
        self._send = send
        self._pad = pad
        self.kv_budget = kv_budget
        self.dag = block_dag(blocks.info)
        self.order = list(self.dag.nodes)  # topological
        self.text_blocks = frozenset(b for b in self.order if not is_vision(b))
        self.epoch: dict[int, int] = {}
        self.kv: dict[str, KVStore] = {}           # first layer of a run of held layers -> its store
        self.segment: dict[str, list[str]] = {}    # that first layer -> the run's blocks
        self.work: dict[int, _BatchWork] = {}      # by micro-batch id
        self._waiting: list[tuple[dict, dict, int | None]] = []  # routed under a newer version
        self.routes: dict[str, int] = {}
        self.route_version = 0
        self.route_history: dict[int, dict[str, int]] = {}  # every version seen: judges late acts
        self.refusals = Refusals(rank)
        self.set_routes(routes, 0)
        self.on_output: Callable[[dict, dict], None] | None = None  # set on the coordinator
        self.on_error: Callable[[dict, str], None] | None = None
        self.block_s: dict[str, float] = defaultdict(float)
        self.busy_s = 0.0
        self.batches_run = 0  # micro-batches this stage ran its blocks for, their rows and tokens
        self.rows_run = 0
        self.tokens_run = 0
        self.kv_peak = 0

    # ---- routes -------------------------------------------------------------------------

    def set_routes(self, routes: dict[str, int], version: int) -> None:
        missing = set(self.order) - set(routes)
        if missing:
            raise ValueError(f"routes lack blocks {sorted(missing)}")
        not_held = [b for b, r in routes.items() if r == self.rank and b not in self.blocks.block_ids]
        if not_held:
            raise ValueError(f"rank {self.rank} is routed blocks it has not loaded: {not_held}")
        self.routes = {**routes, OUTPUT: self.coordinator}
        self.route_version = version
        self.route_history[version] = self.routes
        mine = [b for b in self.order if self.routes[b] == self.rank]
        self._segments(mine)
        log.info("rank %d runs %s (routes v%d)", self.rank, _ranges(mine), version)
        waiting, self._waiting = self._waiting, []
        for header, tensors, src in waiting:
            self.handle(header, tensors, src)

    def _segments(self, mine: list[str]) -> None:
        """One KV store per run of consecutive decoder layers this rank runs. A route change
        comes with a replay of every request in flight, so the old stores' KV is of no use."""
        runs: list[list[str]] = []
        for b in mine:
            if block_kind(b) != "decoder_layer":
                continue
            if runs and block_index(b) == block_index(runs[-1][-1]) + 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        self.segment = {run[0]: run for run in runs}
        layers = sum(len(r) for r in runs)
        self.kv = {}
        for first, run in self.segment.items():
            # the stage's budget shared by its stores in proportion to their layers
            budget = None if self.kv_budget is None else self.kv_budget * len(run) // layers
            self.kv[first] = self.blocks.new_kv_store(budget, layers=[block_index(b) for b in run])

    def step_blocks(self, image: bool) -> frozenset[str]:
        """A micro-batch with an image (a prefill, or a recompute replay) runs the whole DAG."""
        return frozenset(self.order) if image else self.text_blocks

    # ---- messages -----------------------------------------------------------------------

    def handle(self, header: dict, tensors: dict, src: int | None = None) -> None:
        """An act message: store the producer's outputs, run whatever became ready here.

        `src`: the rank it came from (None: this rank's own, e.g. the coordinator's inject);
        its header was checked by runtime.messages.check."""
        if header.get("rv", 0) > self.route_version:
            self._waiting.append((header, tensors, src))
            return
        if src is not None and not self._from_producer(header, src):
            return
        mb = MicroBatch.from_header(header["rows"])
        if not self._current(mb):
            return  # a replayed request's stale traffic
        if self.blocks.device.type != "cpu":  # the transport delivers CPU tensors
            tensors = {k: v.to(self.blocks.device) for k, v in tensors.items()}
        if header["block"] == "head" and self.rank == self.coordinator and self.on_output:
            self.on_output(header, tensors)
            return
        mb_id = header["mb"]
        work = self.work.get(mb_id)
        if work is None:
            work = self.work[mb_id] = _BatchWork(mb, self.step_blocks(bool(mb.image_rows)))
        elif work.mb != mb:
            self.refusals.add(src if src is not None else self.rank,
                              Refused(Kind.ACT, f"micro-batch {mb_id} with other rows than its first act"))
            return
        work.outputs[header["block"]] = tensors
        try:
            self._advance(mb_id, work)
        except Exception as e:  # a block failed on this micro-batch: its rows are reported
            log.exception("rank %d: micro-batch %d (%d rows) failed", self.rank, mb_id, len(mb))
            self.work.pop(mb_id, None)
            for row in mb.rows:
                self._report_error(row.req, row.epoch, f"{type(e).__name__}: {e}", len(mb))

    def _current(self, mb: MicroBatch) -> bool:
        """False if a row is of an older epoch than this rank knows; a newer one resets the request."""
        if any(row.epoch < self.epoch.get(row.req, -1) for row in mb.rows):
            return False
        for row in mb.rows:
            if row.epoch > self.epoch.get(row.req, -1):
                self.free(row.req)
                self.epoch[row.req] = row.epoch
        return True

    def _from_producer(self, header: dict, src: int) -> bool:
        """Whether `src` runs the act's producer block under the act's route version."""
        block, rv = header["block"], header["rv"]
        if block == INPUT:
            want = self.coordinator
        else:
            want = self.route_history.get(rv, {}).get(block) if block != OUTPUT else None
        if src == want:
            return True
        self.refusals.add(src, Refused(Kind.ACT, f"act of block {block[:60]!r} (routes v{rv}) from rank {src}; "
                                              f"{'no rank' if want is None else f'rank {want}'} runs it"))
        return False

    def free(self, req: int) -> None:
        for kv in self.kv.values():
            kv.free(req)
        for mb_id in [k for k, w in self.work.items() if any(r.req == req for r in w.mb.rows)]:
            del self.work[mb_id]

    def kv_bytes(self) -> int:
        return sum(kv.bytes_used for kv in self.kv.values())

    def _report_error(self, req: int, epoch: int, error: str, rows: int) -> None:
        header = messages.error(req, epoch, error, self.rank, rows)
        if self.rank == self.coordinator and self.on_error:
            self.on_error(header, {})
        else:
            self._send(self.coordinator, header, {})

    def _advance(self, mb_id: int, work: _BatchWork) -> None:
        mine = [b for b in self.order if b in work.blocks and self.routes[b] == self.rank]
        progress = True
        while progress:
            progress = False
            for b in mine:
                if b in work.done:
                    continue
                preds = [p for p in self.dag.predecessors(b) if p in work.blocks] or [INPUT]
                if not all(p in work.outputs for p in preds):
                    continue
                x: dict = {}
                for p in preds:
                    x.update(work.outputs[p])
                run = self.segment.get(b, [b])  # a run of decoder layers goes in one KV step
                out = self._run(run, x, work.mb)
                for blk in run:
                    work.done.add(blk)
                work.outputs[run[-1]] = out
                progress = True
                self._forward(run[-1], out, mb_id, work)
        if all(b in work.done for b in mine):
            self.work.pop(mb_id, None)
            if mine:
                self.batches_run += 1
                self.rows_run += len(work.mb)
                self.tokens_run += work.mb.T

    def _run(self, run: list[str], x: dict, mb: MicroBatch) -> dict:
        kv = self.kv.get(run[0])
        t0 = time.perf_counter()
        if self._pad is None:
            out = self.blocks.run_batch(run, mb, x, kv, produced=True)
        else:  # emulated slowdown, to a deadline from the fastest time for this micro-batch shape
            with self._pad.pad(key=(run[0], len(run), len(mb), mb.T, len(mb.image_rows))):
                out = self.blocks.run_batch(run, mb, x, kv, produced=True)
        dt = time.perf_counter() - t0
        for b in run:
            self.block_s[b] += dt / len(run)
        self.busy_s += dt
        if kv is not None:
            self.kv_peak = max(self.kv_peak, self.kv_bytes())
        return out

    def _forward(self, b: str, out: dict, mb_id: int, work: _BatchWork) -> None:
        succ = [s for s in self.dag.successors(b) if s in work.blocks]
        if b == "head":
            succ = [OUTPUT]
        targets = sorted({self.routes[s] for s in succ} - {self.rank})
        header = messages.act(mb_id, work.mb.to_header(), b, self.route_version)
        if b == "head" and self.rank == self.coordinator:
            targets = []
            if self.on_output:
                self.on_output(header, out)
        for r in targets:
            self._send(r, header, out)

    def inject(self, mb_id: int, mb: MicroBatch, inputs: dict[str, torch.Tensor]) -> None:
        """Coordinator: start a micro-batch by delivering its inputs to the root blocks' ranks:
        `input_ids [1, T]` packed in row order, and the image rows' `pixel_values` (and, for
        LLaVA-NeXT, their `image_sizes`)."""
        blocks = self.step_blocks(bool(mb.image_rows))
        header = messages.act(mb_id, mb.to_header(), INPUT, self.route_version)
        need = {"text.embed": {"input_ids": inputs["input_ids"]}}
        if "vision.embed" in blocks:
            need["vision.embed"] = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
        by_rank: dict[int, dict] = defaultdict(dict)
        for root, tensors in need.items():
            by_rank[self.routes[root]].update(tensors)
        for r, tensors in sorted(by_rank.items()):
            if r == self.rank:
                self.handle(header, tensors)
            else:
                self._send(r, header, tensors)

    def stats(self) -> dict:
        return {"rank": self.rank, "busy_s": self.busy_s, "refused": self.refusals.stats(),
                "block_s": {b: round(s, 6) for b, s in self.block_s.items()},
                "param_bytes": self.blocks.param_bytes(),
                "kv_bytes": self.kv_bytes(), "kv_peak_bytes": self.kv_peak,
                "micro_batches": self.batches_run, "rows": self.rows_run, "tokens": self.tokens_run}


def _ranges(blocks: list[str]) -> str:
    """`decoder.layer.0 .. decoder.layer.7` style summary for logs."""
    if not blocks:
        return "no blocks"
    if len(blocks) <= 3:
        return ", ".join(blocks)
    return f"{blocks[0]} .. {blocks[-1]} ({len(blocks)} blocks)"
