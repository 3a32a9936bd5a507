"""What trust costs: tokens/s of this tree against a tree from before it, same plans and prompts.

Issue 14 made every run authenticated (a run secret, signed store keys, an HMAC-SHA256 tag
over every message's header and tensor bytes, sender checks) and durable (each finished row
appended and flushed to out.jsonl). Its goal: < 2% tokens/s on the 1-rank and 4-rank
benchmarks. There is no switch that turns security off (a run without it is not a run this
engine offers), so the comparison is against the code before it: `--before DIR`, a checkout
of the commit before (for example `git worktree add /tmp/before 9f6327c`).

Both trees run the plans of `experiments/pipeline_bench.py` — one rank with the whole model
(K = 1) and four one-thread ranks (the coordinator with the vision branch, three decoder
shares, K = 8) — as `python -m adaptlink.launch`, each trial a fresh launch, in alternating
order (process-to-process spread on this machine is ~8%); the median of the per-pair ratios
is reported. Every run's tokens are checked against HF `generate`.

    git worktree add /tmp/before 9f6327c
    python experiments/security_cost.py --before /tmp/before            # ~6 min on 2 cores

The tree before trust is also the tree before batching, so since the batched pipeline
`--ablate` is the comparison that isolates the messages' tags: this tree against itself
with `runtime.wire._tag` replaced by a constant (a sitecustomize on the ablated runs'
PYTHONPATH only: the engine has no switch for it). The rest of trust (sealed store keys,
sender checks) and the durable out.jsonl stay on in both, so the ratio is the cost of
tagging and verifying every message's bytes.

    python experiments/security_cost.py --ablate --trials 5

The end-to-end ratio cannot resolve 2% here (the 1-rank set-up, which sends no message
between ranks, spreads 0.95-0.99 over 3 pairs). So the tagged runs also time the tags
themselves: a sitecustomize wraps `runtime.wire._tag` (signing and verifying both call it)
and `runtime.messages.check` (every received header's kind, fields and sender) with the
calling thread's CPU clock (`time.thread_time`: the time another rank holds the core is
not counted, as a wall clock would count it on 4 ranks over 2 cores), and each rank writes
its calls and seconds when it exits. The report gives those seconds against the run:
`tag_cpu_share` = (tag + check seconds) / (wall x the cores the ranks share), the cost on
this CPU-bound machine, and `tag_serial_bound` = the same seconds / wall, the cost if no
two of them ever overlapped (an upper bound on the tokens/s lost).

Writes experiments/results/security_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adaptlink.model.reference import hf_reference
from adaptlink.model.samples import write_sample_requests
from adaptlink.plans import chain_shares, manual_plan, write_plan
from adaptlink.runs import add_experiment_args, run_plan, small_llava

HERE = Path(__file__).resolve().parent
THIS_TREE = HERE.parent


NO_TAGS = """# experiments/security_cost.py --ablate: messages carry a constant tag (benchmark only)
import runtime.wire as _wire
_wire._tag = lambda *args, **kwargs: bytes(_wire.MAC_LEN)
"""


TIMED_TAGS = """# experiments/security_cost.py: each rank's time in the per-message checks (benchmark only)
import atexit as _atexit, json as _json, os as _os, time as _time
import runtime.messages as _messages
import runtime.wire as _wire
_stats = {"calls": 0, "bytes": 0, "seconds": 0.0, "checks": 0, "check_seconds": 0.0}
_tag = _wire._tag
def _timed_tag(secret, src, dst, seq, words, signed, bulk):
    t = _time.thread_time()
    try:
        return _tag(secret, src, dst, seq, words, signed, bulk)
    finally:
        _stats["seconds"] += _time.thread_time() - t
        _stats["calls"] += 1
        _stats["bytes"] += len(signed) + sum(b.numel() for b in bulk)
_check = _messages.check
def _timed_check(*args, **kwargs):
    t = _time.thread_time()
    try:
        return _check(*args, **kwargs)
    finally:
        _stats["check_seconds"] += _time.thread_time() - t
        _stats["checks"] += 1
_wire._tag, _messages.check = _timed_tag, _timed_check  # before coordinator/engine import check
def _dump():
    if _stats["calls"] and _os.environ.get("RANK") is not None:
        with open(_os.path.join(_os.environ["ADAPTLINK_TAG_TIMES"], f"rank{_os.environ['RANK']}.json"), "w") as f:
            _json.dump(_stats, f)
