"""Does the profile predict the reference executor? Per-request seconds that `adaptlink profile`
predicts against what `adaptlink.model.reference.generate` actually takes on this machine.

    .venv/bin/python experiments/profile_predict.py                 # small model, 1 thread
    .venv/bin/python experiments/profile_predict.py --threads 2 --requests 8 --new-tokens 32

Steps:
1. build a small-but-not-tiny random LLaVA checkpoint (`SPEC`: 8 decoder layers of width
   512, a 4-layer vision tower at 112 px, 64 image tokens; ~30M parameters) in a temp dir;
2. profile this machine with the real command, `adaptlink profile --model CKPT`, at the
   requests' median prompt length S and decode steps T - 1 (the first of the T new tokens
   comes out of the prefill); threads as given. It writes a cluster.json;
3. predict each request's time from that cluster.json alone, by the planner's own cost model
   (`partitioner.costs.CostModel.build`: every block of the graph once on this device, prefill
   scaled to the request's own S, plus T - 1 decode steps), so the rule checked is the one
   plans are made with;
4. run each request through the reference executor (every block in one process, greedy,
   no early stop), median of `--reps` timed runs after one warm-up;
5. report predicted / actual per request and over all requests; pass if within 20%.

Writes experiments/results/profile_predict.json (raw numbers), profile_predict_cluster.json
(the profile) and profile_predict.png (predicted against actual per request).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = dict(text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=8, text_intermediate=1376,
            vision_hidden=256, vision_layers=4, vision_heads=4, vision_intermediate=1024,
            image_size=112, patch_size=14, max_position_embeddings=1024)
TOLERANCE = 0.20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads, profile and reference alike")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16, help="T: tokens generated per request")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per request (median kept)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    import torch

    from adaptlink.model.blocks import LlavaBlocks
    from adaptlink.model.config import ModelInfo, load_config
    from adaptlink.model.graph import block_ids, build_graph
    from adaptlink.model.reference import generate
    from adaptlink.model.samples import open_image as _open_image, sample_requests
    from adaptlink.model.tiny import make_tiny
    from partitioner.costs import CostModel
    from partitioner.validate import load_cluster
    from transformers import AutoProcessor

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    T = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny(Path(tmp) / "ckpt", **SPEC))
        processor = AutoProcessor.from_pretrained(ckpt, local_files_only=True)
        reqs = []
        for r in sample_requests(args.requests, max_new_tokens=T):
            x = processor(images=[_open_image(r["image"])], text=[r["prompt"]], return_tensors="pt")
            reqs.append({"id": r["id"], "inputs": x, "S": int(x["input_ids"].shape[1])})
        S = int(statistics.median(q["S"] for q in reqs))

        # 2. profile, with the command a user runs
        cluster_path = args.out / "profile_predict_cluster.json"
        cmd = [sys.executable, "-m", "adaptlink.cli", "profile", "--model", ckpt, "--out", str(cluster_path),
               "--threads", str(args.threads), "--prefill-tokens", str(S), "--decode-tokens", str(T - 1),
               "--warmup", "2", "--repeats", "9", "--min-repeats", "5", "--budget", "3",
               "--cluster-name", "this-machine"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        profile_s = time.perf_counter() - t0
        cluster = json.loads(cluster_path.read_text())
        planned = load_cluster(cluster_path)

        # 3 + 4. predict each request, then time it
        info = ModelInfo.from_config(load_config(ckpt), source=ckpt)
        blocks = LlavaBlocks.load(ckpt, block_ids(info), dtype="float32")
        rows = []
        for q in reqs:
            graph = build_graph(ckpt, prefill_tokens=q["S"], decode_tokens=T - 1)
            predicted = float(CostModel.build(graph, planned, planned.devices[:1]).compute_s[:, 0].sum())
            x = q["inputs"]

            def run():
                return generate(blocks, x["input_ids"], x["attention_mask"], x["pixel_values"],
                                max_new_tokens=T, eos_token_ids=set())

            run()  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t0)
            assert out.tokens.shape[1] == T
            actual = statistics.median(times)
            rows.append({"id": q["id"], "prompt_tokens": q["S"], "new_tokens": T, "predicted_s": predicted,
                         "actual_s": actual, "actual_runs_s": times, "ratio": predicted / actual})
            print(f"{q['id']}: S={q['S']:4d}  predicted {predicted:.4f} s  actual {actual:.4f} s  "
                  f"ratio {predicted / actual:.3f}", flush=True)

    pred, act = sum(r["predicted_s"] for r in rows), sum(r["actual_s"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    ok = abs(pred / act - 1) <= TOLERANCE and abs(worst["ratio"] - 1) <= TOLERANCE
    summary = {"model_spec": SPEC, "threads": args.threads, "requests": len(rows), "new_tokens": T,
               "profiled_prefill_tokens": S, "profile_seconds": round(profile_s, 2),
               "predicted_total_s": pred, "actual_total_s": act, "ratio_total": pred / act,
               "worst_request_ratio": worst["ratio"], "tolerance": TOLERANCE, "within_tolerance": ok,
               "device": {k: cluster["devices"][0][k] for k in ("torch_device", "dtype", "threads")},
               "load_average": os.getloadavg(), "rows": rows}
    (args.out / "profile_predict.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(rows, args.out / "profile_predict.png", pred / act)
    print(f"all {len(rows)} requests: predicted {pred:.3f} s, actual {act:.3f} s, ratio {pred / act:.3f} "
          f"(worst request {worst['ratio']:.3f}); within {TOLERANCE:.0%}: {ok}")
    return 0 if ok else 1


def _plot(rows: list[dict], path: Path, ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["predicted_s"] for r in rows], 0.4, label="predicted by the profile")
    ax.bar([x + 0.2 for x in xs], [r["actual_s"] for r in rows], 0.4, label="reference executor")
    ax.set_xticks(list(xs), [f"{r['id']}\nS={r['prompt_tokens']}" for r in rows])
    ax.set_ylabel("seconds per request")
    ax.set_title(f"profile vs reference executor (total ratio {ratio:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
