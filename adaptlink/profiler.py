"""`adaptlink profile`: measure each device's compute and memory and each link into cluster.json.

One process (rank) per device. Every rank measures itself; rank 0 gathers the results over
the run's c10d store and writes cluster.json (docs/DESIGN.md, `schema: adaptlink.cluster/1`).

    # this machine alone, one process, no torch.distributed:
    adaptlink profile --model preset:llava-1.5-7b --out cluster.json
    # N local ranks started here (runtime.launcher), with emulation knobs, one value per rank:
    adaptlink profile --model preset:llava-1.5-7b --local 2 --slowdown 1,2 \\
        --memory-cap none,8GiB --link-bandwidth 100Mbit --out cluster.json
    # several machines, one device each: on machine i of N (machine 0 at HOST0)
    torchrun --nnodes N --node-rank i --nproc-per-node 1 --max-restarts 0 \\
        --master-addr HOST0 --master-port 29500 -m adaptlink.cli profile --model SRC --out cluster.json
    # check a hand-written (e.g. datasheet) cluster.json, or add its devices to a profile:
    adaptlink profile --check jetson.json
    adaptlink profile --model SRC --local 2 --merge jetson.json --out cluster.json

What is measured, and how (each in its own module):
- compute and memory: `adaptlink.model.measure` (one representative block of each kind at the
  model's real size with random weights, layer kinds run back to back over distinct copies;
  free memory minus a reserve, split among the ranks sharing a device);
- links: `runtime.profiling` with the link probe of `runtime.probe` (every ordered pair, a
  least-squares fit of round trip = intercept + size / bandwidth);
- the ranks, the store board and the turn-taking of ranks on one host: `runtime.profiling`;
- the command's work (options to the ranks, local launch, cluster.json, the summary):
  `adaptlink.profile`.

Emulation (one machine standing in for a heterogeneous cluster) is labelled in the output:
`emulation: {"slowdown", "memory_cap_bytes"}` on a device, `emulated: true` on a link.
Under a slowdown `prefill_s`/`decode_s` stay the device's own times, which the planner
multiplies by `slowdown`, and `emulated_prefill_s`/`emulated_decode_s` are the padded times observed.

This module only registers the command: `adaptlink.cli` imports every command module to build
its parser, and importing torch (which `adaptlink.profile` does) costs about a second, so the
work is imported when the command runs. `python -m adaptlink.profiler` is a `--local` rank.
"""

from __future__ import annotations

import importlib
import sys

from partitioner.vocab import BLOCK_KINDS, PROFILE_ROWS

# Names that lived here before the split, for their importers (tests, experiments): module.
_MOVED = {
    "ProfileError": "adaptlink.model.measure", "REPRESENTATIVE": "adaptlink.model.measure",
    "measure_compute": "adaptlink.model.measure", "usable_memory": "adaptlink.model.measure",
    "predict_request_s": "adaptlink.model.measure", "warm_up": "adaptlink.model.measure",
    "ProfileOptions": "runtime.profiling", "RankSetup": "runtime.profiling", "fit_probe": "runtime.profiling",
    "profile_rank": "runtime.profiling", "cluster_dict": "adaptlink.profile",
    "summary_tables": "adaptlink.profile",
}


def __getattr__(name: str):
    """`from adaptlink.profiler import measure_compute` etc. still work, importing torch only then."""
    if name == "KINDS":
        return BLOCK_KINDS
    if name == "_layer_copies":
        return importlib.import_module("adaptlink.model.measure").layer_copies
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- command line


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure devices and links into cluster.json",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", help="preset:NAME or a LLaVA checkpoint directory")
    p.add_argument("--out", default="cluster.json", help="where rank 0 writes cluster.json")
    p.add_argument("--check", metavar="FILE", help="only validate FILE (e.g. hand-written) and show it")
    p.add_argument("--merge", metavar="FILE", help="add FILE's devices and links to the profile")
    p.add_argument("--local", type=int, metavar="N", help="start N local ranks (runtime.launcher)")
    p.add_argument("--names", help="device names, one per rank (default cpu<rank>/gpu<rank>)")
    p.add_argument("--cluster-name", help="cluster name (default: the --out file's stem)")
    p.add_argument("--device", help="torch device per rank (default cuda:<local rank> if CUDA, else cpu)")
    p.add_argument("--threads", help="torch threads per rank, e.g. 1,2 (--local default: cores / N)")
    p.add_argument("--slowdown", default="1", help="EMULATION: compute slowdown per rank, e.g. 1,2")
    p.add_argument("--memory-cap", default="none", help="EMULATION: memory cap per rank, e.g. none,2GiB")
    p.add_argument("--link-bandwidth", help="EMULATION: e.g. 100Mbit (every pair) or 0-1=100Mbit,1-0=1Gbit")
    p.add_argument("--link-latency", help="EMULATION: e.g. 2ms (every pair) or 0-1=5ms")
    p.add_argument("--memory-reserve", help="reserve off free memory: bytes (2GiB) or share (10%%); "
                                            "default max(1 GiB, 10%% of total)")
    p.add_argument("--prefill-tokens", type=int, default=640, help="S: prompt tokens, image tokens included")
    p.add_argument("--decode-tokens", type=int, default=64, help="T: sets the default decode context S + T/2")
    p.add_argument("--decode-context", type=int, help="C: context of the measured decode step")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--rows", default=",".join(map(str, PROFILE_ROWS)),
                   help="decode rows per micro-batch to time each text kind at, through the batched path "
                        "(default %(default)s); 'none': one row through the one-request path (a /1-style table)")
    p.add_argument("--prefill-counts", help="prompt tokens to time each text kind's prefill at, e.g. 160,320,640 "
                                            "(default S/4, S/2, S)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--kinds", help=f"block kinds to measure (default all: {','.join(BLOCK_KINDS)})")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="at most this many timed runs per measurement")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=10.0, help="seconds per measurement after min-repeats")
    p.add_argument("--link-sizes", help="message sizes of the link probe, e.g. 0,256KiB,1MiB,4MiB")
    p.add_argument("--link-repeats", type=int, default=3)
    p.add_argument("--cycle-bytes", default="1GiB",
                   help="time each layer kind run back to back over distinct copies of up to this many "
                        "bytes of weights, as a stage runs them (0: one layer, timed alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from adaptlink.profile import cmd_profile  # torch: imported when the command runs (above)

    return cmd_profile(args)


if __name__ == "__main__":
    from adaptlink.profile import child_main

    sys.exit(child_main())
