"""One process per device on this machine: host the store, spawn, reap, inject failures.

torchrun's one-machine agent kills every worker when one dies (docs/FAILOVER.md), so a
run that must survive a dropout on one machine is started by this launcher instead: it
hosts the c10d TCPStore, spawns one child per rank with the torch.distributed env, and
reaps them with `poll()` every 10 ms, writing `dead/<rank>` the moment one dies. The
launcher may itself be started by `torchrun --standalone --nproc-per-node 1` (torchrun
then watches only the launcher).

    result = launch_local(lambda r: [sys.executable, "-m", "adaptlink.launch", "--plan", p],
                          world_size=4, threads=[1, 1, 1, 1],
                          inject=[KillSpec.parse("kill:rank=2,after=3.0")], timeout_s=600)
    sys.exit(result.returncode)

Rank side, under this launcher or any torchrun:

    ctx = init_rank()                 # RankContext(rank, world_size, store)
    Heartbeat(ctx.store, ctx.rank).start()

Rules of a run: the coordinator's death ends it (every child is killed, non-zero exit);
another rank's death does not (the others go on). When the coordinator exits 0 (it has
told the others to shut down), they get `grace_s` to exit on their own, then SIGTERM,
then SIGKILL after another `grace_s`. A rank that a Membership fenced
(dead/<rank> written while it still runs: SIGSTOPped, hung) is SIGKILLed. On `timeout_s`
the coordinator gets SIGALRM, on `cancel(sig)` (the parent's Ctrl-C/SIGTERM) that signal: it ends
its unfinished requests with error rows and writes its metrics, and every rank left is
SIGKILLed once it exits, or after `end_grace_s` if it does not.

Trust (issue 14 section 6; README "Security model"): the store listens on `host` only (a
socket bound here and handed to TCPStore: TCPStore itself binds the wildcard), and every
rank holds the run secret (`runtime.auth`): the launcher generates one per run and hands
it to its ranks in ADAPTLINK_SECRET; under torchrun (several machines) each rank takes it
from `--secret-file` or ADAPTLINK_SECRET and refuses to start without it. Every key below
goes through a `SecureStore` (opaque names, sealed values), the gloo rendezvous included.

Store keys, besides those of runtime.heartbeat (hb/<rank>, dead/<rank>, dead_count):

    tokens        counter; the coordinator adds the number of tokens it delivered
                  (`store.add(TOKENS_KEY, n)`); KillSpec(after_tokens=N) fires once it is >= N
    join/<attempt>/<rank>   written by init_rank before the gloo group is built (sealed:
                            only a rank holding the secret can write one that counts)
    members/<attempt>       the ranks forming the group, by rank 0 once every rank has joined
                            or died (sealed); a rank dead before joining is left out
    pg<attempt>/...         the gloo group's own rendezvous keys (sealed likewise)

Two keys are public (plain names, outside the SecureStore), so that a rank with a wrong
secret learns it at once instead of waiting out the join: `adaptlink/run` (a nonce and
its HMAC under the secret, written by the launcher or rank 0; it reveals nothing) and
`adaptlink/refused/<rank>` (written by a rank that found its secret wrong, so the others
fail at once naming it). A stranger can overwrite them: that stops the run (denial of
service, like deleting any key), it does not let anyone in.

Length: ~660 lines, over the house style's ~500, because the launcher side (spawn, reap,
inject, end) and the rank side (`init_rank`) speak one protocol over the same store keys;
split, each half would have to be read with the other open.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import psutil
import torch
import torch.distributed as dist

from partitioner.errors import AdaptLinkError
from runtime.auth import RunSecret, SecretError
from runtime.heartbeat import COORDINATOR_LOST_EXIT_CODE, DEAD_COUNT_KEY, mark_dead, read_dead
from runtime.roles import COORDINATOR_ENV, LAUNCHER_ENV, process_role
from runtime.secure_store import SecureStore

log = logging.getLogger(__name__)

TOKENS_KEY = "tokens"
INJECTED_KEY = "injected/{}"  # wall-clock time.time() of an injected kill, for recovery timings
PG_TIMEOUT = timedelta(hours=24)  # gloo must never time out: a timeout breaks every pair
POLL_S = 0.01
RUN_CHECK_KEY = "adaptlink/run"  # public: nonce + HMAC(secret, nonce); see the module docstring
REFUSED_KEY = "adaptlink/refused/{}"  # public: a rank whose secret did not match
DIE_BEFORE_JOIN_ENV = "ADAPTLINK_TEST_DIE_BEFORE_JOIN"  # tests only: this rank exits before joining
_PR_SET_PDEATHSIG = 1
# Variables of an outer torchrun that must not leak into the ranks.
_OUTER_VARS = ("GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
               "LOCAL_WORLD_SIZE", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_RESTART_COUNT",
               "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening socket on `host` only, for `TCPStore(master_listen_fd=...)`.

    TCPStore(host, port, is_master=True) listens on the wildcard whatever `host` says
    (measured: `::` for host 127.0.0.1 with torch 2.13), so a machine's every interface
    reached the store. Given a socket bound here, its (libuv) server listens on that one
    address only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise AdaptLinkError(f"cannot listen on {host}:{port} for the run's store: {e}") from None
    s.listen(1024)
    return s


def host_store(host: str, port: int = 0, timeout: timedelta = timedelta(seconds=60)):
    """(TCPStore server listening on host:port only, its socket); port 0 picks a free one."""
    sock = bind_listen_socket(host, port)
    store = dist.TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                          timeout=timeout, master_listen_fd=sock.fileno(), use_libuv=True)
    return store, sock


def publish_run_check(raw_store, secret: RunSecret) -> None:
    """Write the public `adaptlink/run` record: a nonce and its HMAC under the secret."""
    nonce = secrets.token_bytes(16)
    raw_store.set(RUN_CHECK_KEY, nonce.hex() + " " + secret.mac("run-check", nonce).hex())


def secret_matches(raw_store, secret: RunSecret) -> bool:
    """Whether this process's secret is the one `publish_run_check` wrote with."""
    try:
        nonce_hex, tag_hex = raw_store.get(RUN_CHECK_KEY).decode().split()
        return secret.verify(bytes.fromhex(tag_hex), "run-check", bytes.fromhex(nonce_hex))
    except ValueError:
        return False


