"""The attacks of issue 14 section 6, each against a live run on 127.0.0.1, as a table.

Each row is one real run (3 devices, rank 1 and rank 2 back each other up, a tiny
random-weight LLaVA) started the way `adaptlink run` starts it (runtime.launcher, one
process per device, a fresh run secret), with a *foreign process* attacking it: a
separate Python process that holds only what a local stranger has, the store's
address and port (TCPStore clients may list, read, write and delete every key). The
outcome is "refused" when the run exits 0 with every request's tokens identical to HF
generate's and the attack-specific check holds (e.g. the hung rank is still detected
at once); anything else is reported as "NOT refused" with what went wrong.

Measured before the run secret (issue 14): one `dead/0` write killed the run; forged
heartbeats hid a SIGSTOPped rank for 31 s instead of 0.4 s; overwriting `plan_hash`
blocked every start; rewriting the gloo rendezvous record took rank 2's place in 11 of 11.

    python experiments/attack.py                  # every attack, ~2 min on 2 cores
    python experiments/attack.py --only dead0 plan_hash

Writes experiments/results/attack/attack.json. To add an attack (e.g. the transport's
frame attacks: forged, altered, replayed, oversized frames, a wrong sender), append an
`Attack` to ATTACKS (or call `register`): `attacker(args)` runs in the foreign process,
`judge(run)` returns (outcome, detail) from the run's result; `inject` adds launcher
failure injection (a SIGSTOP, say) for attacks that need a victim.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REFUSED = "refused"


# ---------------------------------------------------------------------------- the foreign process
def _client(args, timeout_s: float = 10.0):
    import torch.distributed as dist

    return dist.TCPStore(args.host, args.port, is_master=False, timeout=timedelta(seconds=timeout_s))


def _until(args):
    """Yield every `args.period` s for `args.seconds` s."""
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        yield
        time.sleep(args.period)


def attack_dead0(args) -> dict:
    """Write dead/<rank> records for the coordinator and every rank, bump dead_count."""
    c = _client(args)
    n = 0
    for _ in _until(args):
        for r in range(3):
            c.set(f"dead/{r}", json.dumps({"rank": r, "by": "attacker", "reason": "forged", "time": time.time()}))
        c.add("dead_count", 1)
        n += 1
    return {"writes": n}


def attack_forged_heartbeats(args) -> dict:
    """Beat for rank 2 (the launcher SIGSTOPs it mid-run) with a growing counter."""
    c = _client(args)
    i = 1000
    for _ in _until(args):
        c.set("hb/2", f"{i} {time.monotonic():.6f}")
        i += 1
    return {"beats": i - 1000}


def attack_replayed_heartbeats(args) -> dict:
    """Find the heartbeat that stops (rank 2, SIGSTOPped) among every key it can list, and
    keep it moving by writing its last values again, alternately: no secret needed to copy
    a value the rank itself wrote."""
    c = _client(args)
    history: dict[str, list[bytes]] = {}  # key -> its last distinct values
    changed: dict[str, float] = {}  # key -> when a value not seen before last appeared
    replays = 0
    for _ in _until(args):
        keys = c.list_keys()
        try:
            values = c.multi_get(keys)
        except Exception:
            continue
        now = time.monotonic()
        for k, v in zip(keys, values):
            h = history.setdefault(k, [])
            if v not in h:  # a new value (ours are old ones, already here)
                h.append(v)
                del h[:-4]
                changed[k] = now
        for k, h in history.items():
            if len(h) >= 3 and now - changed[k] > 0.15:  # it beat, then stopped: keep it moving
                c.set(k, h[-1 - replays % 2])
                replays += 1
    return {"replays": replays, "keys_seen": len(history)}


def attack_plan_hash(args) -> dict:
    """Overwrite plan_hash (the coordinator's plan hash every rank checks) from launch on."""
    c = _client(args)
    n = 0
    for _ in _until(args):
        c.set("plan_hash", "0" * 64)
        n += 1
    return {"writes": n}


def attack_rendezvous(args) -> dict:
    """Join as rank 2 before the real one: write its join record and enter gloo's rendezvous
    with this process's address (init_process_group on the store), as a stranger would."""
    import threading

    import torch.distributed as dist

    c = _client(args, timeout_s=args.seconds)
    c.set("join/0/2", str(os.getpid()))
    joined = threading.Event()

    def join() -> None:
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("pg0/", c), rank=2, world_size=3,
                                    timeout=timedelta(seconds=args.seconds))
            joined.set()
        except Exception:
            pass

    threading.Thread(target=join, daemon=True).start()
    joined.wait(args.seconds)
    return {"joined": joined.is_set()}


def attack_other_interface(args) -> dict:
    """Connect to the store's port through every non-loopback address of this machine (as
    a process on another machine of the network would)."""
    import psutil

    tried = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                try:
                    socket.create_connection((a.address, args.port), timeout=2).close()
                    tried[f"{name} {a.address}"] = "connected"
                except OSError as e:
                    tried[f"{name} {a.address}"] = f"refused ({e.strerror or e})"
    return {"tried": tried}


