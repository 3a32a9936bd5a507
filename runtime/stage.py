"""The stage executor: runs this rank's blocks for whichever request step is ready, forwards outputs.

Every rank runs one. Work arrives as `act` messages: the outputs of one block for one
(request, step), from whichever rank ran it (or `input` from the coordinator). A block
here runs as soon as every predecessor it has in this step's graph has delivered;
its outputs go to the ranks that run its successors (the route table), so requests
flow through the ranks as a pipeline and several are in flight at once.

Steps: step 0 is the prefill (the whole DAG when the request has an image, the text
chain otherwise); step k > 0 decodes one token through the text chain. Each request
has a KV cache per rank, created on first use and freed when the coordinator says so.

Failover: a request's `epoch` grows each time it is replayed; a message of an older
epoch is dropped, one of a newer epoch resets the request's state here first. Routes
carry a version; a message routed under a newer version than this rank knows waits
until the route update reaches it.

Senders: an act received from another rank (`handle(..., src=rank)`) is taken only from
the rank that its route version runs its producer block on (`input`: the coordinator);
any other is dropped and counted in `stats()["refused"]` (runtime.messages).

Wire (msgpack header; tensors raw, see runtime.transport):
    act   {kind, req, epoch, step, pos, q, image, block, rv} + the block's output tensors
    route {kind, rv, routes: {block: rank}}       coordinator -> all
    free  {kind, req}                             coordinator -> all: drop the request's state
    error {kind, req, epoch, error}               any -> coordinator: the request cannot be served
    stop / stats                                  end of run
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.model.graph import block_dag
from partitioner.vocab import is_vision
from runtime.messages import Refusals, Refused

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "output"  # pseudo-blocks: the coordinator's request in, tokens out


@dataclass
class _StepWork:
    pos: int
    q: int
    image: bool
    blocks: frozenset[str]                       # blocks of the graph that run in this step
    position_ids: torch.Tensor = None            # [1, q]: pos .. pos + q - 1
    outputs: dict[str, dict] = field(default_factory=dict)  # producer block -> its tensors
    done: set[str] = field(default_factory=set)
    memo: dict = field(default_factory=dict)     # rope and mask, shared by this step's layers here


class StageExecutor:
    """One rank's share of the pipeline. `handle(header, tensors)` for every act message."""

    def __init__(self, rank: int, blocks: LlavaBlocks, routes: dict[str, int], coordinator: int,
                 send: Callable[[int, dict, dict], None], *, pad=None):
        """`pad`: an `adaptlink.model.emulation.DeadlinePadder` for an emulated slowdown, or None."""
        self.rank, self.blocks, self.coordinator = rank, blocks, coordinator
        self._send = send
        self._pad = pad
        self.dag = block_dag(blocks.info)
        self.order = list(self.dag.nodes)  # topological
        self.text_blocks = frozenset(b for b in self.order if not is_vision(b))
        self.epoch: dict[int, int] = {}
        self.caches: dict[int, object] = {}
        self.work: dict[tuple[int, int], _StepWork] = {}
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
        self.steps_run = 0

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
        log.info("rank %d runs %s (routes v%d)", self.rank, _ranges(mine), version)
        waiting, self._waiting = self._waiting, []
        for header, tensors, src in waiting:
            self.handle(header, tensors, src)

    def step_blocks(self, step: int, image: bool) -> frozenset[str]:
        """A step with the image (a prefill, or a recompute replay) runs the whole DAG."""
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
        if self.blocks.device.type != "cpu":  # the transport delivers CPU tensors
            tensors = {k: v.to(self.blocks.device) for k, v in tensors.items()}
        req, epoch = header["req"], header["epoch"]
        current = self.epoch.get(req, -1)
        if epoch < current:
            return  # a replayed request's stale traffic
        if epoch > current:
            self.free(req)
            self.epoch[req] = epoch
        if header["block"] == "head" and self.rank == self.coordinator and self.on_output:
            self.on_output(header, tensors)
            return
        key = (req, header["step"])
        work = self.work.get(key)
        if work is None:
            work = self.work[key] = _StepWork(header["pos"], header["q"], bool(header["image"]),
                                              self.step_blocks(header["step"], bool(header["image"])))
        work.outputs[header["block"]] = tensors
        try:
            self._advance(req, epoch, header["step"], work)
        except Exception as e:  # a block failed on this request: it alone is lost
            log.exception("rank %d: request %d step %d failed", self.rank, req, header["step"])
            self.work.pop(key, None)
            self._report_error(req, epoch, f"{type(e).__name__}: {e}")

    def _from_producer(self, header: dict, src: int) -> bool:
        """Whether `src` runs the act's producer block under the act's route version."""
        block, rv = header["block"], header["rv"]
        if block == INPUT:
            want = self.coordinator
        else:
            want = self.route_history.get(rv, {}).get(block) if block != OUTPUT else None
        if src == want:
            return True
        self.refusals.add(src, Refused("act", f"act of block {block[:60]!r} (routes v{rv}) from rank {src}; "
                                              f"{'no rank' if want is None else f'rank {want}'} runs it"))
        return False

    def free(self, req: int) -> None:
        self.caches.pop(req, None)
        for key in [k for k in self.work if k[0] == req]:
            del self.work[key]

    def _report_error(self, req: int, epoch: int, error: str) -> None:
        header = {"kind": "error", "req": req, "epoch": epoch, "error": error, "rank": self.rank}
        if self.rank == self.coordinator and self.on_error:
            self.on_error(header, {})
        else:
            self._send(self.coordinator, header, {})

    def _advance(self, req: int, epoch: int, step: int, work: _StepWork) -> None:
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
                out = self._run(b, x, req, work)
                work.outputs[b] = out
                work.done.add(b)
                progress = True
                self._forward(b, out, req, epoch, step, work)
        if all(b in work.done for b in mine):
            self.work.pop((req, step), None)

    def _run(self, b: str, x: dict, req: int, work: _StepWork) -> dict:
        cache = None
        if b.startswith("decoder."):
            cache = self.caches.get(req)
            if cache is None:
                cache = self.caches[req] = self.blocks.new_cache()
        if work.position_ids is None:
            work.position_ids = torch.arange(work.pos, work.pos + work.q)[None]
        step = Step(work.position_ids, None, cache, work.memo)
        t0 = time.perf_counter()
        if self._pad is None:
            out = self.blocks.run(b, x, step)
        else:  # emulated slowdown, to a deadline from this block's fastest time for this shape
            with self._pad.pad(key=(b, work.q, len(work.memo))):
                out = self.blocks.run(b, x, step)
        dt = time.perf_counter() - t0
        self.block_s[b] += dt
        self.busy_s += dt
        return out

    def _forward(self, b: str, out: dict, req: int, epoch: int, step: int, work: _StepWork) -> None:
        succ = [s for s in self.dag.successors(b) if s in work.blocks]
        if b == "head":
            succ = [OUTPUT]
        targets = sorted({self.routes[s] for s in succ} - {self.rank})
        if b == "head" and self.rank == self.coordinator:
            targets = []
            if self.on_output:
                self.on_output({"req": req, "epoch": epoch, "step": step, "block": b}, out)
        header = {"kind": "act", "req": req, "epoch": epoch, "step": step, "pos": work.pos, "q": work.q,
                  "image": work.image, "block": b, "rv": self.route_version}
        for r in targets:
            self._send(r, header, out)

    def inject(self, req: int, epoch: int, step: int, pos: int, inputs: dict[str, torch.Tensor],
               image: bool) -> None:
        """Coordinator: start a request step by delivering its inputs to the root blocks' ranks."""
        blocks = self.step_blocks(step, image)
        header = {"kind": "act", "req": req, "epoch": epoch, "step": step, "pos": pos,
                  "q": int(inputs["input_ids"].shape[1]), "image": image, "block": INPUT,
                  "rv": self.route_version}
        need = {"text.embed": {"input_ids": inputs["input_ids"]}}
        if "vision.embed" in blocks:
            need["vision.embed"] = {"pixel_values": inputs["pixel_values"]}
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
                "param_bytes": self.blocks.param_bytes()}


def _ranges(blocks: list[str]) -> str:
    """`decoder.layer.0 .. decoder.layer.7` style summary for logs."""
    if not blocks:
        return "no blocks"
    if len(blocks) <= 3:
        return ", ".join(blocks)
    return f"{blocks[0]} .. {blocks[-1]} ({len(blocks)} blocks)"
