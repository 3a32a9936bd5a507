"""Emulated heterogeneity: deadline padding, memory caps, units, emulated links from options.

The padders are checked against a fake clock (exact) and once against the real one.
"""

from __future__ import annotations

import time

import pytest

from adaptlink.model.emulation import (DeadlinePadder, EmulationError, MemoryBudget, MemoryCapError, parse_bytes,
                                       parse_rate, parse_seconds)
from runtime.transport import link_emulation


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_deadline_padder_pads_to_slowdown_times_reference():
    clock = FakeClock()
    padder = DeadlinePadder(3.0, clock=clock, sleep=clock.sleep, spin_s=0.0)
    with padder.pad():           # no reference: the call's own time
        clock.now += 0.010
    assert clock.now == pytest.approx(0.030)
    start = clock.now
    with padder.pad(t_ref=0.005):  # a block that took 8 ms under contention, 5 ms alone
        clock.now += 0.008
    assert clock.now - start == pytest.approx(0.015)
    assert padder.stats.calls == 2 and padder.stats.compute_s == pytest.approx(0.018)
    assert padder.stats.padded_s == pytest.approx(0.020 + 0.007)


def test_deadline_padder_keyed_reference_is_the_fastest_seen():
    clock = FakeClock()
    padder = DeadlinePadder(2.0, clock=clock, sleep=clock.sleep, spin_s=0.0)
    for took in (0.004, 0.010, 0.003):
        start = clock.now
        padder.run(lambda: setattr(clock, "now", clock.now + took), key="decoder.layer.0/decode")
        expected = 2 * min(0.004, took) if took != 0.003 else 0.006
        assert clock.now - start == pytest.approx(max(took, expected))


def test_deadline_padder_real_clock_and_bad_slowdown():
    padder = DeadlinePadder(2.0)
    t0 = time.perf_counter()
    padder.run(time.sleep, 0.02)
    assert 0.039 < time.perf_counter() - t0 < 0.06
    with pytest.raises(EmulationError, match="slowdown"):
        DeadlinePadder(0.5)


def test_memory_budget_names_device_and_numbers():
    budget = MemoryBudget(cap_bytes=parse_bytes("1MiB"), device="cpu1")
    budget.charge(600_000, "decoder.layer.0")
    with pytest.raises(MemoryCapError, match=r"cpu1: emulation.memory_cap_bytes: loading decoder.layer.1"):
        budget.charge(600_000, "decoder.layer.1")
    budget.release("decoder.layer.0")
    budget.charge(600_000, "decoder.layer.1")
    assert MemoryBudget(None).fits(10**15)


def test_units():
    assert parse_rate("100Mbit") == 12.5e6 == parse_rate("100 Mbps") == parse_rate("12.5MB/s")
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1e9") == 10**9
    assert parse_seconds("2ms") == pytest.approx(0.002) and parse_seconds("0.5") == 0.5
    with pytest.raises(EmulationError, match="--link-bandwidth"):
        parse_rate("fast", "--link-bandwidth")


def test_link_emulation_options():
    links = link_emulation("100Mbit", "2ms", 3)
    assert links.link(0, 2).bandwidth_bytes_per_s == 12.5e6 and links.link(2, 1).latency_s == pytest.approx(0.002)
    links = link_emulation("0-1=10Mbit,1-0=1Gbit", None, 3)
    assert links.link(0, 1).bandwidth_bytes_per_s == 1.25e6 and links.link(1, 0).bandwidth_bytes_per_s == 1.25e8
    assert links.link(0, 2) is None  # not named, no default: a real link
    assert link_emulation(None, None, 2) is None
    with pytest.raises(EmulationError, match="--link-bandwidth: '0-5=1Mbit': ranks must be"):
        link_emulation("0-5=1Mbit", None, 2)
