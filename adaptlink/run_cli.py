"""`adaptlink run --plan plan.json --prompts prompts.jsonl --out out.jsonl`: a whole run on this machine.

It starts one process per device of the plan (the launcher of `adaptlink.launch`), so a
device that dies is survived; see `python -m adaptlink.launch --help` for torchrun forms.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from adaptlink.launch import add_run_arguments

    p = sub.add_parser("run", help="run a plan on this machine: one process per device, pipelined")
    add_run_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from adaptlink.launch import launch
    from partitioner.types import load_plan

    argv = ["--plan", args.plan]
    for flag in ("prompts", "out", "metrics", "in_flight", "log_dir", "secret_file"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    argv += ["--max-new-tokens", str(args.max_new_tokens), "--timeout", str(args.timeout),
             "--recovery", args.recovery, "--replay", args.replay]
    for spec in args.inject:
        argv += ["--inject", spec]
    if args.cold_read_mbps:
        argv += ["--cold-read-mbps", str(args.cold_read_mbps)]
    if args.cold_from_disk:
        argv.append("--cold-from-disk")
    if args.resume:
        argv.append("--resume")
    if args.verbose:
        argv.append("-v")
    return launch(load_plan(args.plan), args, argv)
