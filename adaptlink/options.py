"""The options of one run, typed: from the command line to every device process.

`adaptlink run`, `python -m adaptlink.launch` and `adaptlink.runs.run_plan` all describe a
run with the same flags (`add_run_arguments`); `RunOptions` is those flags as one typed
value. The launcher starts each device process with `opts.to_argv()`, which that process
parses back into the same `RunOptions` (`from_args(parser().parse_args(argv)) == opts`):

    opts = RunOptions.from_args(args)
    cmd = [sys.executable, "-m", "adaptlink.launch", *opts.to_argv()]

Kept free of torch and the runtime: `adaptlink --help` imports it through `run_cli`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from partitioner.errors import AdaptLinkError

RECOVERY = ("preloaded", "cold")
REPLAY = ("recompute", "exact")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a run (`adaptlink run`, `python -m adaptlink.launch`); one per RunOptions field."""
    p.add_argument("--plan", required=True, help="plan.json from `adaptlink plan`")
    p.add_argument("--prompts", help="prompts.jsonl: {id, prompt, image, max_new_tokens} per line")
    p.add_argument("--out", help="out.jsonl: {id, tokens, text, ttft_s, latency_s} per line")
    p.add_argument("--metrics", help="write the run's metrics (JSON) here")
    p.add_argument("--in-flight", "--max-running", dest="in_flight", type=int,
                   help="requests in flight (default: the plan's workload.in_flight)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for requests that name none")
    p.add_argument("--max-batch-rows", type=int, metavar="N",
                   help="rows (requests) per micro-batch; 1: one request per forward (default: the plan's "
                        "workload.batch_rows, or 32 for a plan without one)")
    p.add_argument("--max-batch-tokens", type=int, default=256, metavar="N",
                   help="tokens per micro-batch: longer prompts are prefilled in chunks (default %(default)s)")
    p.add_argument("--micro-batches", type=int, metavar="N",
                   help="micro-batches in the pipeline at once (default: the plan's workload.micro_batches; "
                        "0, or a plan without one: one per stage, plus one)")
    p.add_argument("--inject", action="append", default=[], metavar="kill:rank=R,after=S",
                   help="SIGKILL a rank after S seconds (after=) or N tokens (after_tokens=); repeatable")
    p.add_argument("--recovery", choices=RECOVERY, default="preloaded",
                   help="preloaded: backup holders load the shares they back up at start (default); "
                        "cold: they load a failed share from the checkpoint when it fails (for comparison)")
    p.add_argument("--cold-from-disk", action="store_true",
                   help="with --recovery cold: drop the checkpoint from the OS page cache before the "
                        "cold load, so it is read from storage")
    p.add_argument("--cold-read-mbps", type=float, metavar="MB_PER_S",
                   help="with --recovery cold: emulate storage of this speed (MB/s) for the cold load")
    p.add_argument("--replay", choices=REPLAY, default="recompute",
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
    add_serve_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")


def add_serve_arguments(p: argparse.ArgumentParser, *, serve_flag: bool = True) -> None:
    """The flags of `adaptlink serve` (and `-m adaptlink.launch --serve`): the HTTP server."""
    if serve_flag:
        p.add_argument("--serve", action="store_true",
                       help="the coordinator serves the OpenAI API over HTTP instead of reading --prompts")
    p.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="serve: the port (default %(default)s)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="serve: the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="serve: requests queued beyond the running ones; past it 429 (default %(default)s)")
    p.add_argument("--api-key", metavar="KEY",
                   help="serve: require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--api-key-file", metavar="F", help="serve: like --api-key, the key read from F")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="serve: fetch http(s) image URLs (10 s timeout, 20 MiB cap); the server then fetches "
                        "any address a client names")
    p.add_argument("--media-dir", metavar="DIR", help="serve: read file:// image URLs under DIR (and only there)")