def attack_frames(args) -> dict:
    """Connect to every TCP port the run's processes listen on (gloo's pair listeners, the
    store) and send what a stranger can: random bytes, an AdaptLink wire prefix announcing a
    4 GiB body, and a well-formed frame with a made-up tag, over and over."""
    import psutil
    import torch

    from runtime import wire

    prefix = struct.pack("=4q", wire.MAGIC, 64, 4 * 2**30, 0)
    frame = wire.encode(0, {"kind": "stop"}, {"hidden": torch.zeros(4)})
    forged = bytes(frame.prefix.numpy().tobytes()) + bytes(frame.body.numpy().tobytes())
    payloads = [os.urandom(4096), prefix, forged]
    ports, sent, refused = set(), 0, 0
    for _ in _until(args):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("127.0.0.1", "0.0.0.0", "::", "::1") \
                    and c.pid is not None and c.pid != os.getpid() and c.laddr.port != args.port:
                try:
                    cmd = " ".join(psutil.Process(c.pid).cmdline())
                except psutil.Error:
                    continue
                if "adaptlink.launch" not in cmd:
                    continue
                ports.add(c.laddr.port)
                try:
                    with socket.create_connection(("127.0.0.1", c.laddr.port), timeout=0.5) as sock:
                        sock.sendall(payloads[sent % len(payloads)])
                    sent += 1
                except OSError:
                    refused += 1
        time.sleep(0.2)
    return {"ports": sorted(ports), "sent": sent, "refused_connections": refused}


# ---------------------------------------------------------------------------- judging a run
@dataclass
class RunOutcome:
    returncode: int
    tokens: dict[str, list[int]]
    reference: dict[str, list[int]]
    metrics: dict
    attacker: dict
    wall_s: float

    @property
    def intact(self) -> tuple[bool, str]:
        if self.returncode != 0:
            return False, f"the run failed (exit {self.returncode})"
        differ = [i for i, t in self.reference.items() if self.tokens.get(i) != t]
        if differ:
            return False, f"tokens differ from HF for {differ}"
        return True, f"exit 0, {len(self.reference)} requests' tokens identical to HF"


def judge_intact(run: RunOutcome) -> tuple[str, str]:
    ok, why = run.intact
    return (REFUSED if ok else "NOT refused"), why


def judge_hung_rank_detected(run: RunOutcome) -> tuple[str, str]:
    ok, why = run.intact
    f = (run.metrics.get("failovers") or [None])[0]
    if not ok:
        return "NOT refused", why
    if f is None or f["rank"] != 2:
        return "NOT refused", "the hung rank 2 was never declared dead"
    det = f["detected_at"] - f["killed_at"] if f.get("killed_at") is not None else None
    if det is None or det > 2.0:
        return "NOT refused", f"the hung rank was detected after {det} s"
    return REFUSED, f"{why}; hung rank 2 detected {det:.2f} s after the SIGSTOP"


def judge_not_joined(run: RunOutcome) -> tuple[str, str]:
    ok, why = run.intact
    if run.attacker.get("joined"):
        return "NOT refused", "the stranger completed the gloo rendezvous as rank 2"
    return (REFUSED if ok else "NOT refused"), why + ("; the stranger never joined" if ok else "")


def judge_unreachable(run: RunOutcome) -> tuple[str, str]:
    ok, why = run.intact
    tried = run.attacker.get("tried", {})
    if any(v == "connected" for v in tried.values()):
        return "NOT refused", f"the store answered on {[k for k, v in tried.items() if v == 'connected']}"
    if not tried:
        return "n/a", "this machine has no non-loopback address to try"
    return (REFUSED if ok else "NOT refused"), f"{why}; " + "; ".join(f"{k}: {v}" for k, v in tried.items())


def judge_frames_sent(run: RunOutcome) -> tuple[str, str]:
    ok, why = run.intact
    sent = run.attacker.get("sent", 0)
    if not sent:
        return "NOT refused", f"no frame reached a rank ({run.attacker}); the attack did not run"
    return (REFUSED if ok else "NOT refused"), f"{why}; {sent} payloads sent to ports {run.attacker.get('ports')}"


@dataclass
class Attack:
    key: str
    name: str
    attacker: Callable[[argparse.Namespace], dict]
    judge: Callable[[RunOutcome], tuple[str, str]] = judge_intact
    inject: list[str] = field(default_factory=list)  # KillSpec texts for the launcher
    seconds: float = 25.0  # how long the attacker keeps at it
    period: float = 0.02


