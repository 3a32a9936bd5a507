"""The coordinator: where requests arrive and tokens leave. Keeps K requests in flight.

It runs on the coordinator rank beside that rank's StageExecutor (which holds
`text.embed` and `head`). For each request it issues step 0 (the prompt, and the image
to whichever rank runs `vision.embed`), takes the head's logits, chooses the token and
issues the next step, until a stop token or `max_new_tokens`; then it tells every rank
to free the request's KV cache.

Failover: when a rank fails (its send/recv broke, its heartbeat stopped, or the launcher
reaped it), every block routed to it moves to a live rank that preloaded a copy (the
plan's backup holder first), the new routes go to every rank, and every request in
flight is replayed under a new epoch. `replay="recompute"` (default) prefills the prompt
and every token already generated in one pass, whose last logits give the next new
token at once (as vLLM's recompute preemption): recovery costs one prefill, not one
pipeline pass per token generated. `replay="exact"` keeps the original chunking (the
prompt as one prefill, then each token fed back one step at a time), so the replayed
cache is bitwise the lost one; it also checks each replayed token against the delivered
one (`replay_mismatches`). A block with no live copy left ends the run: unfinished
requests get an error line, never a hang.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from runtime import messages
from runtime.launcher import INJECTED_KEY, TOKENS_KEY
from runtime.messages import Kind, Refused, check, kind_of
from runtime.requests import Request, Result, choose_token
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
    recompute: bool = False  # the next issue replays the history in one prefill


@dataclass
class Failover:
    rank: int
    detected_at: float            # seconds since the run started
    rerouted: dict[str, int]      # block -> new rank
    replayed: list[str]           # request ids replayed
    first_token_after: float | None = None
    killed_at: float | None = None  # when an injected kill hit it (launcher's record), same clock
    cold_load_s: float | None = None  # cold recovery: time to load the share on its new holder


class Coordinator:
    def __init__(self, executor: StageExecutor, transport: Transport, requests: list[Request], *,
                 in_flight: int, holders: dict[int, set[str]], preferred: dict[int, int | None],
                 tokenizer=None, store=None, names: dict[int, str] | None = None,
                 cold_load=None, replay: str = "recompute", count_tokens: bool = False,
                 on_result=None):
        self.ex, self.transport = executor, transport
        # on_result(Result): called once per request the moment its row is decided (finished,
        # failed, or left unfinished by a fatal end), so out.jsonl is written as it goes
        self.on_result = on_result
        self.pending = list(requests)
        self.by_index = {r.index: r for r in requests}
        self.in_flight = max(1, in_flight)
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
        # (request index, epoch, step) to issue from the main loop: issuing from the head's
        # output callback would recurse once per token where one rank runs the whole text
        # chain (a 1-device plan hit Python's recursion limit after ~160 tokens)
        self._ready: deque[tuple[int, int, int]] = deque()
        self.active: dict[int, _Active] = {}
        self.results: dict[int, Result] = {}
        self.dead: set[int] = set()
        self.failovers: list[Failover] = []
        self.replay_mismatches = 0
        self.fatal: str | None = None
        self.unfinished: list[str] = []  # ids of the requests a fatal failure left unfinished
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        self.token_times: list[float] = []  # seconds since start, one per delivered token
        executor.on_output = self._on_output
        executor.on_error = self._on_error

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> list[Result]:
        self.t0, self.t0_wall = time.perf_counter(), time.time()
        while (self.pending or self.active) and self.fatal is None:
            while self._deferred:
                self.on_peer_failure(self._deferred.pop(0))
            for _ in range(len(self._ready)):  # the steps ready now; those they make ready wait a turn
                self._issue_ready(*self._ready.popleft())
            self._admit()  # after the steps: one of them may have finished a request
            if not (self.pending or self.active):
                break  # the last token is out: no 50 ms wait for a message that cannot come
            try:
                msg = self.transport.recv(timeout=0 if self._ready else 0.05)
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
        return [self.results[i] for i in sorted(self.results)]

    def stop(self, reason: str) -> None:
        """End the run at the next turn of the loop (a signal, an output that cannot be
        written): admit nothing more; every unfinished request gets `reason` as its error."""
        if self.fatal is None:
            self.fatal = reason

    def fail_unfinished(self, reason: str) -> None:
        """An error row, with the tokens it had, for every request not yet finished."""
        unfinished = list(self.active.values()) + [_Active(r, time.perf_counter()) for r in self.pending]
        unfinished.sort(key=lambda a: a.req.line)
        self.unfinished += [a.req.id for a in unfinished]
        if unfinished:
            log.error("%d requests could not be finished: %s", len(unfinished),
                      ", ".join(str(a.req.id) for a in unfinished))
        self.active.clear()
        self.pending.clear()
        for a in unfinished:
            self._emit(Result(a.req.id, tokens=a.tokens, error=reason, line=a.req.line), a.req.index)

    def _emit(self, result: Result, index: int) -> None:
        self.results[index] = result
        if self.on_result is not None:
            self.on_result(result)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _admit(self) -> None:
        while self.pending and len(self.active) < self.in_flight:
            req = self.pending.pop(0)
            gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
            self.active[req.index] = _Active(req, time.perf_counter(), generator=gen)
            self._issue(self.active[req.index], 0)

    def _issue_ready(self, index: int, epoch: int, step: int) -> None:
        a = self.active.get(index)
        if a is not None and a.epoch == epoch:  # not finished, nor replayed since
            self._issue(a, step)

    def _issue(self, a: _Active, step: int) -> None:
        req = a.req
        S = req.input_ids.shape[1]
        if step > 0 and step == len(a.tokens) and a.recompute:
            # replay: the prompt and every token generated so far in one prefill
            a.recompute = False
            inputs = {"input_ids": torch.cat([req.input_ids, torch.tensor([a.tokens], dtype=torch.long)], 1)}
            if req.pixel_values is not None:
                inputs["pixel_values"] = req.pixel_values
            self.ex.inject(req.index, a.epoch, step, 0, inputs, image=req.pixel_values is not None)
        elif step == 0:
            inputs = {"input_ids": req.input_ids}
            if req.pixel_values is not None:
                inputs["pixel_values"] = req.pixel_values
            self.ex.inject(req.index, a.epoch, 0, 0, inputs, image=req.pixel_values is not None)
        else:
            ids = torch.tensor([[a.tokens[step - 1]]], dtype=torch.long)
            self.ex.inject(req.index, a.epoch, step, S + step - 1, {"input_ids": ids}, image=False)

    # ---- results ------------------------------------------------------------------------

    def _on_output(self, header: dict, tensors: dict) -> None:
        a = self.active.get(header["req"])
        if a is None or header["epoch"] != a.epoch:
            return  # finished, or stale traffic of a replayed request
        step = header["step"]
        logits = tensors["logits"][0].float().cpu()  # the seeded CPU generator samples on CPU, whatever the head's device
        if step < len(a.tokens):  # replaying: this token is already decided and delivered
            if a.req.temperature == 0 and int(logits.argmax()) != a.tokens[step]:
                self.replay_mismatches += 1
            self._ready.append((a.req.index, a.epoch, step + 1))
            return
        token = choose_token(logits, a.req, a.generator)
        a.tokens.append(token)
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
        else:
            self._ready.append((a.req.index, a.epoch, step + 1))

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
        self._broadcast(messages.free(a.req.index))
        self.ex.free(a.req.index)
        self._emit(result, a.req.index)

    def _on_error(self, header: dict, tensors: dict) -> None:
        a = self.active.get(header["req"])
        if a is not None and header.get("epoch", a.epoch) == a.epoch:
            log.warning("request %s failed on rank %s: %s", a.req.id, header.get("rank"), header["error"])
            self._finish(a, error=f"rank {header.get('rank')}: {header['error']}")

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
        replayed = []
        for a in list(self.active.values()):
            a.epoch += 1
            a.replays += 1
            self.ex.free(a.req.index)
            replayed.append(a.req.id)
            # an <image> token among the generated ones would be taken for the image's place
            a.recompute = (self.replay == "recompute" and bool(a.tokens)
                           and self.ex.blocks.info.image_token_id not in a.tokens)
            self._issue(a, len(a.tokens) if a.recompute else 0)
        self.failovers.append(Failover(rank, detected_at, moved, replayed, killed_at=self._killed_at(rank),
                                       cold_load_s=cold_s))
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
