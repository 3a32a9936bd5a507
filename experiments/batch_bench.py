"""Batched pipeline: micro-batches against one row per forward, and against HF's static batches.

(a) 1 rank (the whole model on the coordinator, one thread), `--requests` requests with
    images and mixed `max_new_tokens` (8-64), K = 8 in flight:
    - this runtime with micro-batches of up to `--rows` rows;
    - this runtime without batching (`--max-batch-rows 1`: one request per forward, the
      path before micro-batches);
    - HF `generate` on the same requests in static batches of `--rows`, left padded (each
      batch runs to its longest `max_new_tokens`; only each request's own tokens count);
    - HF `generate` one request at a time (the correctness oracle; its tokens are what
      every runtime run must produce).
(b) 4 ranks (the coordinator with the vision branch, three decoder shares), the same
    requests: micro-batches with K = `--in-flight-4` (32: enough rows for one micro-batch
    of several rows per stage) against one row per forward at K = 8 (the path before
    micro-batches, at its K). EMULATED: each rank is
    padded to `--slowdown` x its own compute (deadline padding), so the four ranks need
    one core between them and do not oversubscribe this 2-core machine.

Ratios within one run (this machine varies ~25% run to run). Every runtime run's tokens
are checked against HF `generate` on each request alone.

    python experiments/batch_bench.py                      # ~10 min on 2 cores
    python experiments/batch_bench.py --requests 16 --hidden 512 --layers 6

Writes experiments/results/batch_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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

# HF generate in static batches, left padded, one thread, after one warm-up batch.
_HF_STATIC = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from adaptlink.model.reference import load_reference
from adaptlink.model.samples import open_image, read_requests
ckpt, prompts, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, processor = load_reference(ckpt)
processor.tokenizer.padding_side = "left"
reqs = read_requests(prompts)
batches = [reqs[i:i + rows] for i in range(0, len(reqs), rows)]
eos = model.generation_config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

def run(batch):
    inputs = processor(images=[open_image(r["image"]) for r in batch], text=[r["prompt"] for r in batch],
                       padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max(r["max_new_tokens"] for r in batch))
    useful = 0
    for row, r in zip(out[:, inputs["input_ids"].shape[1]:].tolist(), batch):
        n = 0
        for t in row[:r["max_new_tokens"]]:
            n += 1
            if t in eos:
                break
        useful += n
    return useful

run(batches[0])
t = time.perf_counter()
tokens = sum(run(b) for b in batches)
print(json.dumps({"wall_s": time.perf_counter() - t, "tokens": tokens}))
"""

