"""Entry point of every device process: `torchrun ... -m adaptlink.launch --plan plan.json`.

One machine (tests, demo, emulated clusters) — this process becomes the launcher: it
hosts the store and starts one process per device, so that a device's death is survived:

    adaptlink run --plan plan.json --prompts prompts.jsonl --out out.jsonl
    torchrun --standalone --nproc-per-node 1 -m adaptlink.launch --plan plan.json \\
        --prompts prompts.jsonl --out out.jsonl

Several machines — one torchrun per device, rendezvous at the coordinator (rank 0):

    torchrun --nnodes N --node-rank i --nproc-per-node 1 --max-restarts 0 \\
        --master-addr COORD_HOST --master-port 29500 \\
        -m adaptlink.launch --plan plan.json --prompts prompts.jsonl --out out.jsonl

`torchrun --nproc-per-node N -m adaptlink.launch ...` also runs a plan of N devices, but
torchrun's agent then kills every device when one dies: no failover (a warning says so).

Failure injection (a real SIGKILL of that rank's process): `--inject kill:rank=2,after=3.5`
or `--inject kill:rank=2,after_tokens=40`. Under the launcher, the launcher sends it (after=
counts from launch); under torchrun, rank R kills itself (after= counts from when the ranks joined).
`stop:` (SIGSTOP, a hang) needs the launcher, which SIGKILLs a fenced rank.

out.jsonl is written as requests finish and completed however the run ends (README,
"out.jsonl"); `--resume` serves only the ids without a complete row. The launcher forwards
Ctrl-C/SIGTERM to the coordinator and sends it SIGALRM for --timeout; the coordinator
ends its unfinished requests with error rows, writes its metrics and exits 128 + the
signal (124 for the timeout); if it cannot (SIGKILLed, hung), the launcher completes
out.jsonl and the metrics itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from partitioner.errors import AdaptLinkError
from runtime.scheduler import BatchLimits

log = logging.getLogger("adaptlink.launch")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptlink.launch", description=__doc__.splitlines()[0])
    add_run_arguments(p)
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="plan.json from `adaptlink plan`")
    p.add_argument("--prompts", help="prompts.jsonl: {id, prompt, image, max_new_tokens} per line")
    p.add_argument("--out", help="out.jsonl: {id, tokens, text, ttft_s, latency_s} per line")
    p.add_argument("--metrics", help="write the run's metrics (JSON) here")
    p.add_argument("--in-flight", type=int, help="requests in flight (default: the plan's workload.in_flight)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for requests that name none")
    p.add_argument("--max-batch-rows", type=int, default=32, metavar="N",
                   help="rows (requests) per micro-batch; 1: one request per forward (default %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=256, metavar="N",
                   help="tokens per micro-batch: longer prompts are prefilled in chunks (default %(default)s)")
    p.add_argument("--micro-batches", type=int, default=0, metavar="N",
                   help="micro-batches in the pipeline at once (default 0: one per stage, plus one)")
    p.add_argument("--inject", action="append", default=[], metavar="kill:rank=R,after=S",
                   help="SIGKILL a rank after S seconds (after=) or N tokens (after_tokens=); repeatable")
    p.add_argument("--recovery", choices=("preloaded", "cold"), default="preloaded",
                   help="preloaded: backup holders load the shares they back up at start (default); "
                        "cold: they load a failed share from the checkpoint when it fails (for comparison)")
    p.add_argument("--cold-from-disk", action="store_true",
                   help="with --recovery cold: drop the checkpoint from the OS page cache before the "
                        "cold load, so it is read from storage")
    p.add_argument("--cold-read-mbps", type=float, metavar="MB_PER_S",
                   help="with --recovery cold: emulate storage of this speed (MB/s) for the cold load")
    p.add_argument("--replay", choices=("recompute", "exact"), default="recompute",
                   help="after a failover, replay in-flight requests with one prefill of prompt + tokens "
                        "so far (recompute, default) or step by step as first run (exact: bitwise the same cache)")
    p.add_argument("--secret-file", metavar="F",
                   help="the run secret (hex, a file of mode 600; the same file on every device). "
                        "Required under torchrun across machines (or $ADAPTLINK_SECRET); `adaptlink run` "
                        "generates one per run when not given. See README, Security model")
    p.add_argument("--log-dir", help="each rank's output to LOG_DIR/rank<r>.log (launcher mode)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="end the run after this many seconds (finished rows kept, error rows for the rest; exit 124)")
    p.add_argument("--resume", action="store_true",
                   help="keep the complete rows of an existing --out and serve only the other requests")
    p.add_argument("-v", "--verbose", action="store_true")


def is_rank_process(n_devices: int) -> bool:
    """Whether this process is one device of the run (else it launches them)."""
    if os.environ.get("ADAPTLINK_LAUNCHER"):
        return True
    world = os.environ.get("WORLD_SIZE")
    # torchrun with one process per device; a 1-device plan under torchrun runs in place.
    return world is not None and int(world) == n_devices and (n_devices > 1 or "TORCHELASTIC_RUN_ID" in os.environ)


def preflight(plan, plan_path: str, *, local_ranks=()) -> str:
    """Refuse, before any device process starts, a plan or checkpoint that cannot run
    (adaptlink.preflight: blocks, memory, checkpoint, and the devices of `local_ranks` on
    this host); returns the plan hash the ranks are told to expect."""
    from adaptlink.preflight import check_run

    return check_run(plan, plan_path, local_ranks=local_ranks)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("ADAPTLINK_LAUNCHER"):  # first, before the imports: Ctrl-C reaches every
        # process of the terminal, and the launcher forwards it to the coordinator itself
        coordinator = os.environ.get("RANK") == os.environ.get("ADAPTLINK_COORDINATOR")
        signal.signal(signal.SIGINT, _exit_on_signal if coordinator else signal.SIG_IGN)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"[rank {os.environ.get('RANK', '-')}] %(levelname)s %(name)s: %(message)s")
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    except AdaptLinkError as e:
        print(f"adaptlink.launch: error: {e}", file=sys.stderr)
        return 2


def batch_limits(args) -> BatchLimits:
    """The micro-batch options, refused naming the flag when out of range."""
    for flag, value, least in (("--max-batch-rows", args.max_batch_rows, 1),
                               ("--max-batch-tokens", args.max_batch_tokens, 1),
                               ("--micro-batches", args.micro_batches, 0)):
        if value < least:
            raise AdaptLinkError(f"{flag}: must be >= {least}, got {value}")
    return BatchLimits(args.max_batch_rows, args.max_batch_tokens, args.micro_batches)


def run(args, argv: list[str]) -> int:
    from partitioner.types import load_plan

    batch = batch_limits(args)
    plan = load_plan(args.plan)
    n = len(plan.devices)
    if is_rank_process(n):
        from runtime.engine import ServeOptions, serve
        from runtime.launcher import KillSpec, init_rank, self_inject

        # Under the launcher it checked the plan and --inject, and it sends the injections;
        # under torchrun every rank checks, and a rank due for an injection sends it itself.
        torchrun = not os.environ.get("ADAPTLINK_LAUNCHER")
        if torchrun and os.environ.get("RANK") == str(plan.coordinator):
            check_outputs(args, log_dir=False)
        inject = _parse_inject(args.inject, plan, torchrun=True) if torchrun else [KillSpec.parse(s) for s in args.inject]
        if torchrun:
            preflight(plan, args.plan)
        from adaptlink.preflight import PLAN_HASH_ENV, check_rank

        check_rank(plan, int(os.environ.get("RANK", "0")), args.plan, os.environ.get(PLAN_HASH_ENV))
        ctx = init_rank(secret_file=args.secret_file, bind_host=_device_host(plan) if torchrun else None)
        if torchrun:
            if plan.coordinator != 0 and ctx.rank == plan.coordinator:
                log.warning("under torchrun the store lives with rank 0's agent, not with the coordinator "
                            "(rank %d): the loss of rank 0 ends the run too", plan.coordinator)
            self_inject(ctx, inject)  # this rank's own specs
        opts = ServeOptions(prompts=args.prompts, out=args.out, metrics=args.metrics,
                            in_flight=args.in_flight, max_new_tokens=args.max_new_tokens, plan_path=args.plan,
                            batch=batch,
                            recovery=args.recovery, cold_from_disk=args.cold_from_disk, replay=args.replay,
                            resume=args.resume, count_tokens=any(k.after_tokens is not None for k in inject),
                            cold_read_bytes_per_s=args.cold_read_mbps * 1e6 if args.cold_read_mbps else None)
        try:
            return serve(plan, ctx, opts)
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # a peer already gone; nothing left to tear down cleanly
                    pass
    return launch(plan, args, argv)


def _exit_on_signal(signum, frame) -> None:
    """The coordinator before it serves (loading): Ctrl-C ends it at once, with no traceback;
    once serving, the engine's own handler ends the requests with error rows instead."""
    raise SystemExit(128 + signum)


