"""The rank side of `adaptlink profile`: one process per device measures itself, the links
between the ranks are probed, and rank 0 gathers everything over the run's c10d store.

- `profile_rank`: this rank's device entry of cluster.json (its memory, then its compute by
  `adaptlink.model.measure`), and with a `Board` every rank's, plus the links.
- `Board`: the store-backed exchange between the ranks (keys under `KEY`); `HostTurns`: the
  ranks of one machine take their measuring steps in turn.
- links: every ordered pair (a, b), one at a time on a quiet network: a sends messages of
  several sizes to b over `runtime.transport` (gloo point-to-point, and the transport's
  link emulation if any) and b answers each with an empty one (`runtime.probe`, the one
  link-probe protocol). A least-squares fit of round trip = intercept + size / bandwidth
  over the fastest sample per size gives the a -> b bandwidth; latency is half the
  intercept (the answer travels back over b -> a, assumed to have the same latency). It is
  the latency the runtime's transport pays, thread hand-offs included, not the wire's alone.
- `run_rank`: one rank of a distributed run, from joining to tearing the group down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from adaptlink.model.emulation import fmt_rate
from adaptlink.model.measure import MeasureOptions, ProfileError, measure_compute, usable_memory
from runtime.heartbeat import read_dead
from runtime.launcher import init_rank
from runtime.probe import ProbeError, round_trips
from runtime.transport import Transport, fit_link

log = logging.getLogger(__name__)

LINK_SIZES = (0, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
KEY = "adaptlink/profile/"  # store keys of one profiling run


@dataclass(kw_only=True, slots=True)
class ProfileOptions(MeasureOptions):
    """What to measure; the same on every rank: the blocks (`MeasureOptions`), memory, links."""

    memory_reserve: str | None = None
    """Bytes (`2GiB`) or a share of the total (`10%`); default max(1 GiB, 10%)."""
    link_sizes: tuple[int, ...] = LINK_SIZES
    link_repeats: int = 3
    timeout_s: float = 3600.0

    def __post_init__(self):
        MeasureOptions.__post_init__(self)  # not super(): slots=True makes a new class
        if len(set(self.link_sizes)) < 2:
            raise ProfileError(f"--link-sizes: need two different sizes at least, got {list(self.link_sizes)}")


@dataclass(kw_only=True, slots=True)
class RankSetup:
    """This rank's device and knobs."""

    name: str
    torch_device: str = "cpu"
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    slowdown: float = 1.0
    memory_cap_bytes: int | None = None

    @property
    def emulation(self) -> dict | None:
        if self.slowdown == 1.0 and self.memory_cap_bytes is None:
            return None
        return {"slowdown": self.slowdown, "memory_cap_bytes": self.memory_cap_bytes}


# ---------------------------------------------------------------------------- the board


