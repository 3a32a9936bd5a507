"""The HTTP side's handle on a live engine: requests in, tokens back per request, metrics.

The engine loop (`Coordinator.run` in live mode) runs on the process's main thread, where
it also answers signals; the HTTP server (runtime/http_api.py) runs on its own thread with
an asyncio loop. They meet here:

- `LiveEngine.open(job)` (event loop) checks admission (ready, the waiting queue's bound,
  the stages' KV) and hands the Request to the coordinator's thread-safe inbox; it
  returns a `Stream` whose `asyncio.Queue` receives `("token", id)` and `("done", Result)`.
- The coordinator calls `on_token` / `on_result` / `on_batch` on the engine thread; they
  only queue the item, and `flush()` (the coordinator's `on_turn`, once per turn of its
  loop) hands a turn's items to the server's loop in one `loop.call_soon_threadsafe`, so
  the engine never waits on the HTTP side and wakes it once per micro-batch, not once per
  token (each wakeup is a self-pipe write that contends for the GIL with the server's
  thread: per token, that was ~14% of the coordinator thread's samples at 16 clients).
- `Detokenizer` turns a request's tokens into text deltas: the text grows by a window of
  a few tokens per token (not a decode of the whole answer each time, which is quadratic
  in its length), is checked against the whole decode where it matters (a `stop` string,
  the end), so the deltas join into exactly `tokenizer.decode(tokens)`, the text a
  non-streamed answer carries; a half UTF-8 character and any tail that could begin a
  `stop` string are held back until they are decided.
- `ServeMetrics`: prometheus-client on a registry of its own (`/metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from itertools import count

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runtime.chat import ChatError, ChatJob
from runtime.requests import Result

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class ServeLimits:
    max_waiting: int = 64          # requests queued beyond the running ones; then 429
    retry_after_s: int = 1         # the 429's Retry-After


class Detokenizer:
    """Tokens -> text deltas that join into the final text; stops at a `stop` string.

    The text grows by a window, as vLLM's and TGI's detokenizers do: each token decodes
    `tokens[prefix:]` against `tokens[prefix:read]` (both begin at the same token, so a
    tokenizer's leading-space rule cancels) and appends the difference once it ends in whole
    characters, so a token costs a decode of a few tokens, not of the whole answer. A `stop`
    string seen there is confirmed on the whole decode, and `finish` decodes it whole once:
    what is sent is always a prefix of `tokenizer.decode(tokens)`, the text a plain answer
    carries (a window that ever disagreed would hold its text back, never send another)."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.sent = ""                  # the text given out so far
        self.stopped = False            # a stop string was met: the text ends before it
        self.text = ""                  # the windowed decode so far (whole characters)
        self._prefix = self._read = 0   # the window: tokens[prefix:read] made the text's tail

    def add(self, token: int) -> str:
        """The new text that `token` makes certain ("" if it is held back)."""
        self.tokens.append(token)
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix, len(self.tokens))
        if len(now) > len(before) and not now.endswith("\ufffd"):  # a half UTF-8 character waits
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        full = self.text
        if self._first_stop(full) is not None:
            full = self._decode()  # confirmed, and cut, on the whole text
            cut = self._first_stop(full)
            if cut is not None:
                self.stopped = True
                return self._advance(full[:cut])
        hold = max((k for x in self.stop for k in range(1, len(x)) if full.endswith(x[:k])), default=0)
        return self._advance(full[:len(full) - hold])

    def finish(self) -> str:
        """The rest of the text once the request ended (eos or length): nothing held back."""
        if self.stopped:
            return ""
        full = self._decode()
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            full = full[:cut]
        return self._advance(full)

    def _first_stop(self, text: str) -> int | None:
        """Where the first `stop` string in `text` begins, or None."""
        return min((i for x in self.stop if (i := text.find(x)) >= 0), default=None)

    def _decode(self, start: int = 0, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # a decode that changed what came before: keep what was sent
            log.debug("detokenizer: %r no longer starts with %r", text, self.sent)
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


@dataclass
class Stream:
    """One request's side of the HTTP handler: its queue and its clocks."""

    id: str
    index: int
    job: ChatJob
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    created: int = field(default_factory=lambda: int(time.time()))
    t_open: float = field(default_factory=time.perf_counter)
    t_last: float | None = None
    tokens: int = 0
    done: bool = False

    @property
    def per_token(self) -> bool:
        """Whether the HTTP side takes each token (a stream, or `stop` strings to watch for);
        a plain answer without them is decoded once, from its result."""
        return self.job.stream or bool(self.job.stop)


class LiveEngine:
    """Thread-safe: `open`/`cancel`/`close` from the event loop, `on_*` from the engine thread."""

    def __init__(self, *, model_name: str, limits: ServeLimits | None = None):
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self.state = "loading"           # then "ready", "draining", or "failed: why"
        self.coord = None
        self.tokenizer = None
        self.chat = None                 # runtime.chat.ChatContext, once loaded
        self._streams: dict[int, Stream] = {}
        self._by_id: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._index = count()
        self.rank_stats: dict[int, dict] = {}  # worker rank -> {"busy_s", "kv_bytes"}, ~1 s old (engine.py)
        self._outbox: list[tuple[Stream, tuple]] = []  # engine thread only: items until flush()
        self._handed = _Handoff()  # flush() -> each server loop, one wakeup while one is pending
        self.ended_ok = self.ended_failed = self.tokens_out = 0  # results so far (engine thread)
        self.metrics = ServeMetrics(self)

    # ---- engine side -------------------------------------------------------------------

    def attach(self, coord, chat_context) -> None:
        """The coordinator is built and every rank has loaded: serve."""
        self.coord, self.chat, self.tokenizer = coord, chat_context, chat_context.processor.tokenizer
        self.state = "ready"

    def on_token(self, index: int, token: int) -> None:
        s = self._streams.get(index)
        if s is None:
            return
        if s.per_token:
            self._post(s, ("token", token))
        else:  # a plain answer without stop strings waits for its result only: its clocks here
            self.token_seen(s)

    def on_result(self, result: Result) -> None:
        if result.error is None:
            self.ended_ok += 1
            self.tokens_out += len(result.tokens)
        else:
            self.ended_failed += 1
        with self._lock:
            s = self._streams.pop(result.line, None)  # line: the stream's index (set in open)
            if s is not None:
                self._by_id.pop(s.id, None)
        if s is not None:
            self._post(s, ("done", result))

    def on_batch(self, rows: int, tokens: int) -> None:
        self.metrics.batch_rows.observe(rows)

    def totals(self, wall: float) -> dict:
        """`serve --metrics`: the requests served (a cancelled or failed one counts as failed)."""
        n = self.ended_ok + self.ended_failed
        return {"requests": n, "completed": self.ended_ok, "failed": self.ended_failed,
                "requests_per_s": round(self.ended_ok / wall, 4) if wall else None,
                "tokens_per_s": round(self.tokens_out / wall, 4) if wall else None}

    def ended(self, why: str | None) -> None:
        """The engine loop is over (drained, or a fatal end): refuse from now on."""
        self.flush()
        self.state = f"failed: {why}" if why else "stopped"

    def _post(self, s: Stream, item) -> None:
        self._outbox.append((s, item))

    def flush(self) -> None:
        """Engine thread: hand the queued tokens and results to their loops, one wakeup each
        (none while a loop has not yet taken the last: it takes these with them)."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for s, item in items:
            by_loop.setdefault(s.loop, []).append((s.queue, item))
        for loop, batch in by_loop.items():
            self._handed.put(loop, batch)

    # ---- HTTP side ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.coord is not None and self.coord.fatal is None

    def unavailable(self) -> ChatError:
        why = {"loading": "Loading model", "draining": "The server is shutting down"}.get(self.state)
        if why is None:
            why = (self.coord.fatal if self.coord is not None and self.coord.fatal else None) or self.state
        return ChatError(503, why, type="unavailable_error", code="unavailable")

    def running(self) -> int:
        return len(self.coord.active) if self.coord is not None else 0

    def waiting(self) -> int:
        return max(0, len(self._streams) - self.running())

    def open(self, job: ChatJob) -> Stream:
        """Admit `job` (or raise ChatError 503 / 429 / 400) and hand it to the engine."""
        if not self.ready:
            raise self.unavailable()
        req = job.request
        kv = self.coord.kv
        if kv is not None:
            need = job.prompt_tokens + req.max_new_tokens
            short = kv.too_small(need)
            if short is not None:
                self.metrics.rejections.labels("kv").inc()
                bpt, budget = kv.stages[short]
                raise ChatError(400, f"prompt + max_tokens = {need} tokens need {need * bpt:,} B of KV on rank "
                                     f"{short}, whose KV budget is {budget:,} B", param="max_tokens",
                                code="context_length_exceeded")
        with self._lock:
            # queued beyond what may run (--max-running): the engine thread admits a moment
            # later, so a burst of K must not count as waiting meanwhile
            if len(self._streams) - max(self.running(), self.coord.in_flight) >= self.limits.max_waiting:
                self.metrics.rejections.labels("queue_full").inc()
                raise ChatError(429, f"{self.waiting()} requests are waiting, the most this server queues "
                                     f"(--max-waiting {self.limits.max_waiting}); retry later",
                                type="rate_limit_error", code="rate_limit_exceeded")
            index = next(self._index)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            req.id, req.index, req.line = rid, index, index
            s = Stream(rid, index, job, asyncio.Queue(), asyncio.get_running_loop())
            self._streams[index] = s
            self._by_id[rid] = s
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self.coord.submit_threadsafe(req)
        return s

    def cancel(self, s: Stream, reason: str = "cancelled") -> None:
        """End `s` in the engine (its KV freed on every rank); its ("done", ...) still comes."""
        if not s.done and self.coord is not None:
            self.metrics.cancellations.labels(reason.split(":")[0]).inc()
            self.coord.cancel(s.index, reason)

    def find(self, rid: str) -> Stream | None:
        return self._by_id.get(rid)

    def token_seen(self, s: Stream) -> None:
        """A token of `s` reached the HTTP side (or, for a plain answer decoded once, the
        engine thread: `Stream.per_token`): the latency histograms."""
        now = time.perf_counter()
        if s.t_last is None:
            self.metrics.ttft.observe(now - s.t_open)
        else:
            self.metrics.itl.observe(now - s.t_last)
        s.t_last = now
        s.tokens += 1
        self.metrics.generated_tokens.inc()

    def closed(self, s: Stream, finish_reason: str) -> None:
        s.done = True
        self.metrics.e2e.observe(time.perf_counter() - s.t_open)
        self.metrics.finished.labels(finish_reason).inc()

    def drain(self) -> None:
        """Stop admitting; the engine ends once what runs is done."""
        if self.state == "ready":
            self.state = "draining"
        if self.coord is not None:
            self.coord.drain()


class _Handoff:
    """Items from the engine thread to each server loop. A wakeup (call_soon_threadsafe) is
    scheduled only when the loop's list was empty: a loop still behind (its thread waiting
    for the GIL on a busy rank) takes several turns' tokens in one wakeup, in order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue, tuple]]) -> None:
        with self._lock:
            waiting = self._waiting.get(loop)
            if waiting:
                waiting.extend(batch)
                return
            self._waiting[loop] = list(batch)
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # the server's loop is closed: nobody is listening
            with self._lock:
                self._waiting.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._waiting.pop(loop, [])
        for q, item in batch:
            q.put_nowait(item)