# ---------------------------------------------------------------------------- failure injection
@dataclass(frozen=True, slots=True)
class KillSpec:
    """Send `signal` (default SIGKILL) to `rank` `after_s` seconds after launch, or once the
    store counter `tokens` reaches `after_tokens`."""

    rank: int
    after_s: float | None = None
    after_tokens: int | None = None
    signal: int = signal.SIGKILL

    def __post_init__(self):
        if (self.after_s is None) == (self.after_tokens is None):
            raise ValueError(f"KillSpec for rank {self.rank}: give exactly one of after_s, after_tokens")

    @classmethod
    def parse(cls, text: str) -> "KillSpec":
        """`kill:rank=R,after=SECONDS`, `kill:rank=R,after_tokens=N`; `stop:` sends SIGSTOP
        (a hang) instead of SIGKILL."""
        m = re.fullmatch(r"(kill|stop):(.*)", text.strip())
        fields = dict(kv.split("=", 1) for kv in m.group(2).split(",") if "=" in kv) if m else {}
        try:
            return cls(rank=int(fields["rank"]),
                       after_s=float(fields["after"]) if "after" in fields else None,
                       after_tokens=int(fields["after_tokens"]) if "after_tokens" in fields else None,
                       signal=signal.SIGKILL if m.group(1) == "kill" else signal.SIGSTOP)
        except (AttributeError, KeyError, ValueError) as e:
            raise ValueError(f"bad --inject {text!r} ({e}); expected kill:rank=R,after=SECONDS "
                             "or kill:rank=R,after_tokens=N") from None


