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

Serving (`adaptlink serve`, runtime/serving.py): `--serve [--host H] [--port N]` makes the
coordinator's rank run the OpenAI-compatible HTTP server instead of reading --prompts:

    adaptlink serve --plan plan.json --port 8000
    torchrun --nnodes N --node-rank i ... -m adaptlink.launch --plan plan.json --serve --port 8000

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
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from adaptlink.options import RunOptions, add_run_arguments
from partitioner.errors import AdaptLinkError
from partitioner.types import load_plan
from runtime.auth import RunSecret, SecretError
from runtime.roles import Role, process_role

# The modules that import torch (runtime.engine, .launcher, .requests; adaptlink.preflight)
# are imported inside the functions that need them, not here, for a start-up reason: a
# device process must set its Ctrl-C disposition in main() before the ~2 s torch takes to
# import, since a Ctrl-C of the terminal reaches every rank at once (test_results.py,
# test_ctrl_c_of_the_terminal_while_loading_ends_at_once_with_every_row). What is imported
# here is torch-free, so `adaptlink --help` (through run_cli) does not load torch either.

log = logging.getLogger("adaptlink.launch")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptlink.launch", description=__doc__.splitlines()[0])
    add_run_arguments(p)
    return p


def preflight(plan, plan_path: str, *, local_ranks=()) -> str:
    """Refuse, before any device process starts, a plan or checkpoint that cannot run
    (adaptlink.preflight: blocks, memory, checkpoint, and the devices of `local_ranks` on
    this host); returns the plan hash the ranks are told to expect."""
    from adaptlink.preflight import check_run

    return check_run(plan, plan_path, local_ranks=local_ranks)


def main(argv: list[str] | None = None) -> int:
    role = process_role()
    if role.under_launcher:  # first, before the imports: Ctrl-C reaches every
        # process of the terminal, and the launcher forwards it to the coordinator itself
        signal.signal(signal.SIGINT, _exit_on_signal if role.is_launcher_coordinator else signal.SIG_IGN)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"[rank {'-' if role.rank is None else role.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        return run(RunOptions.from_args(args))
    except AdaptLinkError as e:
        print(f"adaptlink.launch: error: {e}", file=sys.stderr)
        return 2


def run(opts: RunOptions) -> int:
    opts.check()
    plan = load_plan(opts.plan)
    role = process_role()
    if not role.is_rank(len(plan.devices)):
        return launch(plan, opts)
    return _run_rank(plan, opts, role)


def _run_rank(plan, opts: RunOptions, role: Role) -> int:
    """One device of the run: join, load, serve (runtime.engine)."""
    # torch: after main() set Ctrl-C (the note at the top)
    import torch.distributed as dist

    from adaptlink.preflight import PLAN_HASH_ENV, check_rank
    from runtime.engine import ServeOptions, serve
    from runtime.launcher import KillSpec, init_rank, self_inject
    from runtime.scheduler import BatchLimits
    from runtime.serving import HttpOptions, read_api_key

    # Under the launcher it checked the plan and --inject, and it sends the injections;
    # under torchrun every rank checks, and a rank due for an injection sends it itself.
    torchrun = not role.under_launcher
    if torchrun and role.is_coordinator(plan.coordinator):
        check_outputs(opts, log_dir=False)
    inject = _parse_inject(opts.inject, plan, torchrun=True) if torchrun else [KillSpec.parse(s) for s in opts.inject]
    if torchrun:
        preflight(plan, opts.plan)
    check_rank(plan, role.rank_index, opts.plan, os.environ.get(PLAN_HASH_ENV))
    ctx = init_rank(secret_file=opts.secret_file, bind_host=_device_host(plan, role) if torchrun else None)
    if torchrun:
        if plan.coordinator != 0 and ctx.rank == plan.coordinator:
            log.warning("under torchrun the store lives with rank 0's agent, not with the coordinator "
                        "(rank %d): the loss of rank 0 ends the run too", plan.coordinator)
        self_inject(ctx, inject)  # this rank's own specs
    serve_opts = ServeOptions(prompts=opts.prompts, out=opts.out, metrics=opts.metrics,
                              in_flight=opts.in_flight, max_new_tokens=opts.max_new_tokens, plan_path=opts.plan,
                              batch=BatchLimits.for_plan(plan.workload, opts.max_batch_rows, opts.max_batch_tokens,
                                                         opts.micro_batches),
                              recovery=opts.recovery, cold_from_disk=opts.cold_from_disk, replay=opts.replay,
                              resume=opts.resume, count_tokens=any(k.after_tokens is not None for k in inject),
                              cold_read_bytes_per_s=opts.cold_read_bytes_per_s,
                              http=HttpOptions(host=opts.host, port=opts.port, model_name=served_model_name(plan, opts),
                                               api_key=read_api_key(opts.api_key, opts.api_key_file),
                                               max_waiting=opts.max_waiting, remote_images=opts.allow_remote_images,
                                               media_dir=opts.media_dir) if opts.serve else None)
    try:
        return serve(plan, ctx, serve_opts)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a peer already gone; nothing left to tear down cleanly
                pass


