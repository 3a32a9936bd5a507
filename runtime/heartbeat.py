"""Heartbeats and membership through the coordinator's c10d TCPStore.

Every rank runs a `Heartbeat`: a daemon thread that bumps `hb/<rank>` every 100 ms. A
`Membership` monitor (on the coordinator; usable on any rank) reads all beats with one
`multi_get` every 10 ms and declares a rank dead when its beat has not changed for
`threshold_s`, or as soon as someone writes `dead/<rank>` (the launcher does when a
child exits). A rank it declares dead is fenced: it writes `dead/<rank>`, so that the
rank, should it wake up (SIGSTOP, a long pause), finds itself fenced and exits, and the
others ignore it (`Transport.fence`).

A monitor reads all beats before it judges, so its own delays never make a false death;
and it dates each beat by the writer's clock mapped onto its own (`_BeatClock`), so
its delays do not slow detection either. Clocks of different machines need not agree.

Store keys (plain, on the store that MASTER_ADDR:MASTER_PORT names):

    hb/<rank>     "<counter> <writer's time.monotonic()>", written every `interval_s`
    dead/<rank>   JSON {"rank", "by", "reason", "time", ...} once the rank is dead or fenced;
                  written by the launcher (with "returncode", "signal") or by a Membership
    dead_count    counter, +1 after every dead/<rank> write; monitors poll it, not N keys

On a SecureStore (runtime.secure_store) every value is sealed with the run secret: a
forged heartbeat or dead record is refused (treated as absent), and the beat counter must
grow, so a replayed old beat is not a sign of life either.

Figures on this machine: worst beat gap 169 ms with both cores saturated, no false
positive at a 300 ms threshold, and a threshold of T detects a SIGKILLed or SIGSTOPped
rank in T - 60 ms .. T (docs/FAILOVER.md "Heartbeats and membership"), so the 0.4 s
threshold has a margin of 2.4x the worst gap; a launcher-reaped death is seen by the
coordinator in 36 ms median over 20 kills (experiments/results/failover-batched).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from runtime.secure_store import ForgedValueError

log = logging.getLogger(__name__)

HB_KEY = "hb/{}"
DEAD_KEY = "dead/{}"
DEAD_COUNT_KEY = "dead_count"
FENCED_EXIT_CODE = 75  # a rank that finds itself fenced exits with this
STORE_LOST_EXIT_CODE = 76  # a rank that has lost the coordinator's store exits with this
COORDINATOR_LOST_EXIT_CODE = 77  # a worker whose coordinator stopped beating (hung) exits with this
# A hung coordinator is declared after this much silence. Not the 0.4 s used for workers:
# the coordinator's beats come from a daemon thread that starves while it loads (imports,
# tokenizer, weights: gaps of seconds were seen on 2 loaded cores), and a false positive
# here ends the whole run, where a worker's ends only its share. Worst steady-state gap
# measured is 169 ms (docs/FAILOVER.md), so 5 s is a wide margin and still bounded.
COORDINATOR_SILENCE_S = 5.0


def mark_dead(store, rank: int, record: dict, *, overwrite: bool = False) -> bool:
    """Write dead/<rank> (JSON) and bump dead_count. Without `overwrite`, a record already
    there wins (compare_set); returns whether ours was written."""
    key, value = DEAD_KEY.format(rank), json.dumps({"rank": rank, **record})
    if overwrite:
        store.set(key, value)
        written = True
    else:
        written = store.compare_set(key, "", value) == value.encode()
    if written:
        store.add(DEAD_COUNT_KEY, 1)
    return written


def read_dead(store, rank: int) -> dict | None:
    """The dead/<rank> record, or None if the rank is not marked dead. On a SecureStore a
    record without the run's tag (a stranger's) is refused and counts as no record."""
    key = DEAD_KEY.format(rank)
    if not store.check([key]):  # get() of a missing key would block until the store timeout
        return None
    try:
        return json.loads(store.get(key))
    except (ForgedValueError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Death:
    rank: int
    reason: str
    by: str  # who declared it: "launcher", "membership@<rank>", ...
    detected_at: float  # time.time() when this monitor learnt of it
    record: dict = field(default_factory=dict)  # the dead/<rank> record


class _BeatClock:
    """When a rank last beat, on the monitor's clock.

    A beat is "<counter> <writer's time.monotonic()>". A monitor that reads late (starved,
    loaded machine) would date a beat at its own read time, so that a death would look up
    to one read delay younger. Instead the writer's stamp is mapped to the monitor's clock
    with the smallest (read time - stamp) seen over the last OFFSET_WINDOW_S: that offset
    is at least the true one, so beats are never dated earlier than they were written
    (silence is never overestimated), and the window follows slow drift between the
    clocks of different machines. A beat without a stamp is dated when read.
    """

    OFFSET_WINDOW_S = 10.0

    def __init__(self):
        self.value: bytes | None = None
        self.counter: int | None = None  # beats only count when it grows
        self.last_beat = time.monotonic()
        self._offsets: deque[tuple[float, float]] = deque()  # (read time, read time - stamp)

    def saw(self, value: bytes | None, now: float) -> None:
        if value is None or value == self.value:  # None: a forged value, refused by the store
            return
        try:
            counter = int(value.split()[0])
        except (IndexError, ValueError):
            counter = None
        if counter is not None and self.counter is not None and counter <= self.counter:
            return  # an old beat written again (a replay) is not a sign of life
        self.value, self.counter = value, counter
        try:
            stamp = float(value.split()[1])
        except (IndexError, ValueError):
            self.last_beat = now
            return
        offs = self._offsets
        offs.append((now, now - stamp))
        while offs[0][0] < now - self.OFFSET_WINDOW_S:
            offs.popleft()
        self.last_beat = min(now, stamp + min(o for _, o in offs))


class Heartbeat:
    """Bump hb/<rank> every `interval_s` from a daemon thread, on a store client of its own.

    On each beat it also checks dead/<rank>: a fenced rank calls `on_fenced(record)`
    (default: exit the process with FENCED_EXIT_CODE). If the store stays unreachable for
    `store_lost_s`, it calls `on_store_lost(exc)` (default: exit with STORE_LOST_EXIT_CODE),
    since the store's host is the coordinator and its loss ends the run.

    With `watch=<coordinator rank>` (workers) it also reads that rank's beat on each of its
    own; after `watch_silence_s` without a new one (a hung, SIGSTOPped coordinator) it calls
    `on_watch_lost(silent_s)` (default: exit with COORDINATOR_LOST_EXIT_CODE; the launcher
    then ends the coordinator). Beats are judged as Membership does (`_BeatClock`): only a
    growing counter counts, so an old beat written again does not mask a hang.
    """

    def __init__(self, store, rank: int, *, interval_s: float = 0.1,
                 on_fenced: Callable[[dict], None] | None = None,
                 on_store_lost: Callable[[BaseException], None] | None = None,
                 store_lost_s: float = 2.0, watch: int | None = None,
                 watch_silence_s: float = COORDINATOR_SILENCE_S,
                 on_watch_lost: Callable[[float], None] | None = None):
        self.store, self.rank, self.interval_s = store, rank, interval_s
        self.watch, self.watch_silence_s = (watch if watch != rank else None), watch_silence_s
        self.on_watch_lost = on_watch_lost or self._exit_coordinator_lost
        self.on_fenced = on_fenced or self._exit_fenced
        self.on_store_lost = on_store_lost or self._exit_store_lost
        self.store_lost_s = store_lost_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        client = self.store.clone()  # its own connection: never queued behind other store calls
        client.set(HB_KEY.format(self.rank), f"0 {time.monotonic():.6f}")  # monitors see us at once
        self.beats = 1
        self._thread = threading.Thread(target=self._run, args=(client,), name=f"heartbeat{self.rank}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.interval_s + 1.0)

    def _run(self, client) -> None:
        key, dead_key = HB_KEY.format(self.rank), DEAD_KEY.format(self.rank)
        watch_key = HB_KEY.format(self.watch) if self.watch is not None else None
        watched = _BeatClock()
        watched_seen = False
        next_beat = time.monotonic() + self.interval_s
        failing_since = None
        while not self._stop.wait(max(0.0, next_beat - time.monotonic())):
            # a starved thread beats at once when it runs again, then keeps the period
            next_beat = max(next_beat + self.interval_s, time.monotonic())
            try:
                client.set(key, f"{self.beats} {time.monotonic():.6f}")
                self.beats += 1
                fenced = client.check([dead_key]) and read_dead(client, self.rank) is not None
                if watch_key is not None and (watched_seen or client.check([watch_key])):
                    value = client.get(watch_key) if not hasattr(client, "multi_get_or_none") \
                        else client.multi_get_or_none([watch_key])[0]
                    now = time.monotonic()
                    if not watched_seen:
                        watched_seen, watched.last_beat = True, now
                    watched.saw(value, now)
                    if now - watched.last_beat > self.watch_silence_s:
                        self.on_watch_lost(now - watched.last_beat)
                        return
                failing_since = None
            except Exception as e:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.store_lost_s:
                    self.on_store_lost(e)
                    return
                continue
            if fenced:
                self.on_fenced(read_dead(client, self.rank) or {})
                return

    def _exit_fenced(self, record: dict) -> None:
        log.error("rank %d was declared dead (%s); exiting", self.rank, record.get("reason", "?"))
        logging.shutdown()
        os._exit(FENCED_EXIT_CODE)

    def _exit_coordinator_lost(self, silent_s: float) -> None:
        log.error("rank %d: the coordinator (rank %d) has not beaten for %.1f s (hung); the run is over",
                  self.rank, self.watch, silent_s)
        logging.shutdown()
        os._exit(COORDINATOR_LOST_EXIT_CODE)

    def _exit_store_lost(self, exc: BaseException) -> None:
        log.error("rank %d lost the coordinator's store (%s); the run is over", self.rank, exc)
        logging.shutdown()
        os._exit(STORE_LOST_EXIT_CODE)


class Membership:
    """Which ranks are alive, from heartbeats and dead/<rank> marks.

    `rank` is the rank running this monitor (not watched; None for an outside observer).
    A rank is declared dead when dead/<rank> appears, when its beat is older than
    `threshold_s`, or when it has not beaten at all `join_timeout_s` after start(). Each
    death is reported once: `on_death` callbacks (from the monitor thread), the `deaths`
    queue, `dead`. With `fence` (default), a death this monitor detects is written to
    dead/<rank> so every other rank, and the rank itself, learn of it.
    """

    def __init__(self, store, world_size: int, *, rank: int | None = None,
                 watch: Iterable[int] | None = None, threshold_s: float = 0.4,
                 poll_s: float = 0.01, fence: bool = True, join_timeout_s: float = 120.0):
        self.store, self.world_size, self.rank = store, world_size, rank
        self.watch = sorted(set(watch) if watch is not None else set(range(world_size)) - {rank})
        self.threshold_s, self.poll_s, self.fence = threshold_s, poll_s, fence
        self.join_timeout_s = join_timeout_s
        self.by = f"membership@{rank}" if rank is not None else f"membership@pid{os.getpid()}"
        self.deaths: queue.SimpleQueue[Death] = queue.SimpleQueue()
        self.store_error: BaseException | None = None
        self._dead: dict[int, Death] = {}
        self._callbacks: list[Callable[[Death], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API
    def start(self) -> "Membership":
        client = self.store.clone()
        self._thread = threading.Thread(target=self._run, args=(client,), name="membership", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (call before a clean shutdown, when ranks start exiting)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def on_death(self, callback: Callable[[Death], None]) -> None:
        """Call `callback(death)` from the monitor thread for each death (and for those
        already known)."""
        with self._lock:
            self._callbacks.append(callback)
            known = list(self._dead.values())
        for d in known:
            callback(d)

    def attach(self, transport) -> None:
        """Fence every dead rank in `transport` (its recv then raises PeerFailure)."""
        self.on_death(lambda d: transport.fence(d.rank, f"{d.reason} ({d.by})"))

    @property
    def dead(self) -> dict[int, Death]:
        with self._lock:
            return dict(self._dead)

    def alive(self) -> list[int]:
        """Watched ranks not declared dead."""
        with self._lock:
            return [r for r in self.watch if r not in self._dead]

    def wait_for_death(self, timeout: float | None = None) -> Death | None:
        """The next death reported (from the `deaths` queue), or None after `timeout`."""
        try:
            return self.deaths.get(timeout=timeout)
        except queue.Empty:
            return None

    # ------------------------------------------------------------------ monitor
    def _run(self, client) -> None:
        t_start = time.monotonic()
        beats: dict[int, _BeatClock] = {}  # ranks that have beaten at least once
        dead_count = None
        while not self._stop.wait(self.poll_s):
            try:
                self._poll(client, t_start, beats)
                count = client.add(DEAD_COUNT_KEY, 0)
                if count != dead_count:
                    dead_count = count
                    for r in self.alive():
                        if (rec := read_dead(client, r)) is not None:
                            self._declare(client, r, rec)
                self._judge(client, beats)
            except Exception as e:  # the store's host (the coordinator) is gone: run over
                self.store_error = e
                log.error("membership: store unreachable (%s); stopped", e)
                return

    def _poll(self, client, t_start: float, beats: dict) -> None:
        now = time.monotonic()
        for r in self.alive():
            if r not in beats:
                if client.check([HB_KEY.format(r)]):
                    beats[r] = _BeatClock()
                elif now - t_start > self.join_timeout_s:
                    self._declare(client, r, None, f"no heartbeat within {self.join_timeout_s:.0f} s of start")
        watched = [r for r in self.alive() if r in beats]
        if watched:
            keys = [HB_KEY.format(r) for r in watched]
            values = client.multi_get_or_none(keys) if hasattr(client, "multi_get_or_none") else client.multi_get(keys)
            now = time.monotonic()  # after the read: judge only on what has been read
            for r, v in zip(watched, values):
                beats[r].saw(v, now)

    def _judge(self, client, beats: dict) -> None:
        now = time.monotonic()
        for r in self.alive():
            if r in beats and (silent := now - beats[r].last_beat) > self.threshold_s:
                self._declare(client, r, None, f"no heartbeat for {silent:.2f} s")

    def _declare(self, client, rank: int, record: dict | None, reason: str = "") -> None:
        if record is None:  # detected here
            record = {"rank": rank, "by": self.by, "reason": reason, "time": time.time()}
            if self.fence and not mark_dead(client, rank, record):
                record = read_dead(client, rank) or record  # someone marked it first: theirs
        death = Death(rank, record.get("reason", reason), record.get("by", "?"), time.time(), record)
        with self._lock:
            if rank in self._dead:
                return
            self._dead[rank] = death
            callbacks = list(self._callbacks)
        log.warning("rank %d declared dead: %s (%s)", rank, death.reason, death.by)
        self.deaths.put(death)
        for cb in callbacks:
            try:
                cb(death)
            except Exception:
                log.exception("on_death callback failed")