_atexit.register(_dump)
"""


def launch(tree: Path, plan: Path, prompts: Path, out_dir: Path, k: int, extra_path: Path | None = None,
           tag_times: Path | None = None) -> dict:
    """One `python -m adaptlink.launch` run with `tree`'s code; its tokens/s and tokens, and
    with `tag_times` (a folder holding TIMED_TAGS as sitecustomize.py) each rank's tag time."""
    env = {k: v for k, v in os.environ.items() if k != "ADAPTLINK_SECRET"}
    path = [str(tree)] + [str(p) for p in (extra_path, tag_times) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(path)
    times = None
    if tag_times is not None:
        times = out_dir / "tag-times"
        shutil.rmtree(times, ignore_errors=True)
        times.mkdir(parents=True)
        env["ADAPTLINK_TAG_TIMES"] = str(times)
    r = run_plan(plan, prompts, out_dir, in_flight=k, timeout_s=600, env=env, cwd=tree)
    got = {"tokens_per_s": r.metrics["tokens_per_s"], "wall_s": r.metrics["wall_s"], "tokens": r.tokens}
    if times is not None:
        ranks = [json.loads(f.read_text()) for f in sorted(times.glob("rank*.json"))]
        got["tags"] = {k: sum(x[k] for x in ranks) for k in ("calls", "bytes", "seconds", "checks", "check_seconds")}
        got["tags"]["ranks"] = len(ranks)
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_args(ap, hidden=512, layers=9)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    which.add_argument("--ablate", action="store_true",
                       help="compare with this tree whose messages carry a constant tag (no HMAC)")
    ap.add_argument("--trials", type=int, default=5, help="pairs per set-up (median of ratios kept)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "security_cost.json")
    args = ap.parse_args(argv)
    if args.before is not None and not (args.before / "runtime" / "engine.py").exists():
        ap.error(f"--before {args.before}: not a checkout of this project (no runtime/engine.py)")

    con = Console()
    ckpt = small_llava(args.work, hidden=args.hidden, layers=args.layers, intermediate=3 * args.hidden)
    prompts = write_sample_requests(args.work / "pipeline-requests", n=args.requests,
                                    max_new_tokens=args.max_new_tokens)
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    reference = hf_reference(ckpt, prompts)
    plans = args.out.parent / "security_cost"
    plans.mkdir(parents=True, exist_ok=True)
    per_rank = args.layers // 3
    shares = chain_shares(str(ckpt), [per_rank, per_rank, args.layers - 2 * per_rank])
    setups = {
        "1 rank, K=1": (write_plan(plans / "plan-1rank.json", manual_plan(str(ckpt), [sum(shares, [])], in_flight=1)), 1),
        "4 ranks, K=8": (write_plan(plans / "plan-4ranks.json", manual_plan(str(ckpt), shares, in_flight=8)), 8),
    }
    no_tags = None
    if args.ablate:
        no_tags = args.work / "no-tags"
        no_tags.mkdir(parents=True, exist_ok=True)
        (no_tags / "sitecustomize.py").write_text(NO_TAGS)
    timed = args.work / "timed-tags"
    timed.mkdir(parents=True, exist_ok=True)
    (timed / "sitecustomize.py").write_text(TIMED_TAGS)
    trees = {"this": THIS_TREE, "before": THIS_TREE if args.ablate else args.before.resolve()}
    t0 = time.perf_counter()
    result = {"command": "python experiments/security_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count()},
              "before": "this tree, messages untagged (--ablate)" if args.ablate else str(args.before),
              "model": f"random-weight LLaVA, decoder {args.layers} layers of width {args.hidden}",
              "requests": args.requests, "max_new_tokens": args.max_new_tokens, "setups": {}}
    for name, (plan, k) in setups.items():
        con.rule(name)
        pairs, tags = [], []
        ranks = len(json.loads(plan.read_text())["devices"])
        for i in range(args.trials):
            order = ["this", "before"] if i % 2 == 0 else ["before", "this"]
            got = {}
            for which in order:
                r = launch(trees[which], plan, prompts, args.work / "security-runs" / f"{which}-{k}-{i}", k,
                           extra_path=no_tags if which == "before" else None,
                           tag_times=timed if which == "this" else None)
                if [r["tokens"].get(x) for x in ids] != reference:
                    raise SystemExit(f"{name}, {which}: tokens differ from HF generate")
                got[which] = r["tokens_per_s"]
                if "tags" in r:
                    tg = r["tags"]
                    cores = min(ranks, os.cpu_count() or 1)
                    spent = tg["seconds"] + tg["check_seconds"]
                    tags.append({**tg, "wall_s": r["wall_s"], "us_per_call": 1e6 * tg["seconds"] / max(1, tg["calls"]),
                                 "tag_cpu_share": spent / (r["wall_s"] * cores),
                                 "tag_serial_bound": spent / r["wall_s"]})
            pairs.append({"this_tokens_per_s": got["this"], "before_tokens_per_s": got["before"],
                          "ratio": got["this"] / got["before"]})
            con.print(f"  pair {i}: this {got['this']:.1f} tok/s, before {got['before']:.1f} tok/s, "
                      f"ratio {pairs[-1]['ratio']:.3f}")
        result["setups"][name] = {"pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs),
                                  "tags": tags}
        if tags and tags[0]["calls"]:
            con.print(f"  tags: {statistics.median(t['calls'] for t in tags):.0f} per run, "
                      f"{statistics.median(t['us_per_call'] for t in tags):.1f} us each; with the sender checks: "
                      f"CPU share {statistics.median(t['tag_cpu_share'] for t in tags):.4%}, "
                      f"serial bound {statistics.median(t['tag_serial_bound'] for t in tags):.4%}")
    result["elapsed_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(result, indent=1))

    t = Table(title=f"this tree / before, tokens/s, {args.requests} requests x {args.max_new_tokens} tokens")
    for c in ("set-up", "median ratio", "range", "tag CPU share", "tag serial bound"):
        t.add_column(c, justify="left" if c == "set-up" else "right")
    for name, s in result["setups"].items():
        rs = [p["ratio"] for p in s["pairs"]]
        share = [x["tag_cpu_share"] for x in s["tags"]]
        bound = [x["tag_serial_bound"] for x in s["tags"]]
        t.add_row(name, f"{s['median_ratio']:.3f}", f"{min(rs):.3f}-{max(rs):.3f}",
                  f"{statistics.median(share):.3%}" if share else "-", f"{statistics.median(bound):.3%}" if bound else "-")
    con.print(t)
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
