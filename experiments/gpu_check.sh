#!/usr/bin/env bash
# What only a GPU shows, as one short call on a lent device machine (the `device` tool):
#   1. batched decode at LLaVA-1.5-7B layer size (hidden 4096, MLP 11008, 32 heads), random
#      bf16 weights, 4 decoder layers, B = 1..64 rows: one packed micro-batch step against B
#      single-request steps, with the growing KV store and with the slot cache;
#   2. a CUDA rank beside CPU ranks: a 3-rank gloo run of the tiny model (fp32) whose middle
#      decoder share runs on cuda:0; its tokens must equal HF generate on the CPU, each alone;
#   3. the serve load test with a CUDA rank as the coordinator: 16 openai clients for 30 s,
#      rank 2 SIGKILLed 15 s into a second phase, then `adaptlink run` of the same requests.
# Results land in $OUT (the device tool brings them back), or experiments/results/gpu/.
#
#     bash experiments/gpu_check.sh          # ~5-8 min on an H200
#
# The device's image lacks the serving stack, pulp and this project's transformers: run
# `bash experiments/gpu_wheels.sh` here first and name .whl in the device call's carry
# (command: `PYTHON=python3 bash experiments/gpu_check.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-experiments/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -d .whl ]; then  # experiments/gpu_wheels.sh, carried: what the device's image lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import adaptlink" 2>/dev/null; then
  "$PY" -m pip install -q -e . 2>&1 | tail -2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.txt" 2>&1 || true

echo "== 1. batched decode step at 7B layer size, bf16, cuda"
for kv in growing slots; do
  timeout 240 "$PY" experiments/batched_step.py --device cuda --dtype bfloat16 --kv "$kv" \
    --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 --layers 0,1,2,3 \
    --rows 1,2,4,8,16,32,64 --steps 16 --out "$OUT/batched_step_7b_bf16_$kv.json" || echo "batched_step $kv failed: $?"
done

echo "== 2. a CUDA rank beside CPU ranks (gloo), tokens against HF generate on the CPU"
timeout 240 env HF_HUB_OFFLINE=1 "$PY" - "$OUT" <<'EOF' || echo "mixed-device run failed: $?"
import json, subprocess, sys, tempfile
from pathlib import Path
from adaptlink.model.reference import hf_reference
from adaptlink.model.samples import write_sample_requests
from adaptlink.model.tiny import make_tiny
from adaptlink.plans import chain_shares, manual_plan, write_plan

out = Path(sys.argv[1])
work = Path(tempfile.mkdtemp())
ckpt = make_tiny(work / "tiny")
prompts = write_sample_requests(work / "req", n=6, max_new_tokens=12)
plan = manual_plan(str(ckpt), chain_shares(str(ckpt), [2, 2]), in_flight=6)
plan["devices"][1]["torch_device"] = "cuda:0"
path = write_plan(work / "plan.json", plan)
p = subprocess.run([sys.executable, "-m", "adaptlink.launch", "--plan", str(path), "--prompts", str(prompts),
                    "--out", str(work / "out.jsonl"), "--metrics", str(out / "mixed_metrics.json"),
                    "--log-dir", str(out / "mixed_logs")], capture_output=True, text=True, timeout=200)
rows = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()] if (work / "out.jsonl").exists() else []
want = hf_reference(ckpt, prompts)
same = [r.get("tokens") for r in rows] == want
doc = {"returncode": p.returncode, "tokens_equal_hf_cpu": same, "rows": len(rows),
       "stderr_tail": p.stderr[-2000:]}
(out / "mixed_device.json").write_text(json.dumps(doc, indent=1))
print(json.dumps({k: v for k, v in doc.items() if k != "stderr_tail"}))
EOF
echo "== 3. adaptlink serve with the coordinator (rank 0) on cuda:0: 16 clients, a SIGKILL, against adaptlink run"
timeout 300 env HF_HUB_OFFLINE=1 "$PY" experiments/serve_load.py --clients 16 --duration 30 --kill-at 15 \
  --compare-run --coordinator-device cuda:0 --label serve_load_cuda_coordinator > "$OUT/serve_load_cuda.log" 2>&1 \
  || echo "serve_load with a CUDA coordinator failed: $? (see serve_load_cuda.log)"
cp experiments/results/serve_load/serve_load_cuda_coordinator.json "$OUT/" 2>/dev/null || true
tail -3 "$OUT/serve_load_cuda.log" || true

echo "== done; results in $OUT"
ls -la "$OUT"
