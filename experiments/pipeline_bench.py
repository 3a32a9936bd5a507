"""The runtime's two ratios: pipelining pays, and one rank costs nothing over plain HF.

1. **K in flight against K = 1**, 4 ranks (the coordinator with the vision branch, three
   decoder shares): the same plan and prompts run with K = 1 (one request in the whole
   pipeline: every stage but one idles) and with K = 4 and K = 8. Two set-ups, labelled:
   - EMULATED: every rank padded to 4x its own compute (deadline padding, so each rank
     needs a quarter of a core and the 4 ranks fit this 2-core machine's budget);
   - real: no padding, 4 one-thread ranks on however many cores there are (2 here, so
     the ceiling is about 2x, not 4x).
2. **One rank against plain HF**: a 1-device plan (all blocks on the coordinator, K = 1,
   one thread) against `LlavaForConditionalGeneration.generate` on the same prompts, one
   request at a time, one thread. Serving time only: the runtime's `wall_s` (first
   request in to last token out; its rank warmed its blocks up on synthetic inputs before
   serving) and the time of the `generate` calls (after one warm-up request, processor
   included: ~5 ms of 1.7 s). Each trial is a fresh process of each, their order
   alternating; process-to-process spread on this machine is about +-8%, so the median
   of the trials' ratios is reported.

Every run's tokens are checked against HF `generate`.

    python experiments/pipeline_bench.py                # ~4 min on 2 cores
    python experiments/pipeline_bench.py --requests 8 --max-new-tokens 16

Writes experiments/results/pipeline_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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

# Times `generate` in a fresh process with one thread, after one warm-up request, as the
# 1-rank run is timed (its own process, one thread, serving time only).
_HF_TIMER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from adaptlink.model.reference import hf_reference, load_reference
from adaptlink.model.samples import read_requests
ckpt, prompts = sys.argv[1], sys.argv[2]
pair = load_reference(ckpt)
reqs = read_requests(prompts)
hf_reference(pair, reqs[:1])
t = time.perf_counter()
tokens = hf_reference(pair, reqs)
print(json.dumps({"wall_s": time.perf_counter() - t, "tokens": tokens}))
"""


def hf_generate_time(ckpt: Path, prompts: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", _HF_TIMER, str(ckpt), str(prompts)], capture_output=True,
                       text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_args(ap, hidden=512, layers=9)
    ap.add_argument("--in-flight", default="1,4,8", help="K values for the 4-rank runs (the first is the base)")
    ap.add_argument("--slowdown", type=float, default=4.0, help="EMULATED per-rank slowdown of the padded set-up")
    ap.add_argument("--hf-trials", type=int, default=9, help="repetitions of the 1-rank vs HF pair (median kept)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pipeline_bench.json")
    args = ap.parse_args(argv)

    con = Console()
    ks = [int(k) for k in args.in_flight.split(",")]
    ckpt = small_llava(args.work, hidden=args.hidden, layers=args.layers, intermediate=3 * args.hidden)
    prompts = write_sample_requests(args.work / "pipeline-requests", n=args.requests,
                                    max_new_tokens=args.max_new_tokens)
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    reference = hf_reference(ckpt, prompts)
    plans = args.out.parent / "pipeline_bench"
    plans.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def run(plan_path: Path, k: int, tag: str) -> dict:
        r = run_plan(plan_path, prompts, args.work / "pipeline-runs" / tag, in_flight=k)
        same = [r.tokens.get(i) for i in ids] == reference
        if not same:
            raise SystemExit(f"{tag}: tokens differ from HF generate (see {args.work / 'pipeline-runs' / tag})")
        m = r.metrics
        con.print(f"  {tag}: {m['tokens_per_s']:.1f} tok/s, {m['wall_s']:.2f} s, tokens = HF")
        return {"k": k, "tokens_per_s": m["tokens_per_s"], "requests_per_s": m["requests_per_s"],
                "wall_s": m["wall_s"], "tokens_match_hf": same}

    # 1. K in flight against K = 1, on 4 ranks.
    per_rank = args.layers // 3
    split = [per_rank, per_rank, args.layers - 2 * per_rank]
    shares = chain_shares(str(ckpt), split)
    pipeline = {}
    for label, slow in (("emulated", args.slowdown), ("real", 1.0)):
        plan = write_plan(plans / f"plan-4ranks-{label}.json",
                          manual_plan(str(ckpt), shares, slowdowns=[slow] * 4, in_flight=max(ks)))
        con.rule(f"4 ranks, decoder {split}, {'EMULATED slowdown %gx on every rank' % slow if slow > 1 else 'no emulation'}")
        rows = [run(plan, k, f"{label}-k{k}") for k in ks]
        for row in rows:
            row["vs_k1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        pipeline[label] = {"slowdown": slow, "emulated": slow > 1, "rows": rows}

    # 2. One rank against plain HF generate.
    con.rule("1 rank (the whole model on the coordinator) against HF generate, 1 thread, K = 1")
    one = write_plan(plans / "plan-1rank.json", manual_plan(str(ckpt), [sum(shares, [])], in_flight=1))
    trials = []
    for i in range(args.hf_trials):
        if i % 2:  # alternate which goes first
            hf = hf_generate_time(ckpt, prompts)
            rt = run(one, 1, f"one-rank-{i}")
        else:
            rt = run(one, 1, f"one-rank-{i}")
            hf = hf_generate_time(ckpt, prompts)
        if hf["tokens"] != reference:
            raise SystemExit("HF generate in the timing process gave other tokens than the reference")
        trials.append({"runtime_wall_s": rt["wall_s"], "hf_wall_s": hf["wall_s"],
                       "ratio": rt["wall_s"] / hf["wall_s"]})
        con.print(f"  trial {i}: runtime {rt['wall_s']:.2f} s, HF generate {hf['wall_s']:.2f} s, "
                  f"ratio {trials[-1]['ratio']:.3f}")
    ratio = statistics.median(t["ratio"] for t in trials)

    result = {
        "command": "python experiments/pipeline_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count()},
        "model": f"random-weight LLaVA, decoder {args.layers} layers of width {args.hidden}",
        "requests": args.requests, "max_new_tokens": args.max_new_tokens, "decoder_split": split,
        "pipeline": pipeline, "one_rank_vs_hf": {"trials": trials, "median_ratio": ratio},
        "elapsed_s": time.perf_counter() - t0,
    }
    args.out.write_text(json.dumps(result, indent=1))

    t = Table(title=f"4 ranks, {args.requests} requests x {args.max_new_tokens} tokens")
    for c in ("set-up", "K", "tok/s", "vs K=1"):
        t.add_column(c, justify="left" if c == "set-up" else "right")
    for label, p in pipeline.items():
        name = f"EMULATED {p['slowdown']:g}x per rank" if p["emulated"] else f"real, {os.cpu_count()} cores"
        for row in p["rows"]:
            t.add_row(name, str(row["k"]), f"{row['tokens_per_s']:.1f}", f"{row['vs_k1']:.2f}x")
    con.print(t)
    con.print(f"1 rank / HF generate serving time: median {ratio:.3f} over {len(trials)} trials")
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
