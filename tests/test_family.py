"""The LLaVA family beyond LLaMA + CLIP: Mistral (sliding window) and Qwen2 (biased q/k/v)
decoders, SigLIP towers (no class token), each equal to HF `generate` on each request alone.

Per combination, a tiny random checkpoint saved with `save_pretrained` (processor offline):
(a) three in-process ranks (vision apart from the decoder, the decoder split 1:3, several
requests in flight, packed micro-batches) give HF's tokens; (b) packed micro-batches with
chunked prefills beside decode rows, through the growing and the slot KV store, give HF's
tokens and logits (a window shorter than the prompts, so the sliding window matters); (c)
the graph's parameter total is HF's `sum(p.numel())`. FLOPs against FlopCounterMode are in
tests/test_graph.py (the same test, these combinations added).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptlink.cli import main as cli_main
from adaptlink.model.blocks import LlavaBlocks
from adaptlink.model.config import ModelInfo, load_config
from adaptlink.model.graph import block_ids, build_graph
from adaptlink.model.reference import eos_ids, generate, hf_reference, load_reference
from adaptlink.model.samples import sample_images, write_sample_requests
from numerics import assert_logits_close
from partitioner.types import Plan
from plans import manual_plan, write_plan
from runtime.requests import read_prompts
from runtime.scheduler import BatchLimits
from test_batched import REQUESTS, _drive, _hf_alone, _requests
from test_runtime import Bus, _coordinator, _record_logits, _record_rows

# Windows shorter than the prompts (16+ image tokens + text), so that they change the result.
COMBOS = {
    "llava-mistral-clip": dict(text_model="mistral", sliding_window=12),
    "llava-qwen2-siglip": dict(text_model="qwen2", vision_model="siglip", vision_feature_layer=-1,
                               vision_feature_select_strategy="full", sliding_window=10, max_window_layers=2),
    "next-mistral-clip": dict(model_class="llava_next", text_model="mistral", sliding_window=24),
    "next-llama-clip": dict(model_class="llava_next", vision_feature_layer=[-3, -1]),
}
LLAVA = [c for c in COMBOS if c.startswith("llava-")]
# (width, height): square, wide, tall, small; NeXT picks another grid (and token count) for each
SIZES = [(48, 40), (90, 30), (30, 70), (64, 64), (20, 20)]


@pytest.fixture(scope="module", params=list(COMBOS))
def combo(request, make_ckpt):
    return request.param, make_ckpt(**COMBOS[request.param])


@pytest.fixture(scope="module", params=LLAVA)
def llava_combo(request, make_ckpt):
    return request.param, make_ckpt(**COMBOS[request.param])


def test_the_checkpoint_is_what_it_says(combo):
    name, ckpt = combo
    model, processor = load_reference(ckpt)
    lm, vt = model.model.language_model, model.model.vision_tower
    info = ModelInfo.from_config(load_config(str(ckpt)))
    assert type(model).__name__ == ("LlavaNextForConditionalGeneration" if name.startswith("next")
                                    else "LlavaForConditionalGeneration")
    if "mistral" in name:
        window = COMBOS[name]["sliding_window"]
        assert type(lm).__name__ == "MistralModel" and info.windows == (window,) * 4
    elif "qwen2" in name:
        assert type(lm).__name__ == "Qwen2Model" and lm.layers[0].self_attn.q_proj.bias is not None
        assert type(vt).__name__ == "SiglipVisionModel" and not info.class_token
        assert info.windows == (None, None, 10, 10) and info.image_tokens == 16
    if name.startswith("next"):
        # the processor's count for each size is the one the graph and planner use
        counts = []
        for w, h in SIZES:
            enc = processor(images=[sample_images(1, size=(w, h))[0]], text=["<image> hi"], return_tensors="pt")
            counts.append(int((enc["input_ids"] == info.image_token_id).sum()))
            assert counts[-1] == info.image_tokens_for(w, h) == info.for_image(w, h).image_tokens, (w, h)
            assert enc["pixel_values"].shape[1] == info.for_image(w, h).tiles_per_image
        assert len(set(counts)) == len(SIZES)


def test_three_ranks_equal_hf_generate_alone(combo, tmp_path):
    """Vision on its own rank, the decoder split 1:3 (rank 0 holds layer 0, rank 2 layers 1-3),
    4 requests in flight in micro-batches of up to 3 rows and 160 tokens (several images in
    one), images of different sizes: tokens and logits as HF's, each request alone."""
    name, ckpt = combo
    src = str(ckpt)
    ids = block_ids(ModelInfo.from_config(load_config(src)))
    vision = ids[: ids.index("text.embed")]
    dec = [b for b in ids if b.startswith("decoder.layer.")]
    shares = [["text.embed", "merge", dec[0], "head"], vision, dec[1:]]
    prompts = write_sample_requests(tmp_path, n=5, seed=3, max_new_tokens=10, sizes=SIZES)
    ref_tokens, ref_logits = hf_reference(ckpt, prompts, output_logits=True)
    plan = Plan.from_dict(manual_plan(src, shares, in_flight=4))
    bus = Bus(plan, src)
    coord, failed = _coordinator(bus, plan, ckpt, prompts, in_flight=4,
                                 limits=BatchLimits(rows=3, tokens=160))
    logits = _record_logits(bus, coord)
    rows = _record_rows(bus, coord)
    results = coord.run()
    assert not failed
    assert [r.tokens for r in results] == ref_tokens
    for r, want in zip(results, ref_logits):
        assert_logits_close(torch.stack([logits[(r.id, k)] for k in range(len(r.tokens))]), want, r.id)
    assert bus.overlaps(ranks_a={1}, decode_b=True)  # one image encoded while another request decoded
    # the vision rank ran several requests' images (NeXT: their tiles) in one micro-batch
    assert any(sum(r[4] for r in mb) >= 2 for mb in rows), rows
    if name.startswith("next"):  # the image token counts differ by request
        _, processor = load_reference(ckpt)
        image = processor.tokenizer.convert_tokens_to_ids("<image>")
        lens = {r.id: int((r.input_ids == image).sum()) for r in coord_requests(prompts, processor)}
        assert len(set(lens.values())) >= 4, lens