@dataclass(kw_only=True, slots=True)
class RunOptions:
    """One run's options; each field is the flag of the same name (`in_flight`: --in-flight)."""

    plan: str                                # plan.json
    prompts: str | None = None               # prompts.jsonl (required to launch)
    out: str | None = None                   # out.jsonl
    metrics: str | None = None               # metrics JSON
    in_flight: int | None = None             # default: the plan's workload.in_flight
    max_new_tokens: int = 32                 # for requests that name none
    max_batch_rows: int | None = None        # rows per micro-batch; None: the plan's (or 32)
    max_batch_tokens: int = 256              # tokens per micro-batch (prompts chunked)
    micro_batches: int | None = None         # in the pipeline at once; None: the plan's; 0: one per stage, plus one
    inject: list[str] = field(default_factory=list)  # `kill:rank=R,after=S` specs, as given
    recovery: str = "preloaded"              # or "cold"
    cold_from_disk: bool = False
    cold_read_mbps: float | None = None      # cold: emulated storage speed, MB/s
    replay: str = "recompute"                # or "exact"
    secret_file: str | None = None
    log_dir: str | None = None
    timeout: float = 3600.0                  # seconds
    resume: bool = False
    serve: bool = False                      # the coordinator runs the HTTP server (adaptlink serve)
    host: str = "127.0.0.1"                  # serve: listen address
    port: int = 8000                         # serve: listen port
    served_model_name: str | None = None     # serve: default, the checkpoint directory's name
    max_waiting: int = 64                    # serve: queued requests before 429
    api_key: str | None = None               # serve: Bearer key (the launcher hands it to ranks in the env)
    api_key_file: str | None = None          # serve: the key's file
    allow_remote_images: bool = False        # serve: fetch http(s) image URLs
    media_dir: str | None = None             # serve: file:// image URLs under it
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunOptions":
        """The options of a parsed `add_run_arguments` command line (other attributes ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_argv(self) -> list[str]:
        """The flags that parse back to these options (defaults included, None left out)."""
        argv = ["--plan", str(self.plan)]
        for name in ("prompts", "out", "metrics", "in_flight", "log_dir", "secret_file", "max_batch_rows",
                     "micro_batches", "served_model_name", "api_key", "api_key_file", "media_dir"):
            value = getattr(self, name)
            if value is not None:
                argv += [_flag(name), str(value)]
        argv += ["--max-new-tokens", str(self.max_new_tokens),
                 "--max-batch-tokens", str(self.max_batch_tokens),
                 "--timeout", repr(float(self.timeout)),
                 "--recovery", self.recovery, "--replay", self.replay]
        for spec in self.inject:
            argv += ["--inject", spec]
        if self.cold_read_mbps is not None:
            argv += ["--cold-read-mbps", repr(float(self.cold_read_mbps))]
        if self.serve:
            argv.append("--serve")
        argv += ["--host", self.host, "--port", str(self.port), "--max-waiting", str(self.max_waiting)]
        for name in ("cold_from_disk", "resume", "allow_remote_images"):
            if getattr(self, name):
                argv.append(_flag(name))
        if self.verbose:
            argv.append("-v")
        return argv

    def check(self) -> None:
        """Refuse out-of-range numbers, naming the flag (before anything starts)."""
        for name, least in (("max_batch_rows", 1), ("max_batch_tokens", 1), ("micro_batches", 0),
                            ("max_waiting", 0), ("port", 0)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise AdaptLinkError(f"{_flag(name)}: must be >= {least}, got {getattr(self, name)}")
        if self.port > 65535:
            raise AdaptLinkError(f"--port: must be in [0, 65535], got {self.port}")
        if self.api_key is not None and self.api_key_file is not None:
            raise AdaptLinkError("--api-key and --api-key-file: give one")

    @property
    def cold_read_bytes_per_s(self) -> float | None:
        """--cold-read-mbps in bytes per second (None, or 0: no emulated storage)."""
        return self.cold_read_mbps * 1e6 if self.cold_read_mbps else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