_HF_ALONE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from adaptlink.model.reference import hf_reference, load_reference
from adaptlink.model.samples import read_requests
pair = load_reference(sys.argv[1])
reqs = read_requests(sys.argv[2])
hf_reference(pair, reqs[:1])
t = time.perf_counter()
tokens = hf_reference(pair, reqs)
print(json.dumps({"wall_s": time.perf_counter() - t, "tokens": tokens}))
"""


def _python(code: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(p.stdout.strip().splitlines()[-1])


def mixed_requests(work: Path, n: int) -> Path:
    """`n` requests with images, max_new_tokens spread over 8..64."""
    path = write_sample_requests(work / f"batch-requests-{n}", n=n, seed=3)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for i, line in enumerate(lines):
        line["max_new_tokens"] = 8 + (i * 23) % 57
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_args(ap, hidden=768, layers=9)
    ap.set_defaults(requests=32)
    ap.add_argument("--rows", type=int, default=8, help="rows per micro-batch (and HF's static batch)")
    ap.add_argument("--in-flight", type=int, default=8, help="K of the 1-rank runs and of the unbatched 4-rank run")
    ap.add_argument("--in-flight-4", type=int, default=32, help="K of the batched 4-rank run")
    ap.add_argument("--slowdown", type=float, default=4.0, help="EMULATED per-rank slowdown of the 4-rank runs")
    ap.add_argument("--skip-4", action="store_true", help="only (a), the 1-rank comparison")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "batch_bench.json")
    args = ap.parse_args(argv)

    con = Console()
    ckpt = small_llava(args.work, hidden=args.hidden, layers=args.layers, intermediate=3 * args.hidden)
    prompts = mixed_requests(args.work, args.requests)
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    plans = args.out.parent / "batch_bench"
    plans.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    con.rule("HF generate, one request at a time (the oracle), 1 thread")
    alone = _python(_HF_ALONE, str(ckpt), str(prompts))
    reference = alone["tokens"]
    n_tokens = sum(len(t) for t in reference)
    alone_tps = n_tokens / alone["wall_s"]
    con.print(f"  {n_tokens} tokens in {alone['wall_s']:.1f} s: {alone_tps:.1f} tok/s")
    if reference != hf_reference(ckpt, prompts):
        raise SystemExit("HF generate gave other tokens in its timing process than in this one")

    def run(plan_path: Path, tag: str, rows: int, k: int | None = None) -> dict:
        k = k or args.in_flight
        r = run_plan(plan_path, prompts, args.work / "batch-runs" / tag, in_flight=k,
                     max_batch_rows=rows)
        if [r.tokens.get(i) for i in ids] != reference:
            raise SystemExit(f"{tag}: tokens differ from HF generate (see {args.work / 'batch-runs' / tag})")
        m = r.metrics
        b = m.get("batching") or {}
        con.print(f"  {tag}: {m['tokens_per_s']:.1f} tok/s in {m['wall_s']:.1f} s, "
                  f"{b.get('rows_per_batch_mean', 0):.2f} rows per micro-batch, tokens = HF")
        return {"rows": rows, "in_flight": k, "tokens_per_s": m["tokens_per_s"], "wall_s": m["wall_s"], "batching": b,
                "tokens_match_hf": True}

    # (a) one rank
    con.rule(f"(a) 1 rank, {args.requests} requests, K = {args.in_flight}, 1 thread")
    everything = sum(chain_shares(str(ckpt), [args.layers]), [])
    one = write_plan(plans / "plan-1rank.json", manual_plan(str(ckpt), [everything], in_flight=args.in_flight))
    batched = run(one, "1rank-batched", args.rows)
    single = run(one, "1rank-rows1", 1)
    static = _python(_HF_STATIC, str(ckpt), str(prompts), str(args.rows))
    static_tps = static["tokens"] / static["wall_s"]
    con.print(f"  HF static batches of {args.rows}: {static['tokens']} useful tokens in "
              f"{static['wall_s']:.1f} s: {static_tps:.1f} tok/s")
    one_rank = {"batched": batched, "rows1": single,
                "hf_static": {"rows": args.rows, "tokens_per_s": static_tps, **static},
                "hf_alone": {"tokens_per_s": alone_tps, "wall_s": alone["wall_s"]},
                "batched_vs_hf_static": batched["tokens_per_s"] / static_tps,
                "batched_vs_rows1": batched["tokens_per_s"] / single["tokens_per_s"]}

    # (b) four ranks
    four = None
    if not args.skip_4:
        per = args.layers // 3
        split = [per, per, args.layers - 2 * per]
        con.rule(f"(b) 4 ranks, decoder {split}, EMULATED slowdown {args.slowdown:g}x on every rank")
        plan4 = write_plan(plans / "plan-4ranks.json",
                           manual_plan(str(ckpt), chain_shares(str(ckpt), split), slowdowns=[args.slowdown] * 4,
                                       in_flight=args.in_flight))
        b4 = run(plan4, f"4ranks-batched-k{args.in_flight_4}", args.rows, args.in_flight_4)
        s4 = run(plan4, f"4ranks-rows1-k{args.in_flight}", 1)
        four = {"decoder_split": split, "slowdown": args.slowdown, "emulated": True, "batched": b4, "rows1": s4,
                "batched_vs_rows1": b4["tokens_per_s"] / s4["tokens_per_s"]}

    t = Table(title="batch_bench: tokens/s (ratios within this run)")
    for col in ("set-up", "tok/s", "ratio"):
        t.add_column(col, justify="left" if col == "set-up" else "right")
    t.add_row("1 rank, micro-batches", f"{batched['tokens_per_s']:.1f}", "1.00")
    t.add_row("1 rank, one row per forward", f"{single['tokens_per_s']:.1f}",
              f"{single['tokens_per_s'] / batched['tokens_per_s']:.2f}")
    t.add_row(f"HF static batches of {args.rows}", f"{static_tps:.1f}", f"{static_tps / batched['tokens_per_s']:.2f}")
    t.add_row("HF one at a time", f"{alone_tps:.1f}", f"{alone_tps / batched['tokens_per_s']:.2f}")
    if four:
        t.add_row(f"4 ranks (EMULATED), micro-batches, K = {args.in_flight_4}", f"{four['batched']['tokens_per_s']:.1f}", "")
        t.add_row(f"4 ranks (EMULATED), one row per forward, K = {args.in_flight}", f"{four['rows1']['tokens_per_s']:.1f}",
                  f"{1 / four['batched_vs_rows1']:.2f} of batched")
    con.print(t)

    result = {
        "command": "python experiments/batch_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count()},
        "model": f"random-weight LLaVA, decoder {args.layers} layers of width {args.hidden}",
        "requests": args.requests, "tokens": n_tokens, "in_flight": args.in_flight,
        "one_rank": one_rank, "four_ranks": four, "elapsed_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    con.print(f"(a) batched / HF static {one_rank['batched_vs_hf_static']:.2f}x, batched / one row "
              f"{one_rank['batched_vs_rows1']:.2f}x" + (f"; (b) 4 ranks batched / one row "
                                                         f"{four['batched_vs_rows1']:.2f}x" if four else "")
              + f"; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
