"""Heartbeat and Membership over a real TCPStore hosted by the test process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from runtime.heartbeat import (DEAD_COUNT_KEY, FENCED_EXIT_CODE, HB_KEY, Membership, mark_dead,
                               read_dead)
from runtime.launcher import _die_with_parent, free_port

BEAT_CHILD = Path(__file__).parent / "helpers" / "beat_child.py"


@pytest.fixture
def store():
    port = free_port()
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def test_mark_dead_first_record_wins_and_counts(store):
    assert read_dead(store, 1) is None
    assert mark_dead(store, 1, {"by": "membership@0", "reason": "silent"})
    assert not mark_dead(store, 1, {"by": "membership@2", "reason": "silent"})  # already fenced
    assert read_dead(store, 1)["by"] == "membership@0"
    assert mark_dead(store, 1, {"by": "launcher", "reason": "killed by SIGKILL"}, overwrite=True)
    assert read_dead(store, 1) == {"rank": 1, "by": "launcher", "reason": "killed by SIGKILL"}
    assert store.add(DEAD_COUNT_KEY, 0) == 2


def test_membership_logic_with_beats_written_here(store):
    # ranks 1 and 2 beat from a thread of this test; 3 never beats; 2 gets a launcher mark
    stop = {1: threading.Event(), 2: threading.Event()}

    def beat(r):
        n = 0
        while not stop[r].wait(0.05):
            store.set(HB_KEY.format(r), str(n))
            n += 1

    threads = [threading.Thread(target=beat, args=(r,), daemon=True) for r in (1, 2)]
    for t in threads:
        t.start()
    seen = []
    m = Membership(store, 4, rank=0, threshold_s=0.3, join_timeout_s=1.0)
    m.on_death(lambda d: seen.append((d.rank, time.monotonic())))
    m.start()
    try:
        time.sleep(0.6)
        assert m.dead == {} and m.alive() == [1, 2, 3]
        t_mark = time.monotonic()
        mark_dead(store, 2, {"by": "launcher", "reason": "killed by SIGKILL", "returncode": -9})
        d = m.wait_for_death(2.0)
        assert d.rank == 2 and d.by == "launcher" and d.record["returncode"] == -9
        assert seen[-1][1] - t_mark < 0.1  # one dead_count poll
        d = m.wait_for_death(2.0)
        assert d.rank == 3 and "no heartbeat within" in d.reason  # never joined
        stop[1].set()
        t_stop = time.monotonic()
        d = m.wait_for_death(2.0)
        assert d.rank == 1 and d.by == "membership@0" and "no heartbeat for" in d.reason
        assert 0.2 < seen[-1][1] - t_stop < 0.45
        assert read_dead(store, 1)["by"] == "membership@0"  # fenced in the store
        assert m.alive() == [] and m.wait_for_death(0.1) is None
    finally:
        m.stop()
        for e in stop.values():
            e.set()


def test_killed_and_stopped_ranks_are_declared_dead_within_half_a_second(store, tmp_path):
    world = 4  # this process is rank 0 (the coordinator); 1 is SIGKILLed, 2 SIGSTOPped, 3 lives
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "ADAPTLINK_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = {r: subprocess.Popen([sys.executable, str(BEAT_CHILD)], env={**env, "RANK": str(r)},
                                 preexec_fn=_die_with_parent(os.getpid()))
             for r in range(1, world)}
    detected: dict[int, float] = {}
    m = Membership(store, world, rank=0)  # defaults: 100 ms beats, 0.4 s threshold, 10 ms polls
    m.on_death(lambda d: detected.setdefault(d.rank, time.monotonic()))
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready{r}").exists() for r in procs):
            assert time.monotonic() < deadline, "beat children did not start"
            time.sleep(0.05)
        m.start()
        time.sleep(3.0)  # normal running: no false positive
        assert m.dead == {}, m.dead

        t_kill = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)
        d = m.wait_for_death(2.0)
        assert d is not None and d.rank == 1
        kill_s = detected[1] - t_kill

        t_stop = time.monotonic()
        procs[2].send_signal(signal.SIGSTOP)
        d = m.wait_for_death(2.0)
        assert d is not None and d.rank == 2
        stop_s = detected[2] - t_stop

        assert kill_s < 0.5 and stop_s < 0.5, (kill_s, stop_s)
        assert m.alive() == [3] and procs[3].poll() is None
        # the stopped rank wakes up, finds dead/2 and leaves
        procs[2].send_signal(signal.SIGCONT)
        assert procs[2].wait(timeout=5) == FENCED_EXIT_CODE
        time.sleep(0.5)
        assert m.alive() == [3]
        print(f"detection: SIGKILL {kill_s * 1e3:.0f} ms, SIGSTOP {stop_s * 1e3:.0f} ms")
    finally:
        m.stop()
        for p in procs.values():
            p.kill()
            p.wait()
