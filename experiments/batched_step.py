"""One batched decode step over B rows against B single-request steps, same decoder layers.

The question behind issue 16: how much does a stage gain by running its ready requests as
one packed micro-batch (`LlavaBlocks.run_batch`, adaptlink/model/microbatch.py) instead of
one forward per request (`LlavaBlocks.run_many` with a `DynamicCache` per request, today's
`runtime/stage.py` path)? Both run HF's own `LlamaDecoderLayer`s of a random mid-size LLaMA
(hidden 1024, MLP 2816, GQA 16:4 heads; layers 8..11 of 12, global indices) on one thread.

For each B: B prompts of 15-200 tokens are prefilled on both paths, then for `--steps`
decode steps the same random hidden input goes through B single steps (A) and one packed
step of B rows (B), in alternating order (A,B then B,A) so drift in the machine's load hits
both alike. Reported per B: median of (sum of the B single steps' time / the batched step's
time), and the largest |difference| between the two paths' outputs over every step.

    python experiments/batched_step.py                # ~1-2 min on one free core
    python experiments/batched_step.py --rows 1,2,4,8,16 --steps 48 --hidden 2048
    python experiments/batched_step.py --kv slots --dtype bfloat16 --out /tmp/slots.json

Writes experiments/results/batched_step.json. Timings on a shared machine are indicative
only: every figure is a ratio of interleaved runs, never an absolute time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.model.config import load_config
from adaptlink.model.microbatch import MicroBatch, Row

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "batched_step.json"


def build(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: list[int], dtype: str,
          device: str = "cpu") -> LlavaBlocks:
    config = load_config("preset:llava-1.5-7b")
    tc = config.text_config
    tc.hidden_size, tc.intermediate_size = hidden, intermediate
    tc.num_attention_heads, tc.num_key_value_heads = heads, kv_heads
    tc.head_dim = hidden // heads
    tc.num_hidden_layers = max(layers) + 1
    return LlavaBlocks.load("preset:llava-1.5-7b", [f"decoder.layer.{i}" for i in layers],
                            dtype=dtype, config=config, seed=0, device=device)


def measure(blocks: LlavaBlocks, B: int, steps: int, seed: int, store: str = "growing") -> dict:
    ids = blocks.block_ids
    D = blocks.config.text_config.hidden_size
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [int(x) for x in torch.randint(15, 201, (B,), generator=g)]
    reqs = [f"r{i}" for i in range(B)]
    dt, dev = blocks.dtype, blocks.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # Prefill both paths on the same prompt hidden states.
    caches = {r: blocks.new_cache() for r in reqs}
    kv = blocks.new_kv_store() if store == "growing" else blocks.new_kv_store(slots=B, max_tokens=208 + steps)
    for r, L in zip(reqs, prompt_lens):
        h = torch.randn(1, L, D, generator=g).to(dev, dt)
        blocks.run_many(ids, {"hidden": h}, Step(torch.arange(L, device=dev)[None], cache=caches[r]))
        blocks.run_batch(ids, MicroBatch.of(Row(r, 0, 0, L)), {"hidden": h}, kv)
    pos = dict(zip(reqs, prompt_lens))

    ratios, single_s, batched_s, diff = [], [], [], 0.0
    for step in range(steps):
        x = torch.randn(1, B, D, generator=g).to(dev, dt)  # one new token per request

        def singles():
            outs = []
            for i, r in enumerate(reqs):
                st = Step(torch.tensor([[pos[r]]], device=dev), cache=caches[r])
                outs.append(blocks.run_many(ids, {"hidden": x[:, i:i + 1]}, st)["hidden"])
            return torch.cat(outs, dim=1)

        def batched():
            mb = MicroBatch(tuple(Row(r, 0, pos[r], 1) for r in reqs))
            return blocks.run_batch(ids, mb, {"hidden": x}, kv)["hidden"]

        times = {}
        for name in (("A", "B") if step % 2 == 0 else ("B", "A")):
            sync()
            t0 = time.perf_counter()
            out = singles() if name == "A" else batched()
            sync()
            times[name] = time.perf_counter() - t0
            if name == "A":
                a = out
            else:
                b = out
        diff = max(diff, float((a.float() - b.float()).abs().max()))
        for r in reqs:
            pos[r] += 1
        single_s.append(times["A"])
        batched_s.append(times["B"])
        ratios.append(times["A"] / times["B"])
    return {
        "rows": B, "prompt_lens": prompt_lens, "steps": steps,
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]],
        "single_steps_ms_median": 1e3 * statistics.median(single_s),
        "batched_step_ms_median": 1e3 * statistics.median(batched_s),
        "max_abs_diff": diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8", help="comma-separated B values")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per B")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", default="8,9,10,11", help="global decoder layer indices")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (experiments/gpu_check.sh)")
    ap.add_argument("--kv", default="growing", choices=["growing", "slots"],
                    help="KV store of the batched path: per-request growing buffers, or a slot cache")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(v) for v in args.layers.split(",")]
    blocks = build(args.hidden, args.intermediate, args.heads, args.kv_heads, layers, args.dtype, args.device)
    results = []
    for B in (int(v) for v in args.rows.split(",")):
        with torch.inference_mode():
            res = measure(blocks, B, args.steps, seed=B, store=args.kv)
        results.append(res)
        print(f"B={B:3d}  sum of {B} single steps / one batched step: {res['ratio_median']:.2f}x "
              f"(quartiles {res['ratio_quartiles'][0]:.2f}-{res['ratio_quartiles'][1]:.2f}; "
              f"{res['single_steps_ms_median']:.1f} ms vs {res['batched_step_ms_median']:.1f} ms)  "
              f"max |diff| {res['max_abs_diff']:.2g}", flush=True)
    doc = {
        "what": "one batched decode step (run_batch, B rows) vs B single-request steps (run_many + DynamicCache)",
        "config": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                   "kv_heads": args.kv_heads, "layers": layers, "dtype": args.dtype, "threads": args.threads, "kv": args.kv,
                   "device": args.device},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "transformers": transformers.__version__},
        "note": "indicative only: a shared 2-core machine; ratios of interleaved runs",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