class ServeMetrics:
    """The server's Prometheus metrics (names after vLLM's, prefix `adaptlink:`)."""

    def __init__(self, engine: LiveEngine):
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("adaptlink:prompt_tokens", "Prompt tokens admitted (image tokens included)",
                                     registry=r)
        self.generated_tokens = Counter("adaptlink:generation_tokens", "Tokens generated and sent", registry=r)
        self.ttft = Histogram("adaptlink:time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("adaptlink:inter_token_latency_seconds", "Between two tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("adaptlink:e2e_request_latency_seconds", "Request arrival to its end",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("adaptlink:micro_batch_rows", "Rows (requests) per micro-batch sent",
                                    buckets=ROW_BUCKETS, registry=r)
        self.cancellations = Counter("adaptlink:cancellations", "Requests cancelled (disconnect, cancel, stop)",
                                     ["reason"], registry=r)
        self.rejections = Counter("adaptlink:rejections", "Requests refused at admission", ["reason"], registry=r)
        self.finished = Counter("adaptlink:requests_finished", "Requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        r.register(_EngineCollector(engine))


class _EngineCollector:
    """Read at each scrape from the engine's own state (another thread's: read, never changed)."""

    def __init__(self, engine: LiveEngine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        e = self.engine
        running = GaugeMetricFamily("adaptlink:num_requests_running", "Requests admitted and running")
        waiting = GaugeMetricFamily("adaptlink:num_requests_waiting", "Requests waiting for admission")
        running.add_metric([], e.running())
        waiting.add_metric([], e.waiting())
        yield running
        yield waiting
        ready = GaugeMetricFamily("adaptlink:ready", "1 when /health answers 200")
        ready.add_metric([], 1.0 if e.ready else 0.0)
        yield ready
        coord = e.coord
        if coord is None:
            return
        failovers = CounterMetricFamily("adaptlink:failovers", "Devices lost and routed around")
        failovers.add_metric([], len(coord.failovers))
        yield failovers
        kv = GaugeMetricFamily("adaptlink:kv_reserved_bytes", "KV bytes reserved per rank (the coordinator's "
                               "ledger of what each stage holds for admitted requests)", labels=["rank"])
        for _ in range(3):  # the engine thread may change the ledger mid-read: read again
            try:
                stats = coord.kv.stats() if coord.kv is not None else {}
                break
            except RuntimeError:
                stats = {}
        for rank, st in stats.items():
            kv.add_metric([str(rank)], st["reserved"])
        yield kv
        busy = CounterMetricFamily("adaptlink:busy_seconds", "Seconds each rank spent computing (workers: "
                                   "as they published it, about a second ago)", labels=["rank"])
        used = GaugeMetricFamily("adaptlink:kv_bytes", "KV bytes each rank's stores hold (workers: about a "
                                 "second ago)", labels=["rank"])
        busy.add_metric([str(coord.ex.rank)], coord.ex.busy_s)
        try:
            used.add_metric([str(coord.ex.rank)], coord.ex.kv_bytes())
        except RuntimeError:  # the engine thread changed the stores mid-read
            pass
        for rank, st in sorted(dict(e.rank_stats).items()):
            if rank not in coord.dead:
                busy.add_metric([str(rank)], float(st.get("busy_s", 0.0)))
                used.add_metric([str(rank)], float(st.get("kv_bytes", 0)))
        yield busy
        yield used
