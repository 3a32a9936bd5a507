"""Launcher: the ranks' environment, reaping, failure injection, init_rank (also under torchrun).

Most ranks here are tests/helpers/env_child.py (no torch: they start in milliseconds);
the tests that need a process group use tests/helpers/transport_worker.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runner import run_scenario
from runtime.auth import RunSecret
from runtime.heartbeat import DEAD_COUNT_KEY, read_dead
from runtime.launcher import KillSpec, Launcher, launch_local

HELPERS = Path(__file__).parent / "helpers"
ENV_CHILD = [sys.executable, str(HELPERS / "env_child.py")]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()):
            return v
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_killspec_parse():
    assert KillSpec.parse("kill:rank=2,after=1.5") == KillSpec(2, after_s=1.5)
    assert KillSpec.parse("kill:rank=1,after_tokens=40") == KillSpec(1, after_tokens=40)
    assert KillSpec.parse("stop:rank=3,after=2").signal == signal.SIGSTOP
    for bad in ("kill:rank=1", "kill:after=2", "boom:rank=1,after=2", "kill:rank=x,after=1",
                "kill:rank=1,after=1,after_tokens=3"):
        with pytest.raises(ValueError):
            KillSpec.parse(bad)


def test_ranks_get_their_env_and_a_dead_rank_is_reaped_while_others_go_on(tmp_path):
    # rank 0 (coordinator) lives 3 s, ranks 1 and 2 until killed; rank 2 is SIGKILLed at 1 s
    launcher = Launcher([*ENV_CHILD, "3", "inf", "inf"], 3, threads=[1, 2, 1],
                        env=lambda r: {"ADAPTLINK_TEST_OUT": str(tmp_path), "MY_VAR": f"v{r}"},
                        inject=[KillSpec(2, after_s=1.0)], timeout_s=30).start()
    with launcher:
        envs = [wait_for(lambda r=r: (tmp_path / f"env{r}.json").exists() and
                         json.loads((tmp_path / f"env{r}.json").read_text()), 10, f"env of rank {r}")
                for r in range(3)]
        for r, env in enumerate(envs):
            assert env["RANK"] == env["LOCAL_RANK"] == str(r) and env["WORLD_SIZE"] == "3"
            assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(launcher.port)
            assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
            assert env["OMP_NUM_THREADS"] == env["ADAPTLINK_THREADS"] == str([1, 2, 1][r])
            assert env["MY_VAR"] == f"v{r}"
        rec = wait_for(lambda: read_dead(launcher.store, 2), 10, "dead/2")
        assert rec["by"] == "launcher" and rec["signal"] == "SIGKILL" and rec["returncode"] == -9
        wait_for(lambda: launcher.store.add(DEAD_COUNT_KEY, 0) == 1, 1, "dead_count")  # bumped after the key
        assert launcher.procs[1].poll() is None and launcher.procs[0].poll() is None  # others go on
        result = launcher.wait(30)
    (spec, at_s), = result.injected
    assert spec.rank == 2 and 1.0 <= at_s < 1.5
    ex = {e.rank: e for e in result.exits}
    assert ex[2].cause == "inject" and ex[2].returncode == -9
    # poll() every 10 ms: ~10-20 ms here when idle; the bound leaves room for a loaded machine
    assert ex[2].reaped_after_s < 0.25
    assert rec["time"] - (result.started_at + at_s) < 0.3  # dead/2 written right after
    assert ex[0].returncode == 0 and ex[0].cause == "exit"
    assert ex[1].cause == "shutdown" and ex[1].returncode == -signal.SIGTERM  # ended after rank 0
    assert result.ok and result.returncode == 0
    print(f"reap latency {ex[2].reaped_after_s * 1e3:.0f} ms, "
          f"dead/2 written {(rec['time'] - result.started_at - at_s) * 1e3:.0f} ms after the kill")


def test_coordinator_death_ends_the_run(tmp_path):
    t0 = time.monotonic()
    result = launch_local([*ENV_CHILD, "inf", "inf", "inf"], 3, coordinator=1,
                          env={"ADAPTLINK_TEST_OUT": str(tmp_path)},
                          inject=[KillSpec.parse("kill:rank=1,after=0.5")], timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert not result.ok and result.returncode != 0
    ex = {e.rank: e for e in result.exits}
    assert ex[1].returncode == -9 and ex[1].cause == "inject"
    assert ex[0].cause == ex[2].cause == "shutdown" and ex[0].returncode == ex[2].returncode == -9


def test_timeout_kills_every_rank(tmp_path):
    result = launch_local([*ENV_CHILD, "inf", "inf"], 2, env={"ADAPTLINK_TEST_OUT": str(tmp_path)},
                          timeout_s=0.5)
    assert result.timed_out and not result.ok
    assert {e.cause for e in result.exits} == {"timeout"}


def test_ranks_die_with_the_launcher(tmp_path):
    parent = subprocess.Popen([sys.executable, str(HELPERS / "launcher_parent.py"), str(tmp_path), "2"])
    try:
        pids = [wait_for(lambda r=r: (tmp_path / f"env{r}.json").exists() and
                         json.loads((tmp_path / f"env{r}.json").read_text())["PID"], 30, f"rank {r}")
                for r in range(2)]
        parent.kill()
        parent.wait()

        def gone(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init to reap it
                return f.read().split(")")[-1].split()[0] == "Z"

        wait_for(lambda: all(gone(p) for p in pids), 5, "ranks to die with their launcher")
    finally:
        parent.kill()


def test_after_tokens_injection_and_init_rank(tmp_path):
    # rank 0 adds 1 to `tokens` every 20 ms; the launcher SIGKILLs rank 1 at 10 tokens and
    # writes dead/1, which rank 0 watches for
    result, res = run_scenario("tokens", 2, tmp_path, inject=[KillSpec.parse("kill:rank=1,after_tokens=10")])
    assert result.returncodes == {0: 0, 1: -9}
    assert 10 <= res["tokens_at_death"] <= 20
    assert res["record"]["by"] == "launcher" and res["record"]["signal"] == "SIGKILL"
    assert res["threads"] == 1 and res["omp"] == "1"


def test_init_rank_under_plain_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HELPERS / "transport_worker.py"), "torchrun_smoke"]
    env = {**os.environ, "ADAPTLINK_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", **RunSecret.generate().env()}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "result0.json").read_text()) == {"ok": True, "world_size": 2}
    assert "the death of any one ends the run" in proc.stderr  # the one-agent caveat is said
