"""The coordinator: where requests arrive and tokens leave. Keeps K requests in flight,
packed into micro-batches (continuous batching, docs/BATCHING.md).

It runs on the coordinator rank beside that rank's StageExecutor (which holds
`text.embed` and `head`). Requests wait in an admission queue (`submit`; a server feeds
it live) and are admitted while fewer than K are active and every stage's KV can hold
them to the end (`runtime.scheduler.KVLedger`). Each turn it forms micro-batches from the
requests that are ready (`runtime.scheduler.form_batch`: decode rows first, prompts
chunked into what is left of the token budget, never cutting an image's tokens) and keeps
`BatchLimits.in_flight(stages)` of them in the pipeline, so no stage waits. From the head's
logits (one row per request) it chooses each request's token, until a stop token or
`max_new_tokens`; then it tells every rank to free the request's KV.

A micro-batch that fails on a stage (a bad input, a stage out of KV) is not the end of its
other rows: each of its requests is replayed alone under a new epoch, and only a request
that fails alone gets an error row (one bad request fails alone).

Failover: when a rank fails (its send/recv broke, its heartbeat stopped, or the launcher
reaped it), every block routed to it moves to a live rank that preloaded a copy (the
plan's backup holder first), the new routes go to every rank, and every request in
flight is replayed under a new epoch, re-formed into micro-batches on the new routes (the
micro-batches in the pipeline are abandoned). `replay="recompute"` (default) prefills the
prompt and every token already generated (in chunks under the token budget), whose last
logits give the next new token at once (as vLLM's recompute preemption): recovery costs
one prefill, not one pipeline pass per token generated. `replay="exact"` keeps the
original chunking (the prompt, then each token fed back one step at a time) and checks
each replayed token against the delivered one (`replay_mismatches`). A block with no live copy left ends the run: unfinished
requests get an error line, never a hang.

Live mode (`live=True`, `adaptlink serve`): the loop does not end when it is idle; it waits
for requests that another thread hands it (`submit_threadsafe`, `cancel`: through a queue
the loop drains each turn, so the coordinator's state is only touched by its own thread),
and calls `on_token(index, token)` as each new token is chosen (a replay after a failover
delivers no token twice). `cancel(index)` ends a request and frees its KV on every rank; a
request with a row in the pipeline is ended when that row comes back, so no stage meets a
row whose KV was freed. `drain()` ends live mode: the loop ends once what runs is done.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

import torch

from adaptlink.model.microbatch import MicroBatch, Row
from runtime import messages
from runtime.launcher import INJECTED_KEY, TOKENS_KEY
from runtime.messages import Kind, Refused, check, kind_of
from runtime.requests import Request, Result, choose_token
from runtime.scheduler import BatchLimits, KVLedger, Pending, Piece, form_batch, image_span
from runtime.stage import StageExecutor
from runtime.transport import PeerFailure, Transport

log = logging.getLogger(__name__)

COLD_LOAD_TIMEOUT_S = 600.0


@dataclass
class _Active:
    req: Request
    t_start: float
    epoch: int = 0
    tokens: list[int] = field(default_factory=list)
    t_first: float | None = None
    generator: torch.Generator | None = None
    replays: int = 0
    fed: int = 0                 # tokens the stages hold (or are computing) for this epoch
    busy: bool = False           # one of its rows is in the pipeline
    solo: bool = False           # it runs alone: a micro-batch with it failed
    exact: bool = False          # replaying with the original chunking (prompt, then one token a step)
    image: tuple[int, int] | None = None  # its prompt's image tokens, positions [start, end)
    order: float = 0.0
    cancelled: str | None = None  # live mode: cancelled while a row was in the pipeline (why)

    @property
    def prompt_len(self) -> int:
        return int(self.req.input_ids.shape[1])

    def pending(self) -> Pending | None:
        """What it needs next: every known token not yet fed (the prompt, the last token, or a
        recompute replay's whole history); exact replay: the prompt, then one token a step."""
        known = self.prompt_len + len(self.tokens)
        if self.busy or self.fed >= known:
            return None
        todo = known - self.fed
        if self.exact:
            todo = self.prompt_len - self.fed if self.fed < self.prompt_len else 1
        image = self.image if self.image is not None and self.fed < self.image[1] else None
        return Pending(self.req.index, self.fed, todo, image, self.order)

    def ids(self, pos: int, q: int) -> list[int]:
        S = self.prompt_len
        out = self.req.input_ids[0, pos:min(pos + q, S)].tolist() if pos < S else []
        return out + self.tokens[max(pos - S, 0):max(pos + q - S, 0)]


@dataclass
class Failover:
    rank: int
    detected_at: float            # seconds since the run started
    rerouted: dict[str, int]      # block -> new rank
    replayed: list[str]           # request ids replayed
    first_token_after: float | None = None
    killed_at: float | None = None  # when an injected kill hit it (launcher's record), same clock
    cold_load_s: float | None = None  # cold recovery: time to load the share on its new holder
    # rows of the replay in each micro-batch that carried one, until every replayed request
    # had its history fed again: > 1 shows the recompute prefills running batched
    replay_rows: list[int] = field(default_factory=list)
    refeeding: set[int] = field(default_factory=set, repr=False)  # replayed, history not yet fed

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "refeeding"}


