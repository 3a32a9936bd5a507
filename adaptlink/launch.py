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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from adaptlink.errors import AdaptLinkError

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
    p.add_argument("--log-dir", help="each rank's output to LOG_DIR/rank<r>.log (launcher mode)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
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
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"[rank {os.environ.get('RANK', '-')}] %(levelname)s %(name)s: %(message)s")
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    except AdaptLinkError as e:
        print(f"adaptlink.launch: error: {e}", file=sys.stderr)
        return 2


def run(args, argv: list[str]) -> int:
    from partitioner.types import load_plan

    plan = load_plan(args.plan)
    n = len(plan.devices)
    if is_rank_process(n):
        from runtime.engine import ServeOptions, serve
        from runtime.launcher import KillSpec, init_rank, self_inject

        # Under the launcher it checked the plan and --inject, and it sends the injections;
        # under torchrun every rank checks, and a rank due for an injection sends it itself.
        torchrun = not os.environ.get("ADAPTLINK_LAUNCHER")
        inject = _parse_inject(args.inject, plan, torchrun=True) if torchrun else [KillSpec.parse(s) for s in args.inject]
        if torchrun:
            preflight(plan, args.plan)
        from adaptlink.preflight import PLAN_HASH_ENV, check_rank

        check_rank(plan, int(os.environ.get("RANK", "0")), args.plan, os.environ.get(PLAN_HASH_ENV))
        ctx = init_rank()
        if torchrun:
            if plan.coordinator != 0 and ctx.rank == plan.coordinator:
                log.warning("under torchrun the store lives with rank 0's agent, not with the coordinator "
                            "(rank %d): the loss of rank 0 ends the run too", plan.coordinator)
            self_inject(ctx, inject)  # this rank's own specs
        opts = ServeOptions(prompts=args.prompts, out=args.out, metrics=args.metrics,
                            in_flight=args.in_flight, max_new_tokens=args.max_new_tokens, plan_path=args.plan,
                            recovery=args.recovery, cold_from_disk=args.cold_from_disk, replay=args.replay,
                            count_tokens=any(k.after_tokens is not None for k in inject),
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


def launch(plan, args, argv: list[str]) -> int:
    """Launcher mode: check the plan, then start one process per device on this machine."""
    from runtime.launcher import launch_local

    if not args.prompts:
        raise AdaptLinkError("--prompts: required (the requests to serve)")
    if not os.path.isfile(args.prompts):
        raise AdaptLinkError(f"--prompts: no such file {args.prompts!r}")
    from adaptlink.preflight import PLAN_HASH_ENV

    inject = _parse_inject(args.inject, plan)
    plan_hash = preflight(plan, args.plan, local_ranks=range(len(plan.devices)))
    cmd = [sys.executable, "-m", "adaptlink.launch", *[a for a in argv]]
    result = launch_local(cmd, len(plan.devices), threads=[s.threads for s in plan.devices],
                          env={PLAN_HASH_ENV: plan_hash}, inject=inject, coordinator=plan.coordinator,
                          timeout_s=args.timeout, log_dir=args.log_dir)
    return result.returncode


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