def _exit_on_signal(signum, frame) -> None:
    """The coordinator before it serves (loading): Ctrl-C ends it at once, with no traceback;
    once serving, the engine's own handler ends the requests with error rows instead."""
    raise SystemExit(128 + signum)


def served_model_name(plan, opts: RunOptions) -> str:
    """--served-model-name, else the checkpoint directory's name."""
    return opts.served_model_name or Path(str(plan.model["source"]).rstrip("/")).name or "adaptlink"


def serve_launch(plan, opts: RunOptions) -> int:
    """`adaptlink serve` on one machine: the launcher of `adaptlink run` (a device's death is
    survived), the coordinator's process serving HTTP until Ctrl-C / SIGTERM (exit 0 once
    drained) or a block with no live copy left (exit 3)."""
    from adaptlink.preflight import PLAN_HASH_ENV  # torch: after main() set Ctrl-C (the note at the top)
    from runtime.launcher import Launcher
    from adaptlink.model.config import PRESET_PREFIX
    from runtime.serving import API_KEY_ENV, bind, read_api_key

    if opts.prompts or opts.out or opts.resume:
        raise AdaptLinkError("--prompts / --out / --resume: not with serve (requests come over HTTP)")
    if str(plan.model["source"]).startswith(PRESET_PREFIX):
        raise AdaptLinkError(f"{opts.plan}: model.source {plan.model['source']}: a preset has no tokenizer or "
                             f"chat template to serve; plan a checkpoint directory")
    inject = _parse_inject(opts.inject, plan)
    plan_hash = preflight(plan, opts.plan, local_ranks=range(len(plan.devices)))
    check_outputs(opts)
    api_key = read_api_key(opts.api_key, opts.api_key_file)
    if opts.media_dir and not os.path.isdir(opts.media_dir):
        raise AdaptLinkError(f"--media-dir {opts.media_dir}: not a directory")
    opts = dataclasses.replace(opts, media_dir=os.path.abspath(opts.media_dir) if opts.media_dir else None)
    bind(opts.host, opts.port).close()  # a port in use is refused now, not after loading
    try:
        secret = RunSecret.from_file(opts.secret_file) if opts.secret_file else None
    except SecretError as e:
        raise AdaptLinkError(f"--secret-file: {e}") from None
    if opts.metrics and os.path.exists(opts.metrics):
        os.unlink(opts.metrics)
    rank_opts = dataclasses.replace(opts, serve=True, api_key=None, api_key_file=None)  # the key: in the env
    cmd = [sys.executable, "-m", "adaptlink.launch", *rank_opts.to_argv()]
    env = {PLAN_HASH_ENV: plan_hash, **({API_KEY_ENV: api_key} if api_key else {})}
    launcher = Launcher(cmd, len(plan.devices), threads=[s.threads for s in plan.devices], env=env,
                        inject=inject, coordinator=plan.coordinator, timeout_s=None, log_dir=opts.log_dir,
                        secret=secret)
    previous = {sig: signal.signal(sig, lambda signum, frame: launcher.cancel(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        result = launcher.wait()
    except BaseException:
        launcher.close()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rc = result.returncodes.get(plan.coordinator, 1)
    return rc if rc >= 0 else 1


def launch(plan, opts: RunOptions) -> int:
    """Launcher mode: check the plan and the outputs, then start one process per device on
    this machine; once they end, make sure out.jsonl has a row for every request and the
    metrics file exists, whatever became of the coordinator."""
    from adaptlink.preflight import PLAN_HASH_ENV  # torch: after main() set Ctrl-C (the note at the top)
    from runtime.launcher import Launcher

    if opts.serve:
        return serve_launch(plan, opts)
    if not opts.prompts:
        raise AdaptLinkError("--prompts: required (the requests to serve)")
    if not os.path.isfile(opts.prompts):
        raise AdaptLinkError(f"--prompts: no such file {opts.prompts!r}")
    inject = _parse_inject(opts.inject, plan)
    plan_hash = preflight(plan, opts.plan, local_ranks=range(len(plan.devices)))
    check_outputs(opts)
    try:  # one secret per run, unless the user gave one (the ranks read the same file)
        secret = RunSecret.from_file(opts.secret_file) if opts.secret_file else None
    except SecretError as e:
        raise AdaptLinkError(f"--secret-file: {e}") from None
    _begin_outputs(opts)
    cmd = [sys.executable, "-m", "adaptlink.launch", *opts.to_argv()]
    launcher = Launcher(cmd, len(plan.devices), threads=[s.threads for s in plan.devices],
                        env={PLAN_HASH_ENV: plan_hash}, inject=inject, coordinator=plan.coordinator,
                        timeout_s=opts.timeout, log_dir=opts.log_dir,
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
    return _end_outputs(opts, plan, result)


# ---- outputs: refused before any device starts, completed after the ranks end ----------------

def check_outputs(opts: RunOptions, *, log_dir: bool = True) -> None:
    """Refuse, before any device starts, an --out / --metrics / --log-dir that cannot be
    written (no such directory, not a directory, read-only, a full disk), naming the flag;
    with --resume, an existing --out that is not an out.jsonl."""
    from runtime.requests import read_rows  # torch: after main() set Ctrl-C (the note at the top)

    for flag, path in (("--out", opts.out), ("--metrics", opts.metrics)):
        if path:
            _check_writable(flag, Path(path), is_dir=False)
    if log_dir and opts.log_dir:
        _check_writable("--log-dir", Path(opts.log_dir), is_dir=True)
    if opts.resume:
        if not opts.out:
            raise AdaptLinkError("--resume: needs --out (the out.jsonl to resume)")
        if os.path.exists(opts.out):
            read_rows(opts.out)  # one line naming the file and line if it is not one


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


def _begin_outputs(opts: RunOptions) -> None:
    """A stale out.jsonl or metrics file from an earlier run must not look like this run's:
    out.jsonl starts empty (kept with --resume), the metrics file is removed."""
    from runtime.requests import write_rows_atomically  # torch: the note at the top

    if opts.out and not opts.resume:
        write_rows_atomically(opts.out, [])
    if opts.metrics and os.path.exists(opts.metrics):
        os.unlink(opts.metrics)


def _end_outputs(opts: RunOptions, plan, result) -> int:
    """After the ranks: complete out.jsonl (an error row for every request without a row)
    and write the metrics if the coordinator wrote none; the exit code of the run."""
    from runtime.engine import EXIT_FATAL, EXIT_TIMEOUT  # torch: the note at the top
    from runtime.requests import OutputError, complete_output

    coord = {e.rank: e for e in result.exits}.get(plan.coordinator)
    if result.cancelled is not None:
        code = 128 + result.cancelled
        how = f"cancelled: {signal.Signals(result.cancelled).name}"
    elif result.timed_out:
        code = EXIT_TIMEOUT
        how = f"cancelled: the run exceeded its --timeout ({opts.timeout:g} s)"
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
        if opts.out:
            added = complete_output(opts.out, opts.prompts, how)
            if added:
                log.error("%s: %d requests unfinished, given error rows", opts.out, len(added))
                if code == 0:
                    code = EXIT_FATAL
        if opts.metrics and not os.path.exists(opts.metrics):
            _write_launcher_metrics(opts, plan, result, how, added)
            if code == 0:
                code = EXIT_FATAL
    except (OutputError, OSError) as e:  # a full or read-only disk (what is there stays whole), prompts gone
        print(f"adaptlink: error: {e}", file=sys.stderr)
        return code or EXIT_FATAL
    if code != 0 and (coord is None or coord.returncode < 0) and opts.out:
        print(f"adaptlink: error: {how}; {len(added)} unfinished requests have error rows in {opts.out}",
              file=sys.stderr)
    return code


def _write_launcher_metrics(opts: RunOptions, plan, result, how: str, added: list[str]) -> None:
    """The coordinator wrote no metrics (it died, or never started): say what happened."""
    from runtime.engine import write_metrics  # torch: the note at the top
    from runtime.requests import read_rows

    rows = read_rows(opts.out) if opts.out and os.path.exists(opts.out) else []
    ok = [r for r in rows if "error" not in r]
    write_metrics(opts.metrics, {
        "plan": opts.plan, "plan_hash": plan.plan_hash(), "written_by": "launcher",
        "fatal": how, "requests": len(rows), "completed": len(ok), "failed": len(rows) - len(ok),
        "unfinished": added, "timed_out": result.timed_out,
        "signal": signal.Signals(result.cancelled).name if result.cancelled else None,
        "exits": [{"rank": e.rank, "returncode": e.returncode, "signal": e.signal_name, "cause": e.cause,
                   "at_s": round(e.at_s, 3)} for e in sorted(result.exits, key=lambda e: e.rank)]})


def _device_host(plan, role: Role) -> str | None:
    """Under torchrun: the plan's address for this rank's device, where its gloo listens
    (None, with a warning, when this machine has no such address: gloo's default then)."""
    from runtime.launcher import interface_of  # torch: the note at the top

    try:
        host = plan.device(int(role.rank)).host
    except (KeyError, TypeError, ValueError, IndexError):  # TypeError: no RANK
        return None
    if interface_of(host) is None:
        log.warning("devices[%s].host %s is not an address of this machine: gloo listens on its default "
                    "address (set GLOO_SOCKET_IFNAME to choose)", role.rank, host)
        return None
    return host


def _parse_inject(specs: list[str], plan, *, torchrun: bool = False) -> list:
    from runtime.launcher import KillSpec  # torch: the note at the top

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