class Board:
    """Store-backed exchange between the ranks of one profiling run."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s

    def put(self, key: str, value) -> None:
        self.store.set(KEY + key, json.dumps(value))

    def has(self, key: str) -> bool:
        return self.store.check([KEY + key])

    def get(self, key: str):
        """Wait for `key`; raise if another rank reported an error or died meanwhile.

        Polls with `check` (a blocking `wait` cannot also watch for failures, and each of
        its timeouts logs a c10d warning), every 1 ms at first, backing off to 5 ms.
        """
        deadline = time.monotonic() + self.timeout_s
        pause, next_check = 0.001, time.monotonic() + 0.5
        while not self.store.check([KEY + key]):
            if time.monotonic() > next_check:
                next_check = time.monotonic() + 0.5
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise ProfileError(f"rank {self.rank}: waited {self.timeout_s:.0f} s for {key}")
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        return json.loads(self.store.get(KEY + key))

    def _raise_if_failed(self) -> None:
        if self.store.check([KEY + "error"]):
            raise ProfileError(f"profiling failed on another rank: {json.loads(self.store.get(KEY + 'error'))}")
        if self.store.add("dead_count", 0) > 0:  # written by runtime.launcher when a rank dies
            for r in range(self.world):
                if (d := read_dead(self.store, r)) is not None:
                    raise ProfileError(f"rank {r} died while profiling: {d.get('reason', d)}")

    def turns(self, ranks: list[int]) -> "HostTurns":
        return HostTurns(self, ranks)


class HostTurns:
    """Ranks of one machine take steps in turn: r0 step 0, r1 step 0, ..., r0 step 1, ...
    Every rank must take the same number of steps (see `measure_compute`)."""

    def __init__(self, board: Board, ranks: list[int]):
        self.board, self.ranks, self.me, self.step = board, ranks, ranks.index(board.rank), 0

    @contextlib.contextmanager
    def __call__(self):
        b, r, k = self.board, self.ranks, self.step
        self.step += 1
        if self.me > 0:
            b.get(f"turn/{r[self.me - 1]}/{k}")
        elif k > 0 and len(r) > 1:
            b.get(f"turn/{r[-1]}/{k - 1}")
        yield
        b.put(f"turn/{b.rank}/{k}", 1)

    def agree(self, name: str, value):
        key = f"agree/{self.ranks[0]}/{name}"
        if self.me == 0:
            self.board.put(key, value)
            return value
        return self.board.get(key)


def watch_progress(store, world: int, display, stop: threading.Event) -> None:
    """Rank 0's thread: copy every rank's progress key from the store to the display."""
    while not stop.wait(0.2):
        for r in range(world):
            try:
                if store.check([f"{KEY}progress/{r}"]):
                    display.device(r, *json.loads(store.get(f"{KEY}progress/{r}")))
            except Exception:  # the display must never take the run down
                return


# ---------------------------------------------------------------------------- one rank


def this_host() -> str:
    """The address other devices reach this one at: the local end of the route to the
    rendezvous host (MASTER_ADDR), so 127.0.0.1 when the run is local to this machine, and
    each namespace's or machine's own address otherwise."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP: picks a route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def profile_rank(opts: ProfileOptions, setup: RankSetup, *, board: Board | None = None,
                 links=None, display=None, config=None) -> tuple[list[dict], list[dict]] | None:
    """Profile this rank's device (and, with a board, the links). Rank 0 (or a lone rank)
    returns (devices, link pairs) of the whole run, as cluster.json entries; others None."""
    rank, world = (board.rank, board.world) if board else (0, 1)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    hostname = socket.gethostname()

    def progress(done, total, what):
        if board:
            board.put(f"progress/{rank}", [done, total, what])
        elif display:
            display.device(0, done, total, what)

    progress(0, 1, "starting")
    if board:
        board.put(f"hello/{rank}", {"hostname": hostname, "torch_device": setup.torch_device})
        hello = [board.get(f"hello/{r}") for r in range(world)]
    else:
        hello = [{"hostname": hostname, "torch_device": setup.torch_device}]
    same_host = [r for r in range(world) if hello[r]["hostname"] == hostname]
    shared_by = sum(1 for r in same_host if hello[r]["torch_device"] == setup.torch_device)
    device = {"name": setup.name, "host": this_host(),
              "torch_device": setup.torch_device, "dtype": opts.dtype, "threads": torch.get_num_threads(),
              **usable_memory(setup.torch_device, opts.memory_reserve, shared_by)}
    turns = None
    if board:  # ranks of one host take turns, after all measured their free memory
        board.put(f"memory/{rank}", device["memory_bytes"])
        for r in same_host:
            board.get(f"memory/{r}")
        turns = board.turns(same_host)
    device["compute"] = {"measured": measure_compute(opts, device=setup.torch_device, slowdown=setup.slowdown,
                                                     config=config, on_progress=progress, turns=turns)}
    device["emulation"] = setup.emulation
    log.info("%s: compute measured (%s)", setup.name, ", ".join(
        f"{k} {v['prefill_s'] * 1e3:.3g}/{v['decode_s'] * 1e3:.3g} ms"
        for k, v in device["compute"]["measured"]["blocks"].items()))
    if board:
        board.put(f"compute/{rank}", device)
        devices = [board.get(f"compute/{r}") for r in range(world)]
    else:
        devices = [device]
    pairs = measure_links(opts, board, links, display) if board and world > 1 else []
    if rank != 0:
        board.put(f"bye/{rank}", 1)
        return None
    if board:
        for r in range(1, world):
            board.get(f"bye/{r}")
    return devices, pairs


# ---------------------------------------------------------------------------- links


def probe_link(transport, peer: int, sizes, repeats: int, timeout: float, *,
               initiator: bool = True) -> list[tuple[int, float]]:
    """Either side of the probe of one link (`runtime.probe.round_trips`, the answers empty).
    The initiator returns (size, round-trip seconds) samples, the responder []."""
    try:
        return round_trips(transport, peer, initiator=initiator, sizes=sizes, repeats=repeats,
                           timeout=timeout, echo=False)
    except TimeoutError:
        what = f"to rank {peer}: no answer" if initiator else f"from rank {peer}: nothing received"
        raise ProfileError(f"link probe {what} within {timeout:.0f} s") from None
    except ProbeError as e:
        raise ProfileError(str(e)) from None


