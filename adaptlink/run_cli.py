"""`adaptlink run --plan plan.json --prompts prompts.jsonl --out out.jsonl`: a whole run on this machine.

It starts one process per device of the plan (the launcher of `adaptlink.launch`), so a
device that dies is survived; see `python -m adaptlink.launch --help` for torchrun forms.
"""

from __future__ import annotations

from adaptlink.launch import launch
from adaptlink.options import RunOptions, add_run_arguments
from partitioner.types import load_plan


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a plan on this machine: one process per device, pipelined")
    add_run_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    opts = RunOptions.from_args(args)
    return launch(load_plan(opts.plan), opts)
