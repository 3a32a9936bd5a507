"""Point-to-point messages between ranks over gloo that survive a peer dying.

`Transport(rank, world_size)` sits on an initialised gloo default group (see
`runtime.launcher.init_rank`). Each message is a msgpack header plus named raw tensors
(`runtime.wire`), numbered per (src, dst) link.

    t = Transport(rank, world_size, links=LinkEmulation.from_spec(plan["links"], ranks))
    t.send(dst, {"req": 3, "pos": 17}, {"hidden": h})          # returns once delivered
    fut = t.send(dst, header, tensors, block=False)            # queued; fut.result() to wait
    msg = t.recv(timeout=0.1)                                  # any source; None on timeout
    # raises PeerFailure(rank) once for every peer that fails or is fenced

Threads, and why (docs/FAILOVER.md):
- gloo sends are rendezvous: `dist.send` returns only once the receiver has posted its
  `recv`. One receiver thread therefore keeps an any-source recv of the fixed-size prefix
  posted at all times and queues complete messages; one sender thread per destination
  drains a FIFO, so `send(block=False)` never waits and messages to one peer stay in order.
- A prefix is received any-source on TAG_PREFIX; the body and bulk tensors are then
  received from that sender only, on TAG_BODY. A sender's thread sends its prefix, body
  and tensors back to back, and its next prefix only after the receiver took the last
  tensor, so two senders to one receiver cannot interleave.
- gloo must never time out (a timeout breaks every pair of the process): the group is
  created with a timeout of hours and every wait is bounded from the watchdog thread
  instead. A peer that dies makes its pending send/recv raise within milliseconds; a peer
  that hangs is fenced by `Membership` (heartbeats) through `fence()`, or, as a backstop,
  by the watchdog after `stall_timeout_s`. The thread stuck on the hung peer is abandoned
  (a fresh receiver thread takes over) and the pairs between survivors are untouched.
- A fenced rank is dead to this transport for good: sends to it raise, its messages are
  dropped. Messages received from it before the fence are still delivered, before its
  PeerFailure.

Trust (issue 14): with a `secret` (`runtime.auth.RunSecret`; the runtime always passes
one) every message carries an HMAC tag over the run id, (src, dst, seq) and all of its
bytes (`runtime.wire`), checked before the message is delivered; its seq must be the
next one on that link (a replayed or reordered frame is refused). Before anything is
allocated, the announced sizes are bounded by `max_message_bytes` (what one message of
this run can carry, `runtime.messages.message_cap`), which also bounds the watchdog's
stall allowance (a 4 GiB announcement once held the receiver for ~4,300 s). A frame that
fails any check — not msgpack, wrong types, over the cap, a bad tag, a replay — is that
peer's failure: it is fenced as a protocol error (logged once, counted in
`stats()["protocol_errors"]`), and the receiver thread goes on with the other peers.

Length: ~620 lines, over the house style's ~500: one protocol (framing, sender and
receiver threads, fencing a dead peer, link emulation) whose parts share its locks and
queues; the wire format itself is apart in runtime/wire.py, link probing in runtime/probe.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from adaptlink.model.emulation import EmulationError, parse_rate, parse_seconds
from partitioner.types import Link
from runtime import probe, wire
from runtime.auth import RunSecret
from runtime.wire import TAG_BODY, TAG_PREFIX, WireError

log = logging.getLogger(__name__)

MIN_BANDWIDTH = 1e6  # B/s: the stall bound grows by nbytes / MIN_BANDWIDTH for big messages
WATCHDOG_PERIOD_S = 0.02


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of str(e)`, at most `limit` chars; never raises (str(e) may be empty,
    or a __str__ may itself fail)."""
    try:
        text = str(e)
    except Exception:
        text = ""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    name = type(e).__name__
    return (f"{name}: {first}" if first else name)[:limit]


