"""Run a plan as a user would (`python -m adaptlink.launch`, one process per device) and
collect what it wrote: the demo and the experiments share this.

    r = run_plan("plan.json", "prompts.jsonl", Path("out/uniform"), inject=["kill:rank=2,after_tokens=30"])
    r.metrics["tokens_per_s"], r.tokens["r0"], r.failover.recovery_s
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adaptlink.options import RunOptions
from partitioner.errors import AdaptLinkError


@dataclass
class FailoverTimes:
    rank: int
    detection_s: float | None       # kill -> the coordinator knew
    recovery_s: float | None        # kill -> the next token delivered
    cold_load_s: float | None
    replayed: int
    replay_rows: list[int]          # rows of the replay per micro-batch that carried it


@dataclass
class RunResult:
    returncode: int
    metrics: dict
    rows: list[dict]
    wall_s: float                   # the whole launch, process start-up included
    stderr: str

    @property
    def tokens(self) -> dict[str, list[int]]:
        return {r["id"]: r["tokens"] for r in self.rows if "error" not in r}

    @property
    def failover(self) -> FailoverTimes | None:
        fs = self.metrics.get("failovers") or []
        if not fs:
            return None
        f = fs[0]
        kill = f.get("killed_at")
        return FailoverTimes(
            rank=f["rank"],
            detection_s=None if kill is None else f["detected_at"] - kill,
            recovery_s=None if kill is None or f.get("first_token_after") is None else f["first_token_after"] - kill,
            cold_load_s=f.get("cold_load_s"), replayed=len(f.get("replayed", [])),
            replay_rows=list(f.get("replay_rows", [])))


def run_plan(plan: str | Path, prompts: str | Path, out_dir: Path, *, inject: list[str] = (),
             recovery: str = "preloaded", cold_from_disk: bool = False,
             cold_read_mbps: float | None = None, in_flight: int | None = None, timeout_s: float = 900,
             check: bool = True, env: dict[str, str] | None = None, cwd: str | Path | None = None,
             max_batch_rows: int | None = None) -> RunResult:
    """Launch every device of `plan` on this machine; outputs go to out_dir/{out.jsonl,metrics.json,logs/}.
    `env`/`cwd`: the launch's environment and directory (another tree's code: PYTHONPATH and cwd)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out, metrics = out_dir / "out.jsonl", out_dir / "metrics.json"
    for f in (out, metrics):
        f.unlink(missing_ok=True)
    opts = RunOptions(plan=str(plan), prompts=str(prompts), out=str(out), metrics=str(metrics),
                      recovery=recovery, log_dir=str(out_dir / "logs"), timeout=timeout_s,
                      cold_from_disk=cold_from_disk, cold_read_mbps=cold_read_mbps or None,
                      in_flight=in_flight, inject=list(inject), max_batch_rows=max_batch_rows)
    cmd = [sys.executable, "-m", "adaptlink.launch", *opts.to_argv()]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 60, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if check and (p.returncode != 0 or not metrics.exists()):
        raise AdaptLinkError(f"run of {plan} failed (exit {p.returncode}); logs in {out_dir / 'logs'}:\n"
                             f"{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    m = json.loads(metrics.read_text()) if metrics.exists() else {}
    return RunResult(p.returncode, m, rows, wall, p.stderr)


# ---- the steps a user runs, as the demo and the experiments run them --------------------

def cli(*argv: str, console=None, quiet: bool = False) -> None:
    """Run `adaptlink ARGV...` in a child process, showing the command; raise on failure."""
    shown = "adaptlink " + " ".join(argv)
    if console is not None:
        console.print(f"[cyan]$ {shown}[/]")
    p = subprocess.run([sys.executable, "-m", "adaptlink.cli", *argv],
                       capture_output=quiet, text=True)
    if p.returncode != 0:
        raise AdaptLinkError(f"`{shown}` failed with exit code {p.returncode}"
                             + (f":\n{p.stderr[-2000:]}" if quiet else ""))


def profile_local(model: str | Path, out: Path, *, slowdowns: list[float], link: str = "1Gbit",
                  prefill_tokens: int, decode_tokens: int, console=None, quiet: bool = False) -> Path:
    """`adaptlink profile --local N` with EMULATED slowdowns, quick repeat settings."""
    n = len(slowdowns)
    cli("profile", "--model", str(model), "--local", str(n), "--threads", ",".join(["1"] * n),
        "--slowdown", ",".join(f"{s:g}" for s in slowdowns), "--link-bandwidth", link,
        "--prefill-tokens", str(prefill_tokens), "--decode-tokens", str(decode_tokens),
        "--repeats", "5", "--min-repeats", "3", "--budget", "0.3", "--link-sizes", "0,64KiB,256KiB",
        "--link-repeats", "3", "--out", str(out), console=console, quiet=quiet)
    return out


def make_plan(model: str | Path, cluster: Path, out: Path, *, method: str = "ilp", prefill_tokens: int,
              decode_tokens: int, in_flight: int, console=None, quiet: bool = False,
              batch_rows: int | str = "none", micro_batches: int | None = None) -> Path:
    """`adaptlink plan` with the ILP (method "ilp") or a baseline; `batch_rows` B (or auto)
    and `micro_batches` M plan micro-batches (default none: one request per forward,
    `in_flight` of them)."""
    cli("plan", "--model", str(model), "--cluster", str(cluster), "--prefill-tokens", str(prefill_tokens),
        "--decode-tokens", str(decode_tokens), "--in-flight", str(in_flight), "--batch-rows", str(batch_rows),
        *(["--micro-batches", str(micro_batches)] if micro_batches else []),
        *(["--baseline", method] if method != "ilp" else []), "--out", str(out), console=console, quiet=quiet)
    return out


WORK = Path.home() / ".cache" / "adaptlink" / "experiments"
"""Where the experiments keep their checkpoints and requests between runs."""


def add_experiment_args(ap, *, hidden: int, layers: int, intermediate: int | None = None) -> None:
    """The options every run experiment has: its requests and the `small_llava` it builds
    (`--intermediate` only where the script does not derive it from `--hidden`)."""
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    if intermediate is not None:
        ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--work", type=Path, default=WORK, help="checkpoints and requests, kept between runs")


def small_llava(work: Path, *, hidden: int, layers: int, intermediate: int, head_dim: int = 64) -> Path:
    """The experiments' random-weight LLaVA with a decoder of `layers` x `hidden` (heads of
    `head_dim`, 4 query heads per kv head), built once under `work` and reused."""
    name = f"ckpt-h{hidden}-l{layers}-i{intermediate}" + (f"-d{head_dim}" if head_dim != 64 else "")
    ckpt = Path(work) / name
    if not (ckpt / "config.json").exists():
        heads = max(4, hidden // head_dim)
        # torch (~1.9 s with transformers) only when a checkpoint is built: `adaptlink`'s
        # commands import this module to parse their options
        from adaptlink.model.tiny import make_tiny

        make_tiny(ckpt, text_hidden=hidden, text_layers=layers, text_intermediate=intermediate,
                  text_heads=heads, text_kv_heads=max(1, hidden // (4 * head_dim)))
    return ckpt