def launch(plan, args, argv: list[str]) -> int:
    """Launcher mode: check the plan and the outputs, then start one process per device on
    this machine; once they end, make sure out.jsonl has a row for every request and the
    metrics file exists, whatever became of the coordinator."""
    from runtime.launcher import Launcher

    if not args.prompts:
        raise AdaptLinkError("--prompts: required (the requests to serve)")
    if not os.path.isfile(args.prompts):
        raise AdaptLinkError(f"--prompts: no such file {args.prompts!r}")
    from adaptlink.preflight import PLAN_HASH_ENV

    inject = _parse_inject(args.inject, plan)
    plan_hash = preflight(plan, args.plan, local_ranks=range(len(plan.devices)))
    check_outputs(args)
    from runtime.auth import RunSecret, SecretError

    try:  # one secret per run, unless the user gave one (the ranks read the same file)
        secret = RunSecret.from_file(args.secret_file) if args.secret_file else None
    except SecretError as e:
        raise AdaptLinkError(f"--secret-file: {e}") from None
    _begin_outputs(args)
    cmd = [sys.executable, "-m", "adaptlink.launch", *[a for a in argv]]
    launcher = Launcher(cmd, len(plan.devices), threads=[s.threads for s in plan.devices],
                        env={PLAN_HASH_ENV: plan_hash}, inject=inject, coordinator=plan.coordinator,
                        timeout_s=args.timeout, log_dir=args.log_dir,
                        secret=secret)  # one machine: the store on 127.0.0.1
    previous = {sig: signal.signal(sig, lambda signum, frame: launcher.cancel(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        result = launcher.wait()
    except BaseException:
        launcher.close()  # an error here: take the ranks down with us
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _end_outputs(args, plan, result)


# ---- outputs: refused before any device starts, completed after the ranks end ----------------

def check_outputs(args, *, log_dir: bool = True) -> None:
    """Refuse, before any device starts, an --out / --metrics / --log-dir that cannot be
    written (no such directory, not a directory, read-only, a full disk), naming the flag;
    with --resume, an existing --out that is not an out.jsonl."""
    from runtime.requests import read_rows

    for flag, path in (("--out", args.out), ("--metrics", args.metrics)):
        if path:
            _check_writable(flag, Path(path), is_dir=False)
    if log_dir and getattr(args, "log_dir", None):
        _check_writable("--log-dir", Path(args.log_dir), is_dir=True)
    if args.resume:
        if not args.out:
            raise AdaptLinkError("--resume: needs --out (the out.jsonl to resume)")
        if os.path.exists(args.out):
            read_rows(args.out)  # one line naming the file and line if it is not one


def _check_writable(flag: str, path: Path, *, is_dir: bool) -> None:
    if path.exists():
        if path.is_dir() != is_dir:
            raise AdaptLinkError(f"{flag} {path}: " + ("not a directory" if is_dir else "is a directory"))
        if not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
            raise AdaptLinkError(f"{flag} {path}: not writable ({_why_not(path)})")
        where = path if is_dir else path.parent
    else:
        where = path.parent
    if not where.is_dir():
        raise AdaptLinkError(f"{flag} {path}: directory {str(where)!r} does not exist"
                             + (" (or is not a directory)" if where.exists() else ""))
    # the file is written beside itself under a temporary name, then renamed: the directory too
    if not os.access(where, os.W_OK | os.X_OK):
        raise AdaptLinkError(f"{flag} {path}: directory {str(where)!r} is not writable ({_why_not(where)})")
    st = os.statvfs(where)
    if st.f_bavail == 0:
        raise AdaptLinkError(f"{flag} {path}: no space left on the device of {str(where)!r}")


def _why_not(path: Path) -> str:
    return "a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"


def _begin_outputs(args) -> None:
    """A stale out.jsonl or metrics file from an earlier run must not look like this run's:
    out.jsonl starts empty (kept with --resume), the metrics file is removed."""
    from runtime.requests import write_rows_atomically

    if args.out and not args.resume:
        write_rows_atomically(args.out, [])
    if args.metrics and os.path.exists(args.metrics):
        os.unlink(args.metrics)


def _end_outputs(args, plan, result) -> int:
    """After the ranks: complete out.jsonl (an error row for every request without a row)
    and write the metrics if the coordinator wrote none; the exit code of the run."""
    from runtime.engine import EXIT_FATAL, EXIT_TIMEOUT
    from runtime.requests import OutputError, complete_output

    coord = {e.rank: e for e in result.exits}.get(plan.coordinator)
    if result.cancelled is not None:
        code = 128 + result.cancelled
        how = f"cancelled: {signal.Signals(result.cancelled).name}"
    elif result.timed_out:
        code = EXIT_TIMEOUT
        how = f"cancelled: the run exceeded its --timeout ({args.timeout:g} s)"
    else:
        code = result.returncode
        how = None
    if coord is not None and (coord.returncode < 0 or how is None):
        died = (f"killed by {coord.signal_name}" if coord.returncode < 0
                else f"exited with code {coord.returncode}")
        how = how or f"not finished: the coordinator (rank {plan.coordinator}) {died} after {coord.at_s:.1f} s"
    how = how or f"not finished: the coordinator (rank {plan.coordinator}) did not start"
    added = []
    try:
        if args.out:
            added = complete_output(args.out, args.prompts, how)
            if added:
                log.error("%s: %d requests unfinished, given error rows", args.out, len(added))
                if code == 0:
                    code = EXIT_FATAL
        if args.metrics and not os.path.exists(args.metrics):
            _write_launcher_metrics(args, plan, result, how, added)
            if code == 0:
                code = EXIT_FATAL
    except (OutputError, OSError) as e:  # a full or read-only disk (what is there stays whole), prompts gone
        print(f"adaptlink: error: {e}", file=sys.stderr)
        return code or EXIT_FATAL
    if code != 0 and (coord is None or coord.returncode < 0) and args.out:
        print(f"adaptlink: error: {how}; {len(added)} unfinished requests have error rows in {args.out}",
              file=sys.stderr)
    return code


def _write_launcher_metrics(args, plan, result, how: str, added: list[str]) -> None:
    """The coordinator wrote no metrics (it died, or never started): say what happened."""
    from runtime.engine import write_metrics
    from runtime.requests import read_rows

    rows = read_rows(args.out) if args.out and os.path.exists(args.out) else []
    ok = [r for r in rows if "error" not in r]
    write_metrics(args.metrics, {
        "plan": args.plan, "plan_hash": plan.plan_hash(), "written_by": "launcher",
        "fatal": how, "requests": len(rows), "completed": len(ok), "failed": len(rows) - len(ok),
        "unfinished": added, "timed_out": result.timed_out,
        "signal": signal.Signals(result.cancelled).name if result.cancelled else None,
        "exits": [{"rank": e.rank, "returncode": e.returncode, "signal": e.signal_name, "cause": e.cause,
                   "at_s": round(e.at_s, 3)} for e in sorted(result.exits, key=lambda e: e.rank)]})


def _device_host(plan) -> str | None:
    """Under torchrun: the plan's address for this rank's device, where its gloo listens
    (None, with a warning, when this machine has no such address: gloo's default then)."""
    from runtime.launcher import interface_of

    try:
        host = plan.device(int(os.environ["RANK"])).host
    except (KeyError, ValueError, IndexError):
        return None
    if interface_of(host) is None:
        log.warning("devices[%s].host %s is not an address of this machine: gloo listens on its default "
                    "address (set GLOO_SOCKET_IFNAME to choose)", os.environ.get("RANK"), host)
        return None
    return host


def _parse_inject(specs: list[str], plan, *, torchrun: bool = False) -> list:
    import signal

    from runtime.launcher import KillSpec

    try:
        inject = [KillSpec.parse(s) for s in specs]
    except ValueError as e:
        raise AdaptLinkError(f"--inject: {e}") from None
    for k in inject:
        if not 0 <= k.rank < len(plan.devices):
            raise AdaptLinkError(f"--inject: rank {k.rank} is not a rank of the plan (0..{len(plan.devices) - 1})")
        if torchrun and k.signal != signal.SIGKILL:
            raise AdaptLinkError("--inject stop: needs the one-machine launcher (`adaptlink run`), "
                                 "which SIGKILLs a fenced rank; under torchrun use kill:")
        if k.rank == plan.coordinator:
            log.warning("--inject kills the coordinator (rank %d): that ends the run by design", k.rank)
    return inject


if __name__ == "__main__":
    sys.exit(main())