class PeerFailure(RuntimeError):
    """Rank `rank` failed (its send/recv raised, it stalled, or it was fenced)."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"rank {rank} failed: {reason}")
        self.rank = rank
        self.reason = reason


@dataclass(slots=True)
class Message:
    src: int
    seq: int  # per (src, dst) link, from 0, no gaps
    header: dict
    tensors: dict[str, torch.Tensor]  # CPU, contiguous; small ones are views of one buffer


# ---------------------------------------------------------------------------- links
# `Link` is the partitioner's (partitioner.types.Link, imported above): one class for a link
# the planner costs and a link the transport enforces; `link.seconds(nbytes)` is the time
# one message of nbytes takes (latency + nbytes / bandwidth).


class LinkEmulation:
    """Slower links than the real ones, enforced by the sender.

    `pairs` maps (src, dst) ranks to a `Link` or `(bandwidth_bytes_per_s, latency_s)`; a
    pair also shapes the reverse direction unless that one is given too. Other pairs use
    `default` (None: not emulated). Each message on an emulated link is held back so that
    it takes at least latency + bytes / bandwidth from the moment the link picks it up;
    one message at a time per link, so back-to-back messages share the bandwidth.
    """

    def __init__(self, pairs: Mapping[tuple[int, int], Link | tuple[float, float]] | None = None,
                 default: Link | tuple[float, float] | None = None):
        def as_link(v):
            return v if isinstance(v, Link) or v is None else Link(*v)

        self.default = as_link(default)
        self.pairs: dict[tuple[int, int], Link] = {}
        for (s, d), v in (pairs or {}).items():
            self.pairs[(s, d)] = as_link(v)
        for (s, d), v in list(self.pairs.items()):
            self.pairs.setdefault((d, s), v)

    def link(self, src: int, dst: int) -> Link | None:
        if src == dst:
            return None
        return self.pairs.get((src, dst), self.default)

    @classmethod
    def from_spec(cls, links: Mapping, rank_of: Mapping[str, int], *,
                  only_emulated: bool = True) -> "LinkEmulation":
        """From the `links` object of cluster.json / plan.json (device names -> ranks).

        With `only_emulated`, only entries marked `"emulated": true` are enforced; the
        others describe real links and need nothing from the transport.
        """
        def pick(entry):
            if entry is None or (only_emulated and not entry.get("emulated", False)):
                return None
            # a profiled emulated link: enforce what was asked for, not what was measured
            entry = {**entry, **(entry.get("emulated_as") or {})}
            return Link(float(entry["bandwidth_bytes_per_s"]), float(entry.get("latency_s", 0.0)))

        pairs = {}
        for p in links.get("pairs", []):
            if (link := pick(p)) is not None:
                pairs[(rank_of[p["src"]], rank_of[p["dst"]])] = link
        return cls(pairs, pick(links.get("default")))

    def __repr__(self):
        return f"LinkEmulation(pairs={self.pairs}, default={self.default})"


# ---------------------------------------------------------------------------- transport
@dataclass(slots=True)
class _Outgoing:
    seq: int
    frame: wire.Frame
    future: Future


class _Outbox:
    """FIFO and sender thread of one destination."""

    def __init__(self):
        self.q: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.seq = 0  # next sequence number on this link
        self.inflight: _Outgoing | None = None
        self.since = 0.0  # monotonic time the inflight gloo send began
        self.thread: threading.Thread | None = None


def _settle(fut: Future, exc: BaseException | None) -> None:
    try:
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass  # already failed by fence() while the gloo send was stuck


class Transport:
    """Messages to and from any rank of the gloo default group. See the module docstring."""

    def __init__(self, rank: int, world_size: int, *, links: LinkEmulation | None = None,
                 stall_timeout_s: float = 10.0, secret: RunSecret | None = None,
                 max_message_bytes: int | None = None, members: Sequence[int] | None = None):
        """`secret`: tags sent and checked on every message (None: untagged, unit tests
        only). `max_message_bytes`: the most one message may carry (default
        wire.DEFAULT_MAX_BYTES); a peer announcing more is fenced before anything is allocated.
        `members`: the ranks of the gloo group in group order (`RankContext.members`;
        default every rank): a rank of the run left out of the group (it died before
        joining) is fenced from the start, so the coordinator takes it as a dropout."""
        if not dist.is_initialized():
            raise RuntimeError("Transport needs an initialised process group (runtime.launcher.init_rank)")
        self.rank, self.world_size = rank, world_size
        # run rank <-> gloo group rank (they differ once a rank died before joining)
        self.members = tuple(members) if members else tuple(range(world_size))
        self._group_rank = {r: i for i, r in enumerate(self.members)}
        self.links = links
        self.stall_timeout_s = stall_timeout_s
        self.secret = secret
        self.max_message_bytes = int(max_message_bytes or wire.DEFAULT_MAX_BYTES)
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Message | PeerFailure] = queue.SimpleQueue()
        self._fenced: dict[int, str] = {}
        self._callbacks: list[Callable[[int, str], None]] = []
        self._seq_in = [0] * world_size
        self._out: dict[int, _Outbox] = {}
        self._local = _Outbox()  # numbering of messages to oneself (no thread)
        self._closed = threading.Event()
        # receiver: (src, started, nbytes) while a message is being received from src
        self._rx_gen = 0
        self._rx_state: tuple[int, float, int] | None = None
        self._sent = defaultdict(lambda: {"messages": 0, "bytes": 0, "busy_s": 0.0, "emulated_s": 0.0})
        self._received = defaultdict(lambda: {"messages": 0, "bytes": 0})
        self._counters = {"anysrc_errors": 0, "dropped_from_fenced": 0, "seq_gaps": 0, "receiver_restarts": 0,
                          "protocol_errors": 0, "bad_tags": 0}
        self._start_receiver(0)
        self._watchdog = threading.Thread(target=self._watch, name=f"transport{rank}-watchdog", daemon=True)
        self._watchdog.start()
        for r in range(world_size):
            if r not in self._group_rank:
                self.fence(r, f"rank {r} died before joining the group")

    # ------------------------------------------------------------------ public API
    def send(self, dst: int, header: dict, tensors: dict[str, torch.Tensor] | None = None, *,
             block: bool = True, timeout: float | None = None) -> Future:
        """Send one message to `dst`; returns its future (done when the receiver has it).

        `block=True` waits for delivery (raises PeerFailure if `dst` fails, TimeoutError
        after `timeout`, the message staying queued); `block=False` only queues it.
        The header must be msgpack (WireError otherwise, raised here). Tensors over
        wire.INLINE_MAX are sent from the caller's memory: leave them unchanged until the
        future is done. CUDA tensors are copied to CPU here.
        """
        if not 0 <= dst < self.world_size:
            raise ValueError(f"dst {dst} is not a rank of a world of {self.world_size}")
        if self._closed.is_set():
            raise RuntimeError("transport is closed")
        if dst == self.rank:  # to oneself: same copy and header round trip, no gloo
            return self._send_local(header, tensors)
        fut: Future = Future()
        with self._lock:
            if dst in self._fenced:
                raise PeerFailure(dst, self._fenced[dst])
            box = self._outbox(dst)
        with box.lock:  # numbering and queueing in one step: seq order is queue order
            # raises WireError before seq is used
            frame = wire.encode(box.seq, header, tensors, secret=self.secret, src=self.rank, dst=dst)
            box.q.put(_Outgoing(box.seq, frame, fut))
            box.seq += 1
        if block:
            fut.result(timeout)
        return fut

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message from any rank, or None after `timeout` seconds.

        Raises PeerFailure once per failed or fenced peer, in order with its messages.
        """
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, PeerFailure):
            raise item
        return item

    def fence(self, rank: int, reason: str = "fenced", *, notify: bool = True) -> bool:
        """Declare `rank` dead for this transport: pending and future sends to it fail,
        its messages are dropped from now on, a receive stuck on it is abandoned. With
        `notify`, recv() raises PeerFailure(rank) once. False if it was already fenced."""
        if rank == self.rank or not 0 <= rank < self.world_size:
            raise ValueError(f"cannot fence rank {rank} (self {self.rank}, world {self.world_size})")
        exc = PeerFailure(rank, reason)
        with self._lock:
            if rank in self._fenced:
                return False
            self._fenced[rank] = reason
            if self._rx_state is not None and self._rx_state[0] == rank:
                self._rx_state = None
                self._counters["receiver_restarts"] += 1
                self._start_receiver(self._rx_gen + 1)  # the stuck thread exits when it wakes
            victims = []
            if (box := self._out.get(rank)) is not None:
                if box.inflight is not None:
                    victims.append(box.inflight)
                while True:
                    try:
                        item = box.q.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        victims.append(item)
                    else:
                        box.q.put(None)
                        break
            if notify:
                self._inbox.put(exc)  # under the lock: after every message already queued
            callbacks = list(self._callbacks)
        log.warning("rank %d: peer rank %d fenced: %s", self.rank, rank, reason)
        for item in victims:
            _settle(item.future, exc)
        for cb in callbacks:
            try:
                cb(rank, reason)
            except Exception:
                log.exception("peer-failure callback failed")
        return True

    def on_peer_failure(self, callback: Callable[[int, str], None]) -> None:
        """Call `callback(rank, reason)` (from a transport thread) when a peer is fenced."""
        with self._lock:
            self._callbacks.append(callback)

    @property
    def fenced(self) -> dict[int, str]:
        """Fenced ranks and why."""
        with self._lock:
            return dict(self._fenced)

    def alive(self) -> list[int]:
        with self._lock:
            return [r for r in range(self.world_size) if r not in self._fenced]

    def stats(self) -> dict:
        """Counters for metrics: per destination and source, messages and bytes; the bytes
        are what the link carried (body + tensors, not the 32-byte prefix)."""
        with self._lock:
            return {
                "rank": self.rank,
                "sent": {d: dict(v) for d, v in sorted(self._sent.items())},
                "received": {s: dict(v) for s, v in sorted(self._received.items())},
                "fenced": dict(self._fenced),
                **self._counters,
            }

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued sends (up to `timeout`) and stop the sender threads. The receiver
        thread stays blocked in gloo until the process exits (gloo cannot cancel a recv)."""
        if self._closed.is_set():
            return
        with self._lock:
            boxes = list(self._out.values())
        for box in boxes:
            box.q.put(None)
        deadline = time.monotonic() + timeout
        for box in boxes:
            box.thread.join(max(0.0, deadline - time.monotonic()))
        self._closed.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ internals
    def _send_local(self, header, tensors) -> Future:
        with self._lock:
            box = self._local
            frame = wire.encode(box.seq, header, tensors)  # untagged: it never leaves the process
            box.seq += 1
            pre = wire.decode_prefix(frame.prefix, max_bytes=1 << 62)
            seq, h, specs = wire.decode_envelope(frame.body, pre, max_bytes=1 << 62)
            msg = Message(self.rank, seq, h, wire.materialize(specs, frame.body, pre,
                                                              [b.clone() for b in frame.bulk]))
            self._inbox.put(msg)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _outbox(self, dst: int) -> _Outbox:
        box = self._out.get(dst)
        if box is None:
            box = self._out[dst] = _Outbox()
            box.thread = threading.Thread(target=self._send_loop, args=(dst, box),
                                          name=f"transport{self.rank}-to{dst}", daemon=True)
            box.thread.start()
        return box

    def _send_loop(self, dst: int, box: _Outbox) -> None:
        link = self.links.link(self.rank, dst) if self.links else None
        while True:
            item = box.q.get()
            if item is None:
                return
            if item.future.done():
                continue
            t_pick = time.monotonic()
            if link is not None:  # emulated link: hold the message until its delivery time
                pad = t_pick + link.seconds(item.frame.payload_bytes) - time.monotonic()
                if pad > 0:
                    time.sleep(pad)
            with self._lock:
                if dst in self._fenced:
                    exc = PeerFailure(dst, self._fenced[dst])
                else:
                    exc = None
                    box.inflight, box.since = item, time.monotonic()
            if exc is not None:
                _settle(item.future, exc)
                continue
            fr = item.frame
            try:
                peer = self._group_rank[dst]
                dist.send(fr.prefix, peer, tag=TAG_PREFIX)
                dist.send(fr.body, peer, tag=TAG_BODY)
                for b in fr.bulk:
                    dist.send(b, peer, tag=TAG_BODY)
            except Exception as e:  # gloo: the peer is gone (its connection closed)
                with self._lock:
                    if box.inflight is item:
                        box.inflight = None
                self.fence(dst, f"send to rank {dst} failed: {one_line(e)}")
                _settle(item.future, PeerFailure(dst, self._fenced.get(dst, str(e))))
                continue
            now = time.monotonic()
            with self._lock:
                if box.inflight is item:
                    box.inflight = None
                s = self._sent[dst]
                s["messages"] += 1
                s["bytes"] += fr.payload_bytes
                s["busy_s"] += now - t_pick
                s["emulated_s"] += (box.since - t_pick) if link is not None else 0.0
            _settle(item.future, None)

    def _start_receiver(self, gen: int) -> None:
        # caller holds the lock (or is __init__)
        self._rx_gen = gen
        threading.Thread(target=self._recv_loop, args=(gen,), name=f"transport{self.rank}-recv{gen}",
                         daemon=True).start()

    def _protocol_error(self, src: int, reason: str, counter: str | None = None) -> None:
        """A frame from `src` failed a check: `src` is fenced (logged once by fence())."""
        with self._lock:
            self._counters["protocol_errors"] += 1
            if counter:
                self._counters[counter] += 1
        self.fence(src, f"protocol error from rank {src}: {reason}")

    def _recv_loop(self, gen: int) -> None:
        failures_in_a_row = 0
        while True:
            try:
                if self._recv_one(gen) == "stale":
                    return
            except Exception:  # a bug here must not silence this rank: log, go on
                log.exception("rank %d: receiver error; going on", self.rank)
                with self._lock:
                    self._rx_state = None if self._rx_gen == gen else self._rx_state
                failures_in_a_row += 1
                time.sleep(min(0.001 * failures_in_a_row, 0.05))
                continue
            failures_in_a_row = 0

    def _recv_one(self, gen: int) -> str | None:
        """Receive and deliver (or refuse) one message; "stale" once this thread is abandoned."""
        prefix = torch.empty(wire.PREFIX_LEN, dtype=torch.int64)
        try:
            src = self.members[dist.recv(prefix, src=None, tag=TAG_PREFIX)]
        except Exception as e:
            # A sender that dies mid-transfer can reset a pending any-source recv
            # (docs/FAILOVER.md): re-post and go on.
            with self._lock:
                self._counters["anysrc_errors"] += 1
            log.debug("rank %d: any-source recv raised (%s); re-posting", self.rank, one_line(e))
            time.sleep(0.001)
            return None
        if self._rx_gen != gen:
            return "stale"
        with self._lock:
            if src in self._fenced:
                self._counters["dropped_from_fenced"] += 1
                return None
        try:
            pre = wire.decode_prefix(prefix, self.max_message_bytes)
        except WireError as e:  # nothing more is received from src: its body send never matches
            self._protocol_error(src, one_line(e))
            return None
        with self._lock:
            self._rx_state = (src, time.monotonic(), pre.body_len)
        stage = "receive from"
        try:
            body = torch.empty(pre.body_len, dtype=torch.uint8)
            dist.recv(body, src=self._group_rank[src], tag=TAG_BODY)
            if self._rx_gen != gen:
                return "stale"  # abandoned while stuck on src (fenced); it woke up
            stage = "protocol error from"
            seq, header, specs = wire.decode_envelope(body, pre, self.max_message_bytes)
            bulk = wire.bulk_buffers(specs)
            nbytes = pre.body_len + sum(b.numel() for b in bulk)
            with self._lock:
                if self._rx_gen == gen and self._rx_state is not None:
                    self._rx_state = (src, self._rx_state[1], nbytes)
            stage = "receive from"
            for b in bulk:
                dist.recv(b, src=self._group_rank[src], tag=TAG_BODY)
            stage = "protocol error from"
            if self._rx_gen != gen:
                return "stale"
            if not wire.verify(self.secret, src, self.rank, seq, pre, body, bulk):
                with self._lock:
                    self._rx_state = None
                self._protocol_error(src, f"message {seq} has a bad tag (not signed with this run's "
                                          f"secret, or altered)", "bad_tags")
                return None
            tensors = wire.materialize(specs, body, pre, bulk)
        except Exception as e:
            with self._lock:
                stale = self._rx_gen != gen
                if not stale:
                    self._rx_state = None
            if stale:
                return "stale"
            if stage == "protocol error from":
                self._protocol_error(src, one_line(e))
            else:
                self.fence(src, f"receive from rank {src} failed: {one_line(e)}")
            return None
        with self._lock:
            if self._rx_gen != gen:  # abandoned while stuck on src; src is fenced
                return "stale"
            self._rx_state = None
            expected = self._seq_in[src]
            if seq == expected:
                self._seq_in[src] = seq + 1
                r = self._received[src]
                r["messages"] += 1
                r["bytes"] += nbytes
                self._inbox.put(Message(src, seq, header, tensors))
                return None
            self._counters["seq_gaps"] += 1
        self._protocol_error(src, f"message {seq}, expected {expected} (replayed or reordered)")
        return None

    def _watch(self) -> None:
        """Backstop bound on every gloo wait: a transfer stalled past its bound fences the peer."""
        while not self._closed.wait(WATCHDOG_PERIOD_S):
            now = time.monotonic()
            stalled: list[tuple[int, str]] = []
            with self._lock:
                if self._rx_state is not None:
                    src, t0, nbytes = self._rx_state
                    if now - t0 > self.stall_timeout_s + nbytes / MIN_BANDWIDTH:
                        stalled.append((src, f"receive from rank {src} stalled {now - t0:.1f} s mid-message"))
                for dst, box in self._out.items():
                    if box.inflight is not None:
                        # 3x: a send may wait on a receiver that is itself stuck on a stalled peer
                        bound = 3 * self.stall_timeout_s + box.inflight.frame.payload_bytes / MIN_BANDWIDTH
                        if now - box.since > bound:
                            stalled.append((dst, f"send to rank {dst} not taken for {now - box.since:.1f} s"))
            for rank, reason in stalled:
                self.fence(rank, reason)


# ---------------------------------------------------------------------------- measurement
# The link probe is runtime.probe's one protocol; `ping_pong` is re-exported for its callers.
DEFAULT_PING_SIZES = probe.DEFAULT_PING_SIZES
ping_pong = probe.ping_pong


def link_emulation(bandwidth: str | None, latency: str | None, world: int):
    """`LinkEmulation` from `--link-bandwidth`/`--link-latency`: a value
    for every pair, or `A-B=VALUE` items (ranks; the reverse direction too unless given)."""
    def items(text, parse, what):
        out: dict = {}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            pair, _, value = item.rpartition("=")
            try:
                key = tuple(int(r) for r in pair.split("-")) if pair else None
            except ValueError:
                raise EmulationError(f"{what}: {item!r}: expected VALUE or SRC-DST=VALUE") from None
            if key is not None and (len(key) != 2 or not all(0 <= r < world for r in key) or key[0] == key[1]):
                raise EmulationError(f"{what}: {item!r}: ranks must be two different ones in 0..{world - 1}")
            out[key] = parse(value, what)
        return out

    bws = items(bandwidth, parse_rate, "--link-bandwidth")
    lats = items(latency, parse_seconds, "--link-latency")
    if not bws and not lats:
        return None
    pairs = {}
    for key in {k for k in (*bws, *lats) if k is not None}:
        pairs[key] = Link(bws.get(key, bws.get(None, 1e12)), lats.get(key, lats.get(None, 0.0)))
    default = Link(bws.get(None, 1e12), lats.get(None, 0.0)) if None in bws or None in lats else None
    return LinkEmulation(pairs, default)


def fit_link(samples: list[tuple[int, float]], *, per_size: str = "min") -> Link:
    """Least-squares fit of seconds = latency + size / bandwidth over (size, seconds).

    `per_size="min"` (default) first keeps the fastest sample of each size: on a busy
    machine noise only ever adds time (one descheduled run took 6x longer in testing),
    so the minimum is the link's own time. "median" keeps medians, "all" every sample.
    """
    by_size: dict[int, list[float]] = defaultdict(list)
    for size, t in samples:
        by_size[size].append(t)
    if len(by_size) < 2:
        raise ValueError("fit_link needs samples at two sizes at least")
    if per_size == "min":
        points = [(s, min(ts)) for s, ts in by_size.items()]
    elif per_size == "median":
        points = [(s, sorted(ts)[len(ts) // 2]) for s, ts in by_size.items()]
    elif per_size == "all":
        points = list(samples)
    else:
        raise ValueError(f"per_size must be min, median or all, not {per_size!r}")
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    sxy = sum((s - mx) * (t - my) for s, t in points)
    slope = sxy / sxx  # seconds per byte
    if slope <= 0:
        raise ValueError(f"fit_link: time does not grow with size (slope {slope:.3g} s/B); "
                         "use larger sizes")
    return Link(bandwidth_bytes_per_s=1.0 / slope, latency_s=max(0.0, my - slope * mx))