def coord_requests(prompts, processor):
    return read_prompts(prompts, processor)[0]


@pytest.mark.parametrize("store", [{}, dict(slots=5, max_tokens=96)], ids=["growing", "slots"])
def test_packed_micro_batches_equal_hf_generate_alone(llava_combo, store):
    """Chunked prefills beside decode rows, requests joining and leaving, through the sliding
    window of the packed attention; and the one-request path (HF's sliding cache and mask)."""
    _, ckpt = llava_combo
    model, processor = load_reference(ckpt)
    blocks = LlavaBlocks.load(str(ckpt), block_ids(ModelInfo.from_config(model.config)))
    reqs = _requests(processor, blocks.info.image_token_id)
    assert max(len(r.ids) for r in reqs) > 2 * max(w or 0 for w in blocks.info.windows)
    want = {r.id: _hf_alone(model, r) for r in reqs}
    _drive([(blocks, blocks.block_ids, blocks.new_kv_store(**store))], reqs, eos_ids(blocks.config),
           blocks.info.image_token_id)
    for r in reqs:
        tokens, logits = want[r.id]
        assert r.tokens == tokens, r.id
        assert_logits_close(torch.stack(r.logits), logits, r.id)
    one = _requests(processor, blocks.info.image_token_id, [s for s in REQUESTS if s[0] == "d"])[0]
    alone = generate(blocks, one.ids[None], None, one.pixel_values, max_new_tokens=one.max_new)
    assert alone.tokens[0].tolist() == want["d"][0]