def fit_probe(samples: list[tuple[int, float]]) -> dict:
    """Bandwidth and one-way latency from (size, round trip) samples: a least-squares fit of
    round trip = intercept + size / bandwidth over the fastest sample of each size (noise on
    a busy machine only ever adds time), latency = intercept / 2 (the answer is empty)."""
    by_size: dict[int, list[float]] = {}
    for s, t in samples:
        by_size.setdefault(s, []).append(t)
    best = sorted((s, min(ts)) for s, ts in by_size.items())
    out: dict[str, Any] = {}
    try:
        link = fit_link(best, per_size="min")
        bw, intercept = link.bandwidth_bytes_per_s, link.latency_s
    except ValueError:
        # Time did not grow with size: the link is faster than these sizes can tell.
        # The largest message over its whole round trip is a bandwidth it at least has.
        (_, t0), (s1, t1) = best[0], best[-1]
        bw, intercept = s1 / t1, t0
        out["bandwidth_lower_bound"] = True
        log.warning("link fit: round trip did not grow with size (%s); bandwidth %s is a lower bound, "
                    "use larger --link-sizes", best, fmt_rate(bw))
    out.update({"bandwidth_bytes_per_s": float(bw), "latency_s": float(max(0.0, intercept / 2)),
                "samples": len(samples), "sizes": [s for s, _ in best],
                "round_trip_s": [round(t, 6) for _, t in best],
                "round_trip_median_s": [round(statistics.median(by_size[s]), 6) for s, _ in best]})
    return out


def measure_links(opts: ProfileOptions, board: Board, links, display) -> list[dict]:
    """Every ordered pair, one at a time; every rank returns the list of measured pairs."""
    rank, world = board.rank, board.world
    order = [(a, b) for a in range(world) for b in range(world) if a != b]
    names = [board.get(f"compute/{r}")["name"] for r in range(world)]
    out = []
    transport = Transport(rank, world, links=links, stall_timeout_s=max(60.0, opts.timeout_s / 10))
    try:
        for k, (a, b) in enumerate(order):
            if display:
                display.links(k, len(order), f"{names[a]} -> {names[b]}")
            if rank == a:
                fit = fit_probe(probe_link(transport, b, opts.link_sizes, opts.link_repeats, opts.timeout_s))
                emu = links.link(a, b) if links is not None else None
                fit = {"src": names[a], "dst": names[b], **fit, "emulated": emu is not None}
                if emu is not None:
                    fit["emulated_as"] = {"bandwidth_bytes_per_s": emu.bandwidth_bytes_per_s,
                                          "latency_s": emu.latency_s}
                board.put(f"link/{a}/{b}", fit)
            elif rank == b:
                probe_link(transport, a, opts.link_sizes, opts.link_repeats, opts.timeout_s, initiator=False)
            out.append(board.get(f"link/{a}/{b}"))
        if display:
            display.links(len(order), len(order), "done")
        log.info("rank %d: %d links measured", rank, len(order))
    finally:
        transport.close()
    return out


# ---------------------------------------------------------------------------- a distributed run


def run_rank(opts: ProfileOptions, setup_for: Callable[[int, int, int], RankSetup],
             links_for: Callable[[int], Any], *, open_display: Callable[[list[str]], ContextManager],
             finish: Callable[[list[dict], list[dict]], int]) -> int:
    """One rank of a run started by torchrun or by `--local`: join, profile this device and
    the links. Rank 0 shows every rank's progress (`open_display(names)`, a context manager
    yielding a display) and returns `finish(devices, pairs)`; the others return 0.
    `setup_for(rank, world, local_rank)` and `links_for(world)` give this rank's knobs.
    An error on any rank is posted to the board, so the others stop waiting; the process
    group is destroyed on the way out."""
    ctx = init_rank(timeout=opts.timeout_s)
    log.info("rank %d of %d joined", ctx.rank, ctx.world_size)
    rank, world = ctx.rank, ctx.world_size
    board = Board(ctx.store, rank, world, opts.timeout_s)
    try:
        setup = setup_for(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        links = links_for(world)
        if rank != 0:
            board.put(f"name/{rank}", setup.name)
            profile_rank(opts, setup, board=board, links=links)
            return 0
        board.put("name/0", setup.name)
        names = [board.get(f"name/{r}") for r in range(world)]
        stop = threading.Event()
        with open_display(names) as display:
            watcher = threading.Thread(target=watch_progress, args=(ctx.store.clone(), world, display, stop),
                                       daemon=True)
            watcher.start()
            try:
                devices, pairs = profile_rank(opts, setup, board=board, links=links, display=display)
            finally:
                stop.set()
                watcher.join()
                for r in range(world):
                    if board.has(f"progress/{r}"):
                        display.device(r, *json.loads(ctx.store.get(f"{KEY}progress/{r}")))
        return finish(devices, pairs)
    except BaseException as e:
        try:
            board.put("error", f"rank {rank}: {type(e).__name__}: {e}")
        except Exception:
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
