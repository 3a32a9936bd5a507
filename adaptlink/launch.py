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
    p.add_argument("--secret-file", metavar="F",
                   help="the run secret (hex, a file of mode 600; the same file on every device). "
                        "Required under torchrun across machines (or $ADAPTLINK_SECRET); `adaptlink run` "
                        "generates one per run when not given. See README, Security model")
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


def preflight(plan, plan_path: str) -> None:
    """Refuse, before anything loads, a plan whose devices cannot hold their blocks."""
    from adaptlink.graph import build_graph
    from partitioner.errors import PlanError
    from runtime.engine import loaded_blocks

    graphs = {}
    over = []
    for s in plan.devices:
        if s.dtype not in graphs:
            graphs[s.dtype] = build_graph(plan.model["source"], dtype=s.dtype)
        G = graphs[s.dtype]
        unknown = [b for b in loaded_blocks(plan, s.rank) if b not in G]
        if unknown:
            raise PlanError(f"{plan_path}: devices[{s.rank}].blocks: {unknown[:3]} are not blocks of "
                            f"{plan.model['source']}")
        need = sum(G.nodes[b]["param_bytes"] for b in loaded_blocks(plan, s.rank))
        cap = s.memory_bytes
        emu_cap = (s.emulation or {}).get("memory_cap_bytes")
        if emu_cap:
            cap = min(cap, int(emu_cap))
        if need > cap:
            over.append(f"devices[{s.rank}] ({s.name}) needs {need:,} bytes of weights "
                        f"(own + backups), has {cap:,} ({need - cap:,} over)")
    if over:
        raise PlanError(f"{plan_path}: a device cannot hold its blocks: " + "; ".join(over))


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
        ctx = init_rank(secret_file=args.secret_file, bind_host=_device_host(plan) if torchrun else None)
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
    inject = _parse_inject(args.inject, plan)
    preflight(plan, args.plan)
    from runtime.auth import RunSecret, SecretError

    try:  # one secret per run, unless the user gave one (the ranks read the same file)
        secret = RunSecret.from_file(args.secret_file) if args.secret_file else None
    except SecretError as e:
        raise AdaptLinkError(f"--secret-file: {e}") from None
    cmd = [sys.executable, "-m", "adaptlink.launch", *[a for a in argv]]
    result = launch_local(cmd, len(plan.devices), threads=[s.threads for s in plan.devices],
                          inject=inject, coordinator=plan.coordinator, timeout_s=args.timeout,
                          log_dir=args.log_dir, secret=secret)  # one machine: the store on 127.0.0.1
    return result.returncode


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