# ---------------------------------------------------------------------------- results
@dataclass(slots=True)
class RankExit:
    rank: int
    returncode: int  # negative: killed by that signal
    at_s: float  # since launch
    cause: str  # "exit" (on its own), "inject", "fenced", "hung", "shutdown", "timeout"
    reaped_after_s: float | None = None  # since the launcher signalled it, if it did

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


@dataclass(slots=True)
class LaunchResult:
    world_size: int
    coordinator: int
    port: int
    exits: list[RankExit] = field(default_factory=list)  # in the order they were reaped
    injected: list[tuple[KillSpec, float]] = field(default_factory=list)  # (spec, at_s)
    timed_out: bool = False
    cancelled: int | None = None  # the signal (SIGINT, SIGTERM) that ended the run from outside
    duration_s: float = 0.0
    started_at: float = 0.0  # time.time() at launch: at_s values are relative to it

    @property
    def returncodes(self) -> dict[int, int]:
        return {e.rank: e.returncode for e in sorted(self.exits, key=lambda e: e.rank)}

    @property
    def ok(self) -> bool:
        """The coordinator exited 0 within the time limit."""
        return not self.timed_out and self.returncodes.get(self.coordinator) == 0

    @property
    def returncode(self) -> int:
        """For sys.exit: 0 if ok, else the coordinator's exit code (1 if that is 0 or a signal)."""
        rc = self.returncodes.get(self.coordinator, 1)
        return 0 if self.ok else (rc if rc > 0 else 1)


# ---------------------------------------------------------------------------- launcher
def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: the child only calls
    except (OSError, AttributeError):  # not Linux
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


