"""Issue 14 section 6: nobody gets in who does not belong (the store, the rendezvous, the
run secret, hangs at join and of the coordinator).

The store's own tests are in-process; the join/hang tests start ranks of
tests/helpers/join_child.py under runtime.launcher; the attack tests run
experiments/attack.py's attacks (a foreign process holding only a store client) against
live runs and compare the tokens with HF generate's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from experiments import attack
from plans import chain_shares, manual_plan, write_plan
from runtime.auth import RunSecret
from runtime.heartbeat import COORDINATOR_LOST_EXIT_CODE, _BeatClock, mark_dead, read_dead
from runtime.launcher import DIE_BEFORE_JOIN_ENV, Launcher
from runtime.secure_store import ForgedValueError, SecureStore

HELPERS = Path(__file__).parent / "helpers"
JOIN_CHILD = [sys.executable, str(HELPERS / "join_child.py")]


@pytest.fixture
def server():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))


def _client(server):
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=5))


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()):
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the store ---------------------------------------------------------------------------------

def test_store_keys_are_opaque_and_a_stranger_cannot_forge_or_move_values(server):
    secret = RunSecret.generate()
    run = SecureStore(_client(server), secret)
    stranger = _client(server)
    mark_dead(run, 1, {"by": "launcher", "reason": "test"})
    run.set("plan_hash", "a" * 64)
    names = server.list_keys()
    assert names and not any(k.startswith(("dead", "plan", "hb")) for k in names), names  # nothing to aim at
    # the plain names a stranger knows are not the run's keys
    stranger.set("dead/0", json.dumps({"rank": 0, "by": "attacker"}))
    assert read_dead(run, 0) is None and run.get("plan_hash") == b"a" * 64
    # a value forged under the real name, or one moved from another key, is refused
    stranger.set(run.name("plan_hash"), "b" * 64)
    with pytest.raises(ForgedValueError):
        run.get("plan_hash")
    stranger.set(run.name("dead/0"), stranger.get(run.name("dead/1")))  # a valid record, wrong key
    assert read_dead(run, 0) is None and read_dead(run, 1)["reason"] == "test"
    # another run's secret does not read this run's keys, nor names them
    other = SecureStore(_client(server), RunSecret.generate())
    assert other.name("dead/1") != run.name("dead/1") and read_dead(other, 1) is None
    assert run.compare_set("once", "", "x") == b"x" and run.compare_set("once", "", "y") == b"x"
    assert run.forged == 2  # the forged plan_hash and the moved record, each logged


def test_a_replayed_heartbeat_is_not_a_sign_of_life():
    clock = _BeatClock()
    beats = [f"{i} {100 + 0.1 * i:.6f}".encode() for i in range(5)]
    for i, b in enumerate(beats):
        clock.saw(b, 100 + 0.1 * i)
    last = clock.last_beat
    for i, b in enumerate([beats[2], beats[3], beats[2], beats[3]]):  # the hung rank's own old beats
        clock.saw(b, 101 + 0.1 * i)
    assert clock.last_beat == last
    clock.saw(b"5 100.600000", 101.5)
    assert clock.last_beat > last


def test_store_listens_on_loopback_only(tmp_path):
    launcher = Launcher([sys.executable, str(HELPERS / "env_child.py"), "inf"], 1,
                        env={"ADAPTLINK_TEST_OUT": str(tmp_path)}, timeout_s=30).start()
    with launcher:
        mine = {a for a in _listening(os.getpid()) if a[1] == launcher.port}
        assert mine == {("127.0.0.1", launcher.port)}
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for addr in others:  # as from another machine of the network
            with pytest.raises(OSError):
                socket.create_connection((addr, launcher.port), timeout=2).close()


# ---- the secret ------------------------------------------------------------------------------

def _rank_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "ADAPTLINK_SECRET"}
    return {**env, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "t",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9", **extra}


def test_a_rank_without_the_secret_refuses_to_start(tiny_ckpt, tmp_path):
    """Under torchrun (several machines, no launcher), one line and exit 2, before it connects."""
    plan = write_plan(tmp_path / "plan.json", manual_plan(str(tiny_ckpt), chain_shares(str(tiny_ckpt), [4])))
    cmd = [sys.executable, "-m", "adaptlink.launch", "--plan", str(plan)]
    p = subprocess.run(cmd, env=_rank_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("adaptlink.launch: error: rank 1: no run secret")
    loose = tmp_path / "secret"
    loose.write_text(RunSecret.generate().to_hex())
    loose.chmod(0o644)
    p = subprocess.run(cmd + ["--secret-file", str(loose)], env=_rank_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and f"{loose}: the secret file is readable by others" in p.stderr, p.stderr[-2000:]


def test_a_rank_with_a_wrong_secret_is_refused_and_the_run_ends_at_once(tmp_path):
    wrong = RunSecret.generate().env()
    t0 = time.monotonic()
    launcher = Launcher([*JOIN_CHILD, "join"], 3, timeout_s=60, log_dir=tmp_path,
                        env=lambda r: {"ADAPTLINK_TEST_OUT": str(tmp_path), **(wrong if r == 2 else {})})
    with launcher:
        result = launcher.start().wait(70)
    took = time.monotonic() - t0
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(3)}
    assert result.returncodes[0] == result.returncodes[2] == 2, logs
    assert "rank 2: refused by the run" in logs[2]
    assert "rank(s) [2] died or were refused before joining" in logs[0], logs
    # rank 1 sees the refusal too, unless the coordinator's exit (which ends the run) came
    # first: on a loaded machine the launcher then ends it, and says so
    ex1 = next(e for e in result.exits if e.rank == 1)
    if ex1.returncode == 2:
        assert "rank(s) [2] died or were refused before joining" in logs[1], logs
    else:
        assert ex1.cause == "shutdown" and ex1.returncode == -signal.SIGKILL, (ex1, logs)
    assert not any((tmp_path / f"joined{r}.json").exists() for r in range(3))  # nobody formed the group
    assert took < 30, took  # not the 60 s join timeout


def test_a_rank_killed_before_joining_is_left_out_of_the_group_at_once(tmp_path):
    """Rank 1 dies before it joins: ranks 0 and 2 form the group without it at once (a
    dropout, not the end of the run) and exchange messages over it."""
    t0 = time.monotonic()
    launcher = Launcher([*JOIN_CHILD, "join"], 3, timeout_s=60, log_dir=tmp_path,
                        env={"ADAPTLINK_TEST_OUT": str(tmp_path), DIE_BEFORE_JOIN_ENV: "1"})
    with launcher:
        result = launcher.start().wait(70)
    took = time.monotonic() - t0
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(3)}
    assert result.returncodes[1] == -signal.SIGKILL
    assert result.returncodes[0] == result.returncodes[2] == 0, logs
    assert "rank(s) [1] died before joining: the group is formed without them" in logs[0], logs
    joined = {r: json.loads((tmp_path / f"joined{r}.json").read_text()) for r in (0, 2)}
    assert joined[0]["members"] == joined[2]["members"] == [0, 2]
    assert joined[0]["answers"] == {"2": 2}  # rank 0's message reached rank 2, and its answer came back
    assert not (tmp_path / "joined1.json").exists()
    assert took < 30, took  # seconds, not the join timeout


# ---- a hung coordinator ------------------------------------------------------------------------

def test_a_hung_coordinator_ends_the_run(tmp_path):
    """SIGSTOP the coordinator once every rank has joined: the workers see its beat stop
    (COORDINATOR_SILENCE_S), exit, and the launcher ends it: the run ends, non-zero."""
    launcher = Launcher([*JOIN_CHILD, "hang"], 3, timeout_s=90, log_dir=tmp_path,
                        env={"ADAPTLINK_TEST_OUT": str(tmp_path)})
    with launcher:
        launcher.start()
        _wait_for(lambda: all((tmp_path / f"joined{r}.json").exists() for r in range(3)), 60, "every rank joined")
        time.sleep(1.0)  # the workers have seen the coordinator beat
        t_stop = time.monotonic()
        launcher.kill(0, signal.SIGSTOP, "inject")
        result = launcher.wait(60)
    ended = time.monotonic() - t_stop
    ex = {e.rank: e for e in result.exits}
    assert ex[1].returncode == COORDINATOR_LOST_EXIT_CODE or ex[2].returncode == COORDINATOR_LOST_EXIT_CODE, ex
    assert ex[0].cause == "hung" and ex[0].returncode == -signal.SIGKILL
    assert not result.ok and result.returncode != 0 and not result.timed_out
    assert ended < 15, ended  # 5 s of silence, then the launcher's reap


# ---- the attacks of experiments/attack.py against live runs -----------------------------------

@pytest.fixture(scope="module")
def attack_setup(tmp_path_factory):
    return attack.setup(tmp_path_factory.mktemp("attack"))


STORE_ATTACKS = ["dead0", "forged_hb", "replayed_hb", "plan_hash", "rendezvous", "interface"]


@pytest.mark.parametrize("key", STORE_ATTACKS)
def test_store_attacks_on_a_live_run_are_refused(key, attack_setup, tmp_path):
    plan, prompts, ref = attack_setup
    a = {x.key: x for x in attack.ATTACKS}[key]
    run, outcome, detail = attack.run_attack(a, plan, prompts, ref, tmp_path)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    assert outcome in (attack.REFUSED, "n/a"), f"{detail}\nattacker: {run.attacker}\n{logs}"
    assert run.tokens == ref
    if key in ("dead0", "plan_hash", "forged_hb", "replayed_hb"):  # the attacker did act
        assert any(v for v in run.attacker.values() if isinstance(v, int)), run.attacker