class Coordinator:
    def __init__(self, executor: StageExecutor, transport: Transport, requests: list[Request], *,
                 in_flight: int, holders: dict[int, set[str]], preferred: dict[int, int | None],
                 tokenizer=None, store=None, names: dict[int, str] | None = None,
                 cold_load=None, replay: str = "recompute", count_tokens: bool = False,
                 on_result=None, limits: BatchLimits | None = None,
                 kv_ledger: Callable[[dict[str, int]], KVLedger] | None = None,
                 live: bool = False, on_token: Callable[[int, int], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_turn: Callable[[], None] | None = None):
        self.ex, self.transport = executor, transport
        # on_result(Result): called once per request the moment its row is decided (finished,
        # failed, or left unfinished by a fatal end), so out.jsonl is written as it goes
        self.on_result = on_result
        self.pending: deque[Request] = deque()
        self.in_flight = max(1, in_flight)
        self.limits = limits or BatchLimits()
        # kv_ledger(routes): every stage's KV bytes per token and budget under those routes
        self.kv_ledger = kv_ledger
        self.kv = kv_ledger(executor.routes) if kv_ledger is not None else None
        self.holders = holders          # rank -> blocks it has loaded (own + backups)
        self.preferred = preferred      # rank -> its backup holder in the plan
        self.tokenizer, self.store = tokenizer, store
        # store counter of delivered tokens, for failure injection at a token count only: a
        # store round trip per token costs ~1% of a 1-rank run (0.18 ms x 128 tokens in 1.8 s)
        self.count_tokens = count_tokens and store is not None
        self.names = names or {}
        # Cold recovery (no preloaded backups): a failed share is loaded from the checkpoint
        # by its planned backup holder at failure time; cold_load(blocks) loads it here.
        self.cold_load = cold_load
        if replay not in ("recompute", "exact"):
            raise ValueError(f"replay must be recompute or exact, not {replay!r}")
        self.replay = replay
        self._deferred: list[int] = []  # failures seen while waiting for a cold load
        self.active: dict[int, _Active] = {}
        self.batches: dict[int, MicroBatch] = {}  # micro-batches in the pipeline, by id
        self._mb_ids = count()
        self.results: dict[int, Result] = {}
        self.dead: set[int] = set()
        self.failovers: list[Failover] = []
        self.replay_mismatches = 0
        self.fatal: str | None = None
        self.unfinished: list[str] = []  # ids of the requests a fatal failure left unfinished
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        self.token_times: list[float] = []  # seconds since start, one per delivered token
        self.batch_log: list[tuple[int, int, int]] = []  # (rows, tokens, in flight) per micro-batch sent
        self.queue_peak = 0
        # live mode: requests and cancels from other threads; on_token(index, token) per new
        # token; on_batch(rows, tokens) per micro-batch sent (a server's metrics); on_turn()
        # once per turn of the loop and at its end (the server hands a turn's tokens and
        # results to its event loop in one wakeup, not one per token)
        self.live, self.on_token, self.on_batch, self.on_turn = live, on_token, on_batch, on_turn
        self.serving = live  # stays set once drain() ends live mode
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        if live:  # hours of serving: the per-token and per-batch records keep the latest only
            self.token_times = deque(maxlen=100_000)
            self.batch_log = deque(maxlen=100_000)
        executor.on_output = self._on_output
        executor.on_error = self._on_error
        for r in requests:
            self.submit(r)

    def submit(self, req: Request) -> None:
        """Queue a request for admission (in arrival order)."""
        self.pending.append(req)
        self.queue_peak = max(self.queue_peak, len(self.pending))

    def submit_threadsafe(self, req: Request) -> None:
        """Live mode, from any thread: queue `req` (its `index` unique among the run's)."""
        self._inbox.put(("submit", req))

    def cancel(self, index: int, reason: str = "cancelled") -> None:
        """From any thread: end request `index` (waiting or running) with `reason` as its
        error, and free its KV on every rank. Unknown or finished: nothing happens."""
        self._inbox.put(("cancel", (index, reason)))

    def drain(self) -> None:
        """From any thread: leave live mode; the loop ends once every request is done."""
        self._inbox.put(("drain", None))

    def _take_inbox(self, timeout: float | None = None) -> None:
        """Act on what other threads handed over; `timeout`: first wait that long for one."""
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            what, arg = item
            if what == "submit":
                self.submit(arg)
            elif what == "cancel":
                self._cancel(*arg)
            elif what == "drain":
                self.live = False
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, index: int, reason: str) -> None:
        for req in self.pending:
            if req.index == index:
                self.pending.remove(req)
                self._emit(Result(req.id, tokens=[], error=reason, line=req.line), index)
                return
        a = self.active.get(index)
        if a is None:
            return
        if a.busy:  # its row comes back first (or is abandoned by a failover): ended then
            a.cancelled = reason
        else:
            self._finish(a, error=reason)

    def _reap_cancelled(self) -> None:
        for a in [a for a in self.active.values() if a.cancelled is not None and not a.busy]:
            self._finish(a, error=a.cancelled)

    @property
    def stages(self) -> int:
        """Ranks the text chain passes through: the pipeline's depth."""
        return len({self.ex.routes[b] for b in self.ex.text_blocks})

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> list[Result]:
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        while (self.pending or self.active or self.live) and self.fatal is None:
            if self.on_turn is not None:
                self.on_turn()
            while self._deferred:
                self.on_peer_failure(self._deferred.pop(0))
            self._take_inbox()
            self._reap_cancelled()
            self._admit()
            self._schedule()
            wait = 0.05
            if not (self.pending or self.active):
                if not self.live:
                    break  # the last token is out: no 50 ms wait for a message that cannot come
                self._take_inbox(timeout=0.05)  # idle: wake at once for a request (peers: 50 ms late at most)
                wait = 0
            try:
                msg = self.transport.recv(timeout=wait)
            except PeerFailure as e:
                self.on_peer_failure(e.rank)
                continue
            if msg is None:
                continue
            try:  # header fields and types, and whether msg.src may send it (runtime.messages)
                kind = check(msg.src, msg.header, me=self.ex.rank, coordinator=self.ex.rank)
            except Refused as e:
                self.ex.refusals.add(msg.src, e)
                continue
            if kind is Kind.ACT:
                self.ex.handle(msg.header, msg.tensors, msg.src)
            elif kind is Kind.ERROR:
                self._on_error(msg.header, msg.tensors)
            else:
                log.debug("coordinator: ignoring %s from rank %d", kind, msg.src)
        if self.fatal is not None:
            self.fail_unfinished(self.fatal)
        if self.on_turn is not None:
            self.on_turn()
        return [self.results[i] for i in sorted(self.results)]

    def stop(self, reason: str) -> None:
        """End the run at the next turn of the loop (a signal, an output that cannot be
        written): admit nothing more; every unfinished request gets `reason` as its error."""
        if self.fatal is None:
            self.fatal = reason

    def fail_unfinished(self, reason: str) -> None:
        """An error row, with the tokens it had, for every request not yet finished."""
        while True:  # live mode: requests handed over but not yet taken get their row too
            try:
                what, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if what == "submit":
                self.pending.append(arg)
        unfinished = list(self.active.values()) + [_Active(r, time.perf_counter()) for r in self.pending]
        unfinished.sort(key=lambda a: a.req.line)
        self.unfinished += [a.req.id for a in unfinished]
        if unfinished:
            log.error("%d requests could not be finished: %s", len(unfinished),
                      ", ".join(str(a.req.id) for a in unfinished))
        self.active.clear()
        self.pending.clear()
        self.batches.clear()
        for a in unfinished:
            self._emit(Result(a.req.id, tokens=a.tokens, error=reason, line=a.req.line), a.req.index)

    def _emit(self, result: Result, index: int) -> None:
        if not self.serving:  # hours of serving: each result goes to on_result only
            self.results[index] = result
        if self.on_result is not None:
            self.on_result(result)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _admit(self) -> None:
        while self.pending and len(self.active) < self.in_flight:
            req = self.pending[0]
            need = int(req.input_ids.shape[1]) + req.max_new_tokens
            if self.kv is not None and not self.kv.reserve(req.index, need):
                short = self.kv.too_small(need)
                if short is None:
                    return  # it waits for KV to be freed
                self.pending.popleft()
                bpt, budget = self.kv.stages[short]
                self._emit(Result(req.id, tokens=[], line=req.line,
                                  error=f"prompt + max_new_tokens = {need} tokens need {need * bpt:,} B of KV on "
                                        f"rank {short}, whose KV budget is {budget:,} B"), req.index)
                continue
            self.pending.popleft()
            gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
            a = _Active(req, time.perf_counter(), generator=gen, order=time.perf_counter())
            a.image = image_span(req.input_ids[0].tolist(), self.ex.blocks.info.image_token_id) \
                if req.pixel_values is not None else None
            self.active[req.index] = a

    def _schedule(self) -> int:
        """Send micro-batches until the pipeline holds enough or nothing is ready; how many sent."""
        sent = 0
        while self.fatal is None and len(self.batches) < self.limits.in_flight(self.stages):
            self._admit()  # a micro-batch run here at once may have finished requests: their places go
            ready = [p for a in self.active.values() if (p := a.pending()) is not None]
            if not ready:
                break
            solo = [p for p in ready if self.active[p.req].solo]
            if solo:
                pieces = form_batch(solo[:1], rows=1, tokens=self.limits.tokens)
            else:
                rows = self.limits.rows_per_batch(len(self.active), self.stages)
                pieces = form_batch(ready, rows=rows, tokens=self.limits.tokens)
            if not pieces:
                break
            self._send_batch(pieces)
            sent += 1
        return sent

    def _send_batch(self, pieces: list[Piece]) -> None:
        self._note_replay(pieces)
        rows, ids, pixels, sizes = [], [], [], []
        for p in pieces:
            a = self.active[p.req]
            rows.append(Row(p.req, a.epoch, p.pos, p.q, p.has_image))
            ids += a.ids(p.pos, p.q)
            if p.has_image:
                pixels.append(a.req.pixel_values)
                if a.req.image_sizes is not None:  # LLaVA-NeXT: its tiles' image size
                    sizes.append(a.req.image_sizes)
            a.fed = p.pos + p.q
            a.busy = True
        mb = MicroBatch(tuple(rows))
        inputs = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels, 0)
        if sizes:
            inputs["image_sizes"] = torch.cat(sizes, 0)
        mb_id = next(self._mb_ids)
        self.batches[mb_id] = mb
        self.batch_log.append((len(mb), mb.T, len(self.batches)))
        if self.on_batch is not None:
            self.on_batch(len(mb), mb.T)
        self.ex.inject(mb_id, mb, inputs)

    def _note_replay(self, pieces: list[Piece]) -> None:
        f = self.failovers[-1] if self.failovers else None
        if f is None or not f.refeeding:
            return
        replayed = [p for p in pieces if p.req in f.refeeding]
        if replayed:
            f.replay_rows.append(len(replayed))
        for p in replayed:
            a = self.active[p.req]
            if p.pos + p.q >= a.prompt_len + len(a.tokens):
                f.refeeding.discard(p.req)

    # ---- results ------------------------------------------------------------------------

    def _on_output(self, header: dict, tensors: dict) -> None:
        sent = self.batches.pop(header["mb"], None)
        if sent is None or sent.to_header() != header["rows"]:
            return  # abandoned (a failover since), or not ours
        logits_all = tensors["logits"].float().cpu()  # the seeded CPU generator samples on CPU
        for i, row in enumerate(sent.rows):
            a = self.active.get(row.req)
            if a is None or a.epoch != row.epoch:
                continue  # finished, or replayed since
            a.busy = False
            if a.cancelled is not None:
                self._finish(a, error=a.cancelled)
                continue
            k = row.pos + row.q - a.prompt_len  # the token these logits choose: its index
            if k < 0:
                continue  # a chunk of the prompt: its logits choose nothing
            self._token(a, k, logits_all[i])

    def _token(self, a: _Active, k: int, logits: torch.Tensor) -> None:
        if k < len(a.tokens):  # replaying: this token is already decided and delivered
            if a.req.temperature == 0 and int(logits.argmax()) != a.tokens[k]:
                self.replay_mismatches += 1
            if k == len(a.tokens) - 1:
                a.exact = False  # the history is back: on as before
            return
        a.exact = False
        token = choose_token(logits, a.req, a.generator)
        a.tokens.append(token)
        if self.on_token is not None:
            self.on_token(a.req.index, token)
        now = time.perf_counter()
        self.token_times.append(now - self.t0)
        for f in self.failovers:
            if f.first_token_after is None:
                f.first_token_after = now - self.t0
        if a.t_first is None:
            a.t_first = now
        if self.count_tokens:
            try:
                self.store.add(TOKENS_KEY, 1)
            except Exception:  # metrics only; the store's loss is handled elsewhere
                pass
        if token in a.req.stop_token_ids or len(a.tokens) >= a.req.max_new_tokens:
            self._finish(a)

    def _finish(self, a: _Active, error: str | None = None) -> None:
        now = time.perf_counter()
        text = None
        if self.tokenizer is not None and error is None:
            text = self.tokenizer.decode(a.tokens, skip_special_tokens=True)
        result = Result(
            a.req.id, tokens=a.tokens, text=text, error=error, replays=a.replays,
            ttft_s=None if a.t_first is None else round(a.t_first - a.t_start, 6),
            latency_s=round(now - a.t_start, 6), line=a.req.line)
        del self.active[a.req.index]
        if self.kv is not None:
            self.kv.release(a.req.index)
        self._broadcast(messages.free(a.req.index))
        self.ex.free(a.req.index)
        self._emit(result, a.req.index)

    def _on_error(self, header: dict, tensors: dict) -> None:
        a = self.active.get(header["req"])
        if a is None or header.get("epoch", a.epoch) != a.epoch:
            return
        if header.get("rows", 1) > 1 and not a.solo:  # maybe another row's fault: alone, from scratch
            log.warning("request %s: a micro-batch of %d rows failed on rank %s (%s); replaying it alone",
                        a.req.id, header["rows"], header.get("rank"), header["error"])
            a.solo = True
            self._replay(a)
            return
        log.warning("request %s failed on rank %s: %s", a.req.id, header.get("rank"), header["error"])
        self._finish(a, error=f"rank {header.get('rank')}: {header['error']}")

    def _replay(self, a: _Active, exact: bool = False) -> None:
        """Start `a` again under a new epoch: every stage drops its KV (on the new epoch), and
        the prompt and the tokens delivered so far are fed again."""
        a.epoch += 1
        a.replays += 1
        a.busy = False
        a.fed = 0
        a.exact = exact and bool(a.tokens)
        self.ex.free(a.req.index)

    def _broadcast(self, header: dict) -> None:
        for r in range(self.transport.world_size):
            if r != self.ex.rank and r not in self.dead:
                try:
                    self.transport.send(r, header, {}, block=False)
                except PeerFailure:
                    pass  # seen through recv() as well

    # ---- failover -----------------------------------------------------------------------

    def on_peer_failure(self, rank: int) -> None:
        if rank in self.dead or rank == self.ex.rank:
            return
        self.dead.add(rank)
        detected_at = self.elapsed
        name = self.names.get(rank, f"rank {rank}")
        lost = [b for b in self.ex.order if self.ex.routes[b] == rank]
        log.warning("%s (rank %d) failed at %.3f s; it ran %d blocks", name, rank, self.elapsed, len(lost))
        if not lost:
            self.failovers.append(Failover(rank, detected_at, {}, [], killed_at=self._killed_at(rank)))
            return
        routes = dict((b, r) for b, r in self.ex.routes.items() if b in set(self.ex.order))
        moved, orphans = {}, []
        for b in lost:
            live = [r for r in sorted(self.holders) if r not in self.dead and b in self.holders[r]]
            pref = self.preferred.get(rank)
            choice = pref if pref in live else (live[0] if live else None)
            if choice is None:
                orphans.append(b)
            else:
                moved[b] = choice
        cold_s = None
        if orphans and self.cold_load is not None:
            target = self.preferred.get(rank)
            if target is not None and target not in self.dead:
                try:
                    cold_s = self._load_cold(target, orphans)
                    self.holders[target] |= set(orphans)
                    moved.update({b: target for b in orphans})
                    orphans = []
                except PeerFailure as e:
                    self.dead.add(e.rank)
        if orphans:
            self.fatal = (f"{name} (rank {rank}) dropped out and no live device holds a copy of "
                          f"{_summary(orphans)}; the request could not be finished")
            log.error(self.fatal)
            return
        routes.update(moved)
        version = self.ex.route_version + 1
        self._broadcast(messages.route(version, routes))
        self.ex.set_routes(routes, version)
        self.batches.clear()  # their rows are replayed under new epochs: late outputs are dropped
        if self.kv_ledger is not None:  # the survivors hold more layers now: their KV per token grows
            self.kv = self.kv_ledger(self.ex.routes)
            # the requests already admitted stay, even past a budget (a stage's store then
            # refuses the micro-batch, and its requests are replayed alone)
            for a in self.active.values():
                self.kv.reserved[a.req.index] = self.kv.need(a.prompt_len + a.req.max_new_tokens)
        replayed = []
        for a in list(self.active.values()):
            # an <image> token among the generated ones would be taken for the image's place
            exact = self.replay == "exact" or self.ex.blocks.info.image_token_id in a.tokens
            self._replay(a, exact=exact)
            replayed.append(a.req.id)
        self.failovers.append(Failover(rank, detected_at, moved, replayed, killed_at=self._killed_at(rank),
                                       cold_load_s=cold_s, refeeding=set(self.active)))
        log.warning("rerouted %s to %s; replaying %d requests", _summary(list(moved)),
                    sorted(set(moved.values())), len(replayed))

    def _load_cold(self, target: int, blocks: list[str]) -> float:
        """Have `target` load `blocks` from the checkpoint; the seconds it took, kill to loaded."""
        t = time.perf_counter()
        log.warning("cold recovery: rank %d loads %s", target, _summary(blocks))
        if target == self.ex.rank:
            self.cold_load(blocks)
            return time.perf_counter() - t
        self.transport.send(target, messages.load(blocks), {}, block=False)
        while time.perf_counter() - t < COLD_LOAD_TIMEOUT_S:
            try:
                msg = self.transport.recv(timeout=0.1)
            except PeerFailure as e:
                if e.rank == target:
                    raise
                self._deferred.append(e.rank)
                continue
            if msg is not None and msg.src == target and kind_of(msg.header) is Kind.LOADED:
                try:
                    check(msg.src, msg.header, me=self.ex.rank, coordinator=self.ex.rank)
                except Refused as e:
                    self.ex.refusals.add(msg.src, e)
                    continue
                return time.perf_counter() - t
            # other traffic belongs to requests about to be replayed: dropped
        raise PeerFailure(target, f"did not load {len(blocks)} blocks within {COLD_LOAD_TIMEOUT_S:.0f} s")

    def _killed_at(self, rank: int) -> float | None:
        """When the launcher injected the kill of `rank`, in seconds since the run started."""
        if self.store is None:
            return None
        try:
            key = INJECTED_KEY.format(rank)
            if not self.store.check([key]):
                return None
            wall = float(self.store.get(key).decode())
        except Exception:  # timing only
            return None
        return wall - self.t0_wall


def _summary(blocks: list[str]) -> str:
    return ", ".join(blocks) if len(blocks) <= 3 else f"{blocks[0]} .. {blocks[-1]} ({len(blocks)} blocks)"
