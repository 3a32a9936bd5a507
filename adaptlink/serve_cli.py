"""`adaptlink serve --plan plan.json [--port 8000]`: an OpenAI-compatible chat server on this machine.

It starts one process per device of the plan (the launcher of `adaptlink run`, so a device
that dies is survived); the coordinator's process serves HTTP (runtime/serving.py,
runtime/http_api.py). Several machines: `torchrun ... -m adaptlink.launch --plan plan.json
--serve --port 8000` on each (see `python -m adaptlink.launch --help`).
"""

from __future__ import annotations

import dataclasses

from adaptlink.launch import serve_launch
from adaptlink.options import RunOptions, add_run_arguments
from partitioner.types import load_plan


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI chat API on a plan: /v1/chat/completions, "
                                     "/v1/models, /health, /metrics")
    add_run_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    opts = dataclasses.replace(RunOptions.from_args(args), serve=True)
    opts.check()
    return serve_launch(load_plan(opts.plan), opts)