ATTACKS: list[Attack] = [
    Attack("dead0", "write dead/0 (and dead/1, dead/2)", attack_dead0),
    Attack("forged_hb", "forge heartbeats for a hung rank", attack_forged_heartbeats,
           judge_hung_rank_detected, inject=["stop:rank=2,after_tokens=12"]),
    Attack("replayed_hb", "replay a hung rank's own heartbeats", attack_replayed_heartbeats,
           judge_hung_rank_detected, inject=["stop:rank=2,after_tokens=12"], period=0.03),
    Attack("plan_hash", "overwrite plan_hash", attack_plan_hash, period=0.01),
    Attack("rendezvous", "take rank 2's place in the rendezvous", attack_rendezvous, judge_not_joined),
    Attack("interface", "reach the store from another interface", attack_other_interface, judge_unreachable,
           seconds=1.0),
    Attack("frames", "send garbage, a 4 GiB prefix and forged frames to every port the ranks listen on",
           attack_frames, judge_frames_sent, seconds=10.0),
]
# A genuine rank that forges messages (wrong sender, bad tags, replays, malformed and
# oversized frames between members) is tested in tests/test_wire_security.py: it needs the
# secret, which no foreign process here has.


def register(attack: Attack) -> None:
    ATTACKS.append(attack)


# ---------------------------------------------------------------------------- one run
def setup(work: Path, n_requests: int = 4, max_new_tokens: int = 10) -> tuple[Path, Path, dict]:
    """A tiny checkpoint, its requests, a 3-device plan with backups, and HF's tokens."""
    from adaptlink.plans import chain_shares, manual_plan, write_plan
    from adaptlink.model.reference import hf_reference
    from adaptlink.model.samples import write_sample_requests
    from adaptlink.model.tiny import make_tiny

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_tiny(ckpt)
    prompts = write_sample_requests(work / "req", n=n_requests, seed=11, max_new_tokens=max_new_tokens)
    plan = write_plan(work / "plan.json", manual_plan(str(ckpt), chain_shares(str(ckpt), [2, 2]),
                                                      backups={1: 2, 2: 1}, in_flight=3))
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    ref = dict(zip(ids, hf_reference(ckpt, prompts)))
    return plan, prompts, ref


def run_attack(attack: Attack, plan: Path, prompts: Path, ref: dict, out_dir: Path,
               timeout_s: float = 180) -> tuple[RunOutcome, str, str]:
    """One live run under attack; returns (the run, outcome, detail)."""
    from runtime.launcher import KillSpec, Launcher

    out_dir.mkdir(parents=True, exist_ok=True)
    out, metrics, report = out_dir / "out.jsonl", out_dir / "metrics.json", out_dir / "attacker.json"
    for f in (out, metrics, report):
        f.unlink(missing_ok=True)
    inject = [KillSpec.parse(s) for s in attack.inject]
    cmd = [sys.executable, "-m", "adaptlink.launch", "--plan", str(plan), "--prompts", str(prompts),
           "--out", str(out), "--metrics", str(metrics), "--timeout", str(timeout_s)]
    for s in attack.inject:
        cmd += ["--inject", s]
    t0 = time.perf_counter()
    launcher = Launcher(cmd, 3, inject=inject, coordinator=0, timeout_s=timeout_s, log_dir=out_dir / "logs")
    env = {k: v for k, v in os.environ.items() if k != "ADAPTLINK_SECRET"}  # a stranger has no secret
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    with launcher:
        launcher.start()
        foreign = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--attacker", attack.key,
                                    "--port", str(launcher.port), "--seconds", str(attack.seconds),
                                    "--period", str(attack.period), "--report", str(report)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=open(out_dir / "attacker.log", "wb"))
        result = launcher.wait(timeout_s + 30)
    try:
        foreign.wait(attack.seconds + 30)
    except subprocess.TimeoutExpired:
        foreign.kill()
        foreign.wait()
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    run = RunOutcome(result.returncode, {r["id"]: r["tokens"] for r in rows if "error" not in r}, ref,
                     json.loads(metrics.read_text()) if metrics.exists() else {},
                     json.loads(report.read_text()) if report.exists() else {}, time.perf_counter() - t0)
    outcome, detail = attack.judge(run)
    return run, outcome, detail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help=f"attacks to run (of {[a.key for a in ATTACKS]})")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "adaptlink" / "attack")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "attack")
    # the foreign process (started by this script)
    ap.add_argument("--attacker", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    ap.add_argument("--period", type=float, default=0.02, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.attacker:
        attack = {a.key: a for a in ATTACKS}[args.attacker]
        try:
            res = attack.attacker(args)
        except Exception as e:  # the store went away with the run: report what we have
            res = {"error": repr(e)}
        args.report.write_text(json.dumps(res))
        os._exit(0)  # a thread may still be blocked in gloo's rendezvous

    from rich.console import Console
    from rich.table import Table

    chosen = [a for a in ATTACKS if not args.only or a.key in args.only]
    plan, prompts, ref = setup(args.work)
    rows = []
    for a in chosen:
        run, outcome, detail = run_attack(a, plan, prompts, ref, args.out / a.key)
        rows.append({"attack": a.name, "key": a.key, "outcome": outcome, "detail": detail,
                     "attacker": run.attacker, "wall_s": round(run.wall_s, 2)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack.json").write_text(json.dumps(rows, indent=1))
    t = Table(title="issue 14 section 6: attacks on a live run at 127.0.0.1")
    for c in ("attack", "outcome", "detail"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["attack"], r["outcome"], r["detail"])
    Console(width=160).print(t)
    return 0 if all(r["outcome"] in (REFUSED, "n/a") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