class Launcher:
    """Host the store, spawn `world_size` ranks, reap them; see the module docstring.

    `argv`: the command of every rank, or a function rank -> command. `threads[r]`: the
    rank's OMP/MKL thread count (default 1). `env`: extra variables, or rank -> variables.
    `log_dir`: each rank's stdout and stderr go to log_dir/rank<r>.log (else inherited).
    `kill_fenced`: SIGKILL a rank that is marked dead while it still runs.
    """

    def __init__(self, argv: Sequence[str] | Callable[[int], Sequence[str]], world_size: int, *,
                 threads: Sequence[int] | None = None,
                 env: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
                 inject: Sequence[KillSpec] = (), coordinator: int = 0,
                 timeout_s: float | None = None, log_dir: str | Path | None = None,
                 grace_s: float = 3.0, host: str = "127.0.0.1", port: int = 0,
                 kill_fenced: bool = True, end_grace_s: float = 20.0, secret: RunSecret | None = None):
        if world_size < 1 or not 0 <= coordinator < world_size:
            raise ValueError(f"world_size {world_size}, coordinator {coordinator}")
        if threads is not None and len(threads) != world_size:
            raise ValueError(f"threads has {len(threads)} entries for {world_size} ranks")
        for k in inject:
            if not 0 <= k.rank < world_size:
                raise ValueError(f"inject names rank {k.rank}; ranks are 0..{world_size - 1}")
        self.argv, self.world_size = argv, world_size
        self.threads = list(threads) if threads is not None else [1] * world_size
        self.env, self.inject, self.coordinator = env, list(inject), coordinator
        self.timeout_s, self.log_dir, self.grace_s = timeout_s, log_dir, grace_s
        self.host, self.port, self.kill_fenced = host, port, kill_fenced
        # --timeout or cancel(): the coordinator is signalled and given this long to write the
        # error rows of its unfinished requests and the metrics before every rank is SIGKILLed
        self.end_grace_s = end_grace_s
        self._cancel: int | None = None  # a signal cancel() asked the reaper to forward
        self.secret = secret or RunSecret.generate()  # one per run unless given
        self.store = None  # a SecureStore client of the store hosted here
        self.raw_store = None  # the TCPStore server itself
        self._listen_sock: socket.socket | None = None
        self.procs: dict[int, subprocess.Popen] = {}
        self.result = LaunchResult(world_size, coordinator, self.port)
        self._signalled: dict[int, tuple[float, str]] = {}  # rank -> (monotonic, cause)
        self._killed: set[int] = set()  # ranks sent a SIGKILL
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._reaper: threading.Thread | None = None
        self._done = threading.Event()

    def rank_env(self, rank: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _OUTER_VARS}
        env.update(self.secret.env())  # this run's secret (`env` may override it: tests of a wrong one)
        extra = self.env(rank) if callable(self.env) else (self.env or {})
        env.update({k: str(v) for k, v in extra.items()})
        n = str(self.threads[rank])
        env.update(
            RANK=str(rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(self.world_size), MASTER_ADDR=self.host, MASTER_PORT=str(self.port),
            TORCHELASTIC_USE_AGENT_STORE="True",  # ranks are store clients only
            OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, ADAPTLINK_THREADS=n,
            **{LAUNCHER_ENV: "1", COORDINATOR_ENV: str(self.coordinator)},  # read by runtime.roles
        )
        return env

    def start(self) -> "Launcher":
        """Host the store and spawn the ranks. Call from a thread that outlives the run:
        PR_SET_PDEATHSIG fires when the spawning *thread* exits."""
        self.raw_store, self._listen_sock = host_store(self.host, self.port)
        self.port = self.result.port = self.raw_store.port
        publish_run_check(self.raw_store, self.secret)
        self.store = SecureStore(self.raw_store, self.secret)
        self._t0 = time.monotonic()
        self.result.started_at = time.time()
        preexec = _die_with_parent(os.getpid())
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        for r in range(self.world_size):
            cmd = list(self.argv(r) if callable(self.argv) else self.argv)
            out = open(Path(self.log_dir) / f"rank{r}.log", "wb") if self.log_dir is not None else None
            try:
                self.procs[r] = subprocess.Popen(cmd, env=self.rank_env(r), preexec_fn=preexec,
                                                 stdout=out, stderr=subprocess.STDOUT if out else None)
            finally:
                if out is not None:
                    out.close()  # the child holds its own descriptor
        log.info("launched %d ranks (pids %s), store at %s:%d, run %s", self.world_size,
                 [p.pid for p in self.procs.values()], self.host, self.port, self.secret.run_id)
        self._reaper = threading.Thread(target=self._reap, args=(self.store.clone(),),
                                        name="launcher-reaper", daemon=True)
        self._reaper.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def kill(self, rank: int, sig: int = signal.SIGKILL, cause: str = "inject") -> float:
        """Signal rank `rank` now; returns the time (s since launch)."""
        with self._lock:
            p = self.procs[rank]
            if p.returncode is None:
                if sig == signal.SIGKILL:
                    self._killed.add(rank)
                self._signalled[rank] = (time.monotonic(), cause)  # the last signal: reap latency
                os.kill(p.pid, sig)
        return self.elapsed()

    def wait(self, timeout: float | None = None) -> LaunchResult:
        """Wait until the run is over (see the module docstring) and return its result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run still going after {timeout} s")
        return self.result

    def cancel(self, signum: int = signal.SIGTERM) -> None:
        """End the run from outside (the parent's SIGINT/SIGTERM): the reaper forwards
        `signum` to the coordinator, which ends its requests with error rows and writes its
        metrics, then SIGKILLs every rank left (after `end_grace_s` at most). Safe in a
        signal handler: it only sets flags (the reaper thread does the rest)."""
        self.result.cancelled = self._cancel = signum

    def close(self) -> None:
        """End the run now: SIGKILL every rank still running, wait for the reaper."""
        if self._reaper is None:
            return
        self._end_all(signal.SIGKILL, "shutdown")
        self._done.wait(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ reaper
    def _live(self) -> list[int]:
        return [r for r, p in self.procs.items() if p.returncode is None]

    def _end_all(self, sig: int, cause: str) -> None:
        for r in self._live():
            if r in self._killed:
                continue  # already SIGKILLed: keep the cause it was killed for
            try:
                self.kill(r, sig, cause)
            except ProcessLookupError:
                pass

    def _begin_stop(self, live: list[int]) -> tuple[float, str] | None:
        """On --timeout or cancel(), signal the coordinator to end (SIGALRM for the timeout,
        the cancel's own signal otherwise: its error rows say which); (grace deadline, cause),
        or None."""
        if self._cancel is not None:
            sig, cause = self._cancel, "cancelled"
            log.warning("%s: ending the run (finished rows are kept)", signal.Signals(self._cancel).name)
        elif self.timeout_s is not None and self.elapsed() > self.timeout_s:
            self.result.timed_out = True
            sig, cause = signal.SIGALRM, "timeout"
            log.error("run exceeded %g s: ending it", self.timeout_s)
        else:
            return None
        if self.coordinator in live:
            self.kill(self.coordinator, sig, cause)
        else:
            self._end_all(signal.SIGKILL, cause)
        return time.monotonic() + self.end_grace_s, cause

    def _record_exit(self, client, rank: int, rc: int) -> None:
        now = time.monotonic()
        sent = self._signalled.get(rank)
        cause = sent[1] if sent else "exit"
        ex = RankExit(rank, rc, now - self._t0, cause, now - sent[0] if sent else None)
        self.result.exits.append(ex)
        if cause in ("shutdown", "timeout", "cancelled"):
            return
        how = f"killed by {ex.signal_name}" if rc < 0 else f"exited with code {rc}"
        try:
            mark_dead(client, rank, {"by": "launcher", "reason": how, "returncode": rc,
                                     "signal": ex.signal_name, "time": time.time()}, overwrite=True)
        except Exception as e:  # the store lives in this process: should not happen
            log.error("could not mark rank %d dead: %s", rank, e)
        log.log(logging.INFO if rc == 0 else logging.WARNING, "rank %d %s after %.2f s", rank, how, ex.at_s)

    def _reap(self, client) -> None:
        pending = list(self.inject)
        dead_seen = 0
        ending = None  # (deadline, next signal to the ranks left), once the coordinator is done
        stopping = None  # (deadline, cause): the coordinator was told to end (timeout, cancel)
        try:
            while True:
                # poll all before acting: a rank that exited on its own just before the
                # coordinator is recorded as such, not as ended by the shutdown
                exited = [(r, rc) for r in self._live() if (rc := self.procs[r].poll()) is not None]
                for r, rc in exited:
                    self._record_exit(client, r, rc)
                    if (r != self.coordinator and rc == COORDINATOR_LOST_EXIT_CODE and ending is None
                            and self.procs[self.coordinator].returncode is None):
                        log.error("rank %d saw the coordinator (rank %d) hang: ending it", r, self.coordinator)
                        self.kill(self.coordinator, signal.SIGKILL, "hung")
                    if r == self.coordinator and ending is None:
                        if stopping is not None:  # it ended as told: the others go now
                            self._end_all(signal.SIGKILL, stopping[1])
                            ending = (time.monotonic(), signal.SIGKILL)
                        elif rc == 0:
                            # it told the others to shut down: they get `grace_s` to exit on
                            # their own (a clean 0), then SIGTERM, then SIGKILL
                            ending = (time.monotonic() + self.grace_s, signal.SIGTERM)
                        else:  # the coordinator (and the store's use) is gone: run over
                            log.error("coordinator rank %d died (rc %d): ending the run", r, rc)
                            self._end_all(signal.SIGKILL, "shutdown")
                            ending = (time.monotonic(), signal.SIGKILL)
                live = self._live()
                if not live:
                    break
                if ending is not None:
                    if time.monotonic() >= ending[0]:
                        self._end_all(ending[1], "shutdown")
                        if ending[1] == signal.SIGTERM:
                            ending = (time.monotonic() + self.grace_s, signal.SIGKILL)
                    time.sleep(POLL_S)
                    continue
                if stopping is None:
                    stopping = self._begin_stop(live)
                elif time.monotonic() >= stopping[0]:
                    log.error("the coordinator did not end within %g s: killing every rank", self.end_grace_s)
                    self._end_all(signal.SIGKILL, stopping[1])
                    ending = (time.monotonic(), signal.SIGKILL)
                    continue
                if pending:
                    tokens = None
                    for k in list(pending):
                        if k.after_tokens is not None and tokens is None:
                            tokens = client.add(TOKENS_KEY, 0)
                        due = (self.elapsed() >= k.after_s) if k.after_s is not None else tokens >= k.after_tokens
                        if due:
                            pending.remove(k)
                            if k.rank in live:
                                at = self.kill(k.rank, k.signal, "inject")
                                self.result.injected.append((k, at))
                                client.set(INJECTED_KEY.format(k.rank), repr(time.time()))
                                log.warning("injected %s into rank %d at %.2f s",
                                            signal.Signals(k.signal).name, k.rank, at)
                if self.kill_fenced:
                    count = client.add(DEAD_COUNT_KEY, 0)
                    if count != dead_seen:
                        dead_seen = count
                        for r in live:
                            if r not in self._killed and read_dead(client, r) is not None:
                                log.warning("rank %d was fenced while running: SIGKILL", r)
                                self.kill(r, signal.SIGKILL, "fenced")
                time.sleep(POLL_S)
        except Exception:
            log.exception("launcher reaper failed: killing every rank")
            self._end_all(signal.SIGKILL, "shutdown")
            for p in self.procs.values():
                p.wait()
        finally:
            self.result.duration_s = self.elapsed()
            self._done.set()


def launch_local(argv: Sequence[str] | Callable[[int], Sequence[str]], world_size: int, **kwargs) -> LaunchResult:
    """Run `world_size` ranks on this machine to the end; see `Launcher` for the arguments."""
    launcher = Launcher(argv, world_size, **kwargs)
    try:
        launcher.start()
        return launcher.wait()
    except BaseException:
        launcher.close()  # Ctrl-C or an error here: take the ranks down with us
        raise


# ---------------------------------------------------------------------------- rank side
def self_inject(ctx: "RankContext", specs: Sequence[KillSpec]) -> threading.Thread | None:
    """Failure injection without the launcher (under torchrun): this rank SIGKILLs itself
    when a spec of its own is due — `after_s` since now, or the store's `tokens` counter
    at `after_tokens`. It records the time in `injected/<rank>` first, as the launcher does."""
    specs = [k for k in specs if k.rank == ctx.rank]
    if not specs:
        return None
    t0 = time.monotonic()
    client = ctx.store.clone()

    def run() -> None:
        while True:
            tokens = client.add(TOKENS_KEY, 0) if any(k.after_tokens is not None for k in specs) else 0
            for k in specs:
                due = (time.monotonic() - t0 >= k.after_s) if k.after_s is not None else tokens >= k.after_tokens
                if due:
                    client.set(INJECTED_KEY.format(ctx.rank), repr(time.time()))
                    log.warning("rank %d: injected %s into itself", ctx.rank, signal.Signals(k.signal).name)
                    os.kill(os.getpid(), k.signal)
            time.sleep(POLL_S)

    t = threading.Thread(target=run, name="self-inject", daemon=True)
    t.start()
    return t


def release_torchrun_exit_barrier(store, dead: Sequence[int]) -> int:
    """One torchrun per device (static rendezvous): check in to the agents' exit barrier
    for the agent of each dead rank, which never will (its worker failed). Without this,
    surviving agents wait there `exit_barrier_timeout` (300 s) after a dropout before they
    exit (docs/FAILOVER.md). The coordinator calls it once it is done; returns how many
    check-ins it made (0 when not under such a torchrun, or with a torch lacking the barrier)."""
    role = process_role()
    if not dead or role.run_id is None or role.under_launcher or not role.single_agent:
        return 0
    # torch-internal names, as the agent itself uses them: imported here, and only here, so
    # that a torch without them costs a warning at the end of a run, not the import of this module
    try:
        from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
        from torch.distributed.elastic.utils.store import _barrier_nonblocking
    except ImportError as e:
        log.warning("cannot release torchrun's exit barrier (%s): surviving agents wait up to 300 s", e)
        return 0
    world = int(role.world_size)
    store = getattr(store, "inner", store)  # the agents' keys are torchrun's own: plain names
    agents = dist.PrefixStore(role.run_id, store)
    for _ in dead:
        _barrier_nonblocking(store=agents, world_size=world, key_prefix=_TERMINAL_STATE_SYNC_ID)
    return len(dead)


class RankContext(NamedTuple):
    rank: int
    world_size: int
    store: object  # a SecureStore over a TCPStore client of the run's store (no prefix)
    secret: RunSecret | None = None
    # the ranks in the gloo group, in group order: every rank of the run but those that died
    # before joining (`runtime.transport.Transport(members=...)` numbers its peers by them)
    members: tuple[int, ...] = ()


class SecretMissingError(AdaptLinkError):
    """A rank without the run secret, or with a wrong one: it is refused before it joins."""


class JoinError(AdaptLinkError):
    """The group cannot be formed: a rank died, or was refused, before it joined."""


MEMBERS_KEY = "members/{}"  # sealed: the ranks that form the group of a join attempt (rank 0 decides)


def _agree_members(store, raw, rank: int, world: int, attempt: int, timeout: float) -> tuple[int, ...]:
    """The ranks that form the gloo group: every rank that joined, less those the launcher
    marked dead before they did (a device lost while starting is a dropout like any other:
    its blocks go to their backups once the run starts). Rank 0 waits until every rank has
    joined or is dead, then writes the member list; the others wait for it. A rank refused
    (a wrong secret), rank 0 dying before it decides, or a rank neither joined nor dead
    within `timeout` ends the join with JoinError: the group cannot be formed."""
    keys = [f"join/{attempt}/{r}" for r in range(world)]
    decided = MEMBERS_KEY.format(attempt)
    deadline = time.monotonic() + timeout
    dead_seen, dead = -1, set()
    while True:
        if rank != 0 and store.check([decided]):
            members = tuple(json.loads(store.get(decided).decode()))
            if rank not in members:
                raise JoinError(f"rank {rank}: rank 0 formed the group without this rank "
                                f"(members {list(members)}): it joined too late")
            return members
        refused = [r for r in range(world) if raw.check([REFUSED_KEY.format(r)])]
        if refused:
            raise JoinError(f"rank {rank}: rank(s) {refused} died or were refused before joining; "
                            "the group cannot be formed (a rank with a wrong secret): the run is over")
        if (count := store.add(DEAD_COUNT_KEY, 0)) != dead_seen:  # a death since the last look
            dead_seen = count
            dead = {r for r in range(world) if r != rank and read_dead(store, r) is not None}
        if 0 in dead:
            raise JoinError(f"rank {rank}: rank 0, which forms the group, died before joining: the run is over")
        joined = [r for r in range(world) if r not in dead and store.check([keys[r]])]
        if rank == 0 and len(joined) + len(dead) == world:
            members = tuple(joined)
            if dead:
                log.warning("rank(s) %s died before joining: the group is formed without them (a dropout)",
                            sorted(dead))
            store.set(decided, json.dumps(list(members)))
            return members
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if r not in dead and not store.check([keys[r]])]
            raise JoinError(f"rank {rank}: ranks {missing or [0]} did not join within {timeout:.0f} s")
        time.sleep(POLL_S)


def interface_of(host: str) -> str | None:
    """The network interface holding address `host` (for GLOO_SOCKET_IFNAME), or None."""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return None
    for name, entries in psutil.net_if_addrs().items():
        if any(e.address.split("%")[0] in addrs for e in entries):
            return name
    return None


def _bind_gloo(rank: int, bind_host: str | None) -> None:
    """Make this rank's gloo device listen on `bind_host` only (the plan's address for the
    device): torch 2.13 ignores pg_options for gloo, so the interface is named in
    GLOO_SOCKET_IFNAME, which gloo binds (its first address: 127.0.0.1 for `lo`)."""
    if not bind_host or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    iface = interface_of(bind_host)
    if iface is None:
        raise AdaptLinkError(f"rank {rank}: host {bind_host!r} (the plan's address for this device) "
                             "is not an address of this machine")
    os.environ["GLOO_SOCKET_IFNAME"] = iface


def init_rank(timeout: float = 120.0, *, backend: str = "gloo", secret_file: str | None = None,
              bind_host: str | None = None) -> RankContext:
    """Join the run described by the environment (this launcher, or torchrun) and build the
    default process group with a timeout of hours (gloo must never time out).

    The rank needs the run secret (`secret_file`, else ADAPTLINK_SECRET; the launcher sets
    the latter): without it, or with one that is not the run's, it raises
    SecretMissingError before it joins. Its store is a SecureStore, its join record and
    gloo's rendezvous go through it. `bind_host`: the address this device's gloo listens
    on (the plan's `devices[r].host`; default MASTER_ADDR when that is a loopback address).

    Waits at most `timeout` s for every rank to arrive. A rank marked dead meanwhile (the
    launcher reaped it) is left out of the group at once, a dropout like any later one
    (`RankContext.members`; the engine reroutes its blocks to their backups); a rank
    refused (wrong secret) ends the wait with JoinError naming it. Sets
    torch's thread count from ADAPTLINK_THREADS when the launcher gave one.
    """
    role = process_role()
    try:
        for name, value in (("RANK", role.rank), ("WORLD_SIZE", role.world_size)):
            if value is None:
                raise KeyError(name)
        rank, world = int(role.rank), int(role.world_size)
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise RuntimeError(f"init_rank: {e.args[0]} is not set; start this under "
                           "runtime.launcher or torchrun") from None
    try:
        secret = RunSecret.resolve(secret_file)
    except SecretError as e:
        raise SecretMissingError(f"rank {rank}: {e}") from None
    if secret is None:
        raise SecretMissingError(f"rank {rank}: no run secret: give every device the same --secret-file F "
                                 f"(or ${'ADAPTLINK_SECRET'}); see README, Security model")
    if os.environ.get("ADAPTLINK_THREADS"):
        torch.set_num_threads(int(os.environ["ADAPTLINK_THREADS"]))
    local_world = role.local_world_size
    launcher = role.under_launcher
    if not launcher and local_world > 1 and rank == 0:
        log.warning("torchrun runs %d device processes under one agent: the death of any one "
                    "ends the run (start one torchrun per device, or `adaptlink run`, to "
                    "survive a dropout)", local_world)
    if bind_host is None and host in ("127.0.0.1", "localhost", "::1"):
        bind_host = host
    _bind_gloo(rank, bind_host)
    raw = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
    # Prove the secret before joining: the launcher (or rank 0 under torchrun) published a
    # nonce and its HMAC; a rank whose secret does not verify it is not of this run.
    if not launcher and rank == 0:
        publish_run_check(raw, secret)
    raw.wait([RUN_CHECK_KEY], timedelta(seconds=timeout))
    if not secret_matches(raw, secret):
        raw.set(REFUSED_KEY.format(rank), str(os.getpid()))
        raise SecretMissingError(f"rank {rank}: refused by the run at {host}:{port}: its secret is not this "
                                 "rank's (give every device the same --secret-file / ADAPTLINK_SECRET)")
    store = SecureStore(raw, secret)
    if os.environ.get(DIE_BEFORE_JOIN_ENV) == str(rank):  # tests: a rank lost before it joins
        os.kill(os.getpid(), signal.SIGKILL)
    attempt = role.restart_count
    store.set(f"join/{attempt}/{rank}", str(os.getpid()))
    members = _agree_members(store, raw, rank, world, attempt, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pg{attempt}/", store),
                            rank=members.index(rank), world_size=len(members), timeout=PG_TIMEOUT)
    return RankContext(rank, world, store, secret, members)