def test_graph_total_equals_hf_numel(combo):
    _, ckpt = combo
    model, _ = load_reference(ckpt)
    G = build_graph(str(ckpt))
    assert G.graph["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(G.nodes[b]["params"] for b in G) + G.graph["unused_params"] == G.graph["total_params"]


FAMILY_PRESETS = ["bakllava-v1", "llava-interleave-qwen-7b", "llava-v1.6-mistral-7b", "llava-v1.6-vicuna-7b",
                  "llava-v1.6-vicuna-13b"]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_preset_graph_json_total_equals_hf_numel(preset, capsys):
    """`adaptlink graph --model preset:NAME --json` counts what HF builds from the same config."""
    from transformers import AutoModelForImageTextToText

    config = load_config(f"preset:{preset}")
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    assert cli_main(["graph", "--model", f"preset:{preset}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_params"] == sum(p.numel() for p in hf.parameters())
    assert sum(b["params"] for b in doc["blocks"]) + doc["unused_params"] == doc["total_params"]


def test_next_survives_a_sigkill_with_identical_tokens(make_ckpt, tmp_path):
    """3 real gloo ranks on a NeXT checkpoint (pixel tiles and image_sizes over the wire, vision
    on the coordinator), rank 2 SIGKILLed mid-generation: every request finishes with HF's tokens."""
    ckpt = make_ckpt(**COMBOS["next-mistral-clip"])
    src = str(ckpt)
    ids = block_ids(ModelInfo.from_config(load_config(src)))
    dec = [b for b in ids if b.startswith("decoder.layer.")]
    shares = [[b for b in ids if not b.startswith("decoder.layer.")], dec[:2], dec[2:]]
    plan = write_plan(tmp_path / "plan.json", manual_plan(src, shares, backups={1: 2, 2: 1}, in_flight=3))
    prompts = write_sample_requests(tmp_path / "req", n=5, seed=5, max_new_tokens=10, sizes=SIZES)
    want = hf_reference(ckpt, prompts)
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "adaptlink.launch", "--plan", str(plan), "--prompts", str(prompts),
                        "--out", str(out), "--metrics", str(metrics), "--inject", "kill:rank=2,after_tokens=12",
                        "--max-batch-rows", "3", "--max-batch-tokens", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["tokens"] for x in out.read_text().splitlines()] == want
    m = json.loads(metrics.read_text())
    assert [f["rank"] for f in m["failovers"]] == [2] and m["replay_mismatches"] == 0


@pytest.mark.parametrize("size", [(90, 30), (64, 64)])
def test_next_graph_follows_the_image_size(make_ckpt, size, capsys):
    """`graph --image-size WxH` on a NeXT checkpoint: its image tokens are the processor's for
    that size, and the vision blocks' and projector's FLOPs are within 5% of what torch counts
    running them on that image's tiles."""
    ckpt = make_ckpt(**COMBOS["next-llama-clip"])
    config = load_config(str(ckpt))
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"  # CPU sdpa is invisible to FlopCounterMode
    info = ModelInfo.from_config(config)
    _, processor = load_reference(ckpt)
    enc = processor(images=[sample_images(1, size=size)[0]], text=["<image> hi"], return_tensors="pt")
    tokens = int((enc["input_ids"] == info.image_token_id).sum())

    assert cli_main(["graph", "--model", str(ckpt), "--image-size", f"{size[0]}x{size[1]}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["image_tokens"] == tokens and doc["tiles_per_image"] == enc["pixel_values"].shape[1]
    assert doc["prefill_tokens"] == max(640, tokens + 64)
    nodes = build_graph(str(ckpt), image_size=size, config=config, prefill_tokens=tokens + 8).nodes
    blocks = LlavaBlocks.load(str(ckpt), block_ids(info), config=config)
    x = {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}
    for b in block_ids(info)[: info.vision_layers_used + 2]:
        with FlopCounterMode(display=False) as fc:
            out = blocks.run(b, x, None)
        x = {k: v for k, v in x.items() if not k.startswith("vision_")} | out  # outputs replace the chain's state
        assert sum(t.numel() * t.element_size() for t in out.values()) == nodes[b]["out_bytes_prefill"], b
        want = nodes[b]["flops_prefill"]
        assert abs(fc.get_total_flops() - want) <= 0.05 * want, (b, fc.get_total_flops(), want)
    assert x["image_features"].shape[0] == tokens
    assert nodes["projector"]["out_bytes_prefill"] == tokens * config.text_config.hidden_size * 4
