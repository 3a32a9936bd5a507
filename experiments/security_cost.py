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

Writes experiments/results/security_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adaptlink.plans import chain_shares, manual_plan, write_plan
from adaptlink.runs import add_experiment_args, run_plan, small_llava
from adaptlink.model.reference import hf_reference
from adaptlink.model.samples import write_sample_requests

HERE = Path(__file__).resolve().parent
THIS_TREE = HERE.parent


NO_TAGS = """# experiments/security_cost.py --ablate: messages carry a constant tag (benchmark only)
import runtime.wire as _wire
_wire._tag = lambda *args, **kwargs: bytes(_wire.MAC_LEN)
"""


def launch(tree: Path, plan: Path, prompts: Path, out_dir: Path, k: int, extra_path: Path | None = None) -> dict:
    """One `python -m adaptlink.launch` run with `tree`'s code; its tokens/s and tokens."""
    env = {k: v for k, v in os.environ.items() if k != "ADAPTLINK_SECRET"}
    env["PYTHONPATH"] = str(tree) + (f"{os.pathsep}{extra_path}" if extra_path else "")
    r = run_plan(plan, prompts, out_dir, in_flight=k, timeout_s=600, env=env, cwd=tree)
    return {"tokens_per_s": r.metrics["tokens_per_s"], "wall_s": r.metrics["wall_s"], "tokens": r.tokens}


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
    trees = {"this": THIS_TREE, "before": THIS_TREE if args.ablate else args.before.resolve()}
    t0 = time.perf_counter()
    result = {"command": "python experiments/security_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count()},
              "before": "this tree, messages untagged (--ablate)" if args.ablate else str(args.before),
              "model": f"random-weight LLaVA, decoder {args.layers} layers of width {args.hidden}",
              "requests": args.requests, "max_new_tokens": args.max_new_tokens, "setups": {}}
    for name, (plan, k) in setups.items():
        con.rule(name)
        pairs = []
        for i in range(args.trials):
            order = ["this", "before"] if i % 2 == 0 else ["before", "this"]
            got = {}
            for which in order:
                r = launch(trees[which], plan, prompts, args.work / "security-runs" / f"{which}-{k}-{i}", k,
                           extra_path=no_tags if which == "before" else None)
                if [r["tokens"].get(x) for x in ids] != reference:
                    raise SystemExit(f"{name}, {which}: tokens differ from HF generate")
                got[which] = r["tokens_per_s"]
            pairs.append({"this_tokens_per_s": got["this"], "before_tokens_per_s": got["before"],
                          "ratio": got["this"] / got["before"]})
            con.print(f"  pair {i}: this {got['this']:.1f} tok/s, before {got['before']:.1f} tok/s, "
                      f"ratio {pairs[-1]['ratio']:.3f}")
        result["setups"][name] = {"pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}
    result["elapsed_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(result, indent=1))

    t = Table(title=f"this tree / before, tokens/s, {args.requests} requests x {args.max_new_tokens} tokens")
    for c in ("set-up", "median ratio", "range"):
        t.add_column(c, justify="left" if c == "set-up" else "right")
    for name, s in result["setups"].items():
        rs = [p["ratio"] for p in s["pairs"]]
        t.add_row(name, f"{s['median_ratio']:.3f}", f"{min(rs):.3f}-{max(rs):.3f}")
    con.print(t)
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
