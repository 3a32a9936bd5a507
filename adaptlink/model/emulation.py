"""Emulated heterogeneity on one machine: a compute slowdown, a memory cap, and the units
that the command line uses for them and for emulated links.

Real heterogeneity comes first (a GPU beside CPUs, thread counts, `tc`-shaped links:
`experiments/netns_shaping.sh`); where the machine cannot provide it, a device profile
carries `emulation: {"slowdown": k, "memory_cap_bytes": n}` and every output that used it
says so. The profiler (adaptlink.profiler) and the runtime (runtime.engine / runtime.stage)
pad compute with the same `DeadlinePadder`:

    padder = DeadlinePadder(2.0)
    out = padder.run(blocks.run, "decoder.layer.3", x, step, key=("decoder.layer.3", "decode"))
    with padder.pad(key="vision"):          # the same, as a context manager
        ...
    budget = MemoryBudget(cap_bytes=2 * 2**30, device="cpu1")
    budget.charge(blocks_param_bytes, "decoder.layer.0-15")   # MemoryCapError if over

(The runtime enforces a memory cap before loading, in adaptlink.launch's check of the plan:
own and backup blocks' bytes against min(memory_bytes, memory_cap_bytes); `MemoryBudget` is
the same rule for a caller that charges block by block.)

Why deadline padding (docs/FAILOVER.md, "Heterogeneity on one 2-core machine"): thread
counts are no speed knob on a 2-core box, and sleeping `(k-1) * t` after each block drifts
once ranks contend (contention inflates t, and the sleep with it). Padding to a deadline,
`sleep(max(0, k * t_ref - t))` with `t_ref` the block's time measured alone, was exact to
0.01 with one thread per rank. `t_ref` here is either given, or the fastest time seen so
far for the same `key` (the least contended one), or, without a key, this call's own time.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from partitioner.errors import AdaptLinkError

SPIN_S = 2e-4
"""The last this-many seconds of a pad are spun, not slept: `time.sleep` overshoots by
~60-100 us, which is a large error on a block of a few hundred microseconds."""


class EmulationError(AdaptLinkError):
    """An emulation knob with a value that cannot be used (the message names the option)."""


class MemoryCapError(AdaptLinkError):
    """Loading more than an emulated memory cap allows."""


# ----------------------------------------------------------------------------- slowdown


@dataclass
class PadStats:
    """What a padder did, for metrics and logs."""

    calls: int = 0
    compute_s: float = 0.0
    """Time spent in the padded functions themselves."""
    padded_s: float = 0.0
    """Time added by padding (sleep + spin)."""
    last_compute_s: float = 0.0
    last_total_s: float = 0.0


class DeadlinePadder:
    """Make compute take `slowdown` times as long as it takes on this device alone.

    Each padded call ends no earlier than `slowdown * t_ref` after it began, where `t_ref`
    is the explicit `t_ref=`, else the minimum time seen for `key=`, else the call's own
    time. `slowdown == 1` only times. `sync` (e.g. `torch.cuda.synchronize`) is called
    before each clock reading, so asynchronous devices are timed to completion.
    """

    def __init__(self, slowdown: float = 1.0, *, sync: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Any] = time.sleep, spin_s: float = SPIN_S):
        if not slowdown >= 1.0:
            raise EmulationError(f"slowdown: must be >= 1 (a device can only be made slower), got {slowdown}")
        self.slowdown = float(slowdown)
        self.sync, self.clock, self.sleep, self.spin_s = sync, clock, sleep, spin_s
        self.reference: dict[Hashable, float] = {}  # key -> fastest time seen (t_ref)
        self.stats = PadStats()

    @property
    def active(self) -> bool:
        return self.slowdown > 1.0

    def run(self, fn: Callable[..., Any], *args, t_ref: float | None = None,
            key: Hashable | None = None, **kwargs) -> Any:
        """`fn(*args, **kwargs)`, padded; returns its result."""
        with self.pad(t_ref=t_ref, key=key):
            return fn(*args, **kwargs)

    @contextmanager
    def pad(self, *, t_ref: float | None = None, key: Hashable | None = None):
        """Pad the body of the `with` block to its deadline."""
        if self.sync:
            self.sync()
        t0 = self.clock()
        yield self
        if self.sync:
            self.sync()
        t = self.clock() - t0
        if t_ref is None and key is not None:
            t_ref = self.reference[key] = min(t, self.reference.get(key, t))
        deadline = t0 + self.slowdown * (t if t_ref is None else t_ref)
        self._wait_until(deadline)
        total = self.clock() - t0
        s = self.stats
        s.calls += 1
        s.compute_s += t
        s.padded_s += max(0.0, total - t)
        s.last_compute_s, s.last_total_s = t, total

    def _wait_until(self, deadline: float) -> None:
        if not self.active:
            return
        left = deadline - self.clock()
        if left > self.spin_s:
            self.sleep(left - self.spin_s)
        while self.clock() < deadline:
            pass


# ----------------------------------------------------------------------------- memory cap


@dataclass
class MemoryBudget:
    """Bytes a device may hold: an emulated cap (None: unlimited) that loading charges against."""

    cap_bytes: int | None
    device: str = "this device"
    used: int = 0
    held: dict[str, int] = field(default_factory=dict)

    def fits(self, nbytes: int) -> bool:
        return self.cap_bytes is None or self.used + nbytes <= self.cap_bytes

    def charge(self, nbytes: int, what: str) -> None:
        """Record `nbytes` for `what`, or raise MemoryCapError naming the device, what and the numbers."""
        if not self.fits(nbytes):
            raise MemoryCapError(
                f"{self.device}: emulation.memory_cap_bytes: loading {what} needs {fmt_bytes(nbytes)} "
                f"but {fmt_bytes(self.used)} of the {fmt_bytes(self.cap_bytes)} cap are in use "
                f"({fmt_bytes(self.used + nbytes - self.cap_bytes)} over)")
        self.used += nbytes
        self.held[what] = self.held.get(what, 0) + nbytes

    def release(self, what: str) -> None:
        self.used -= self.held.pop(what, 0)


# ----------------------------------------------------------------------------- units

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_RATE_UNITS = {**{k: v for k, v in _BYTE_UNITS.items()},
               "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8}
_TIME_UNITS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6}


def _parse(text: str, units: dict[str, float], what: str, example: str) -> float:
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)(?:/s)?", str(text).strip())
    unit = m.group(2).lower() if m else None
    if not m or unit not in units:
        raise EmulationError(f"{what}: cannot read {text!r} (e.g. {example})")
    return float(m.group(1)) * units[unit]


def parse_bytes(text: str, what: str = "size") -> int:
    """`"2GiB"`, `"500MB"`, `"123"` -> bytes."""
    return int(_parse(text, _BYTE_UNITS, what, "2GiB, 500MB, 1e9"))


def parse_rate(text: str, what: str = "bandwidth") -> float:
    """`"100Mbit"`, `"100Mbps"`, `"12.5MB/s"` -> bytes per second (bits are /8)."""
    v = _parse(text, _RATE_UNITS, what, "100Mbit, 1Gbps, 12.5MB/s")
    if v <= 0:
        raise EmulationError(f"{what}: must be > 0, got {text!r}")
    return v


def parse_seconds(text: str, what: str = "latency") -> float:
    """`"2ms"`, `"0.5"` (seconds), `"150us"` -> seconds."""
    return _parse(text, _TIME_UNITS, what, "2ms, 150us, 0.001")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= size:
            return f"{bits / size:.1f} {unit}"
    return f"{bits:.0f} bit/s"
