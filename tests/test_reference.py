"""The oracle: the block graph run in one process reproduces HF generate exactly."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from adaptlink.model.blocks import LlavaBlocks
from adaptlink.model.graph import block_ids, build_graph
from adaptlink.model.reference import generate, load_reference
from adaptlink.model.samples import sample_requests
from numerics import assert_logits_close

VARIANTS = {
    "gqa-fl-2-default": dict(),
    "mha": dict(text_kv_heads=4),
    "mqa": dict(text_kv_heads=1),
    "fl-1": dict(vision_feature_layer=-1),
    "full": dict(vision_feature_select_strategy="full"),
    "fl-list": dict(vision_feature_layer=[-3, -1]),
    "tied-head": dict(tie_word_embeddings=True),
}


def _batch(processor, requests):
    images = [r["image"] if isinstance(r["image"], Image.Image) else Image.open(r["image"]) for r in requests]
    images = [im.convert("RGB") for im in images]
    return processor(images=images, text=[r["prompt"] for r in requests], return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_blockwise_generation_equals_hf_generate(make_ckpt, name):
    """A left-padded batch of two requests with different prompt lengths and images."""
    ckpt = make_ckpt(**VARIANTS[name])
    model, processor = load_reference(ckpt)
    requests = sample_requests(2, seed=3)
    inputs = _batch(processor, requests)
    assert inputs["attention_mask"].min() == 0, "the batch should need left padding"
    n = 10
    with torch.inference_mode():
        hf = model.generate(**inputs, do_sample=False, max_new_tokens=n,
                            output_scores=True, return_dict_in_generate=True)
    hf_tokens = hf.sequences[:, inputs["input_ids"].shape[1]:]

    # From the checkpoint, each block loaded on its own: the path every rank takes.
    info = LlavaBlocks.from_model(model).info
    blocks = LlavaBlocks.load(str(ckpt), block_ids(info))
    out = generate(blocks, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                   max_new_tokens=n)
    assert out.tokens.tolist() == hf_tokens.tolist()
    assert len(out.logits) == len(hf.scores)
    for ours, theirs in zip(out.logits, hf.scores):
        assert_logits_close(ours, theirs)


def test_a_process_materialises_only_its_blocks(tiny_ckpt):
    G = build_graph(str(tiny_ckpt))
    blocks = LlavaBlocks.load(str(tiny_ckpt), ["decoder.layer.1", "decoder.layer.2"])
    assert blocks.param_bytes() == G.nodes["decoder.layer.1"]["param_bytes"] + G.nodes["decoder.layer.2"]["param_bytes"]
    lm = blocks.model.model.language_model
    assert not lm.layers[1].self_attn.q_proj.weight.is_meta
    assert lm.layers[0].self_attn.q_proj.weight.is_meta
    assert lm.embed_tokens.weight.is_meta and blocks.model.lm_head.weight.is_meta
    assert blocks.model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.is_meta
    with pytest.raises(KeyError, match="not held"):
        blocks.run("decoder.layer.0", {}, None)


def test_split_blocks_match_one_process(tiny_ckpt):
    """Blocks loaded by separate holders and chained by hand give the whole model's tokens."""
    model, processor = load_reference(tiny_ckpt)
    req = sample_requests(1, seed=5)
    inputs = _batch(processor, req)
    whole = generate(LlavaBlocks.from_model(model), inputs["input_ids"], inputs["attention_mask"],
                     inputs["pixel_values"], max_new_tokens=6)
    info = LlavaBlocks.from_model(model).info
    ids = block_ids(info)
    cut = ids.index("decoder.layer.2")
    a, b = LlavaBlocks.load(str(tiny_ckpt), ids[:cut]), LlavaBlocks.load(str(tiny_ckpt), ids[cut:])

    class Chained:  # the reference executor over two holders, as a pipeline would run them
        config, info = a.config, a.info

        @staticmethod
        def new_cache():
            return (a.new_cache(), b.new_cache())

        @staticmethod
        def run_many(seq, x, step):
            from dataclasses import replace
            caches = step.cache if isinstance(step.cache, tuple) else (None, None)
            state = dict(x)
            for holder, cache in ((a, caches[0]), (b, caches[1])):
                mine = [s for s in seq if s in holder.block_ids]
                if mine:
                    state.update(holder.run_many(mine, state, replace(step, cache=cache, memo={})))
            return state

    split = generate(Chained, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                     max_new_tokens=6)
    assert split.tokens.tolist() == whole.tokens.tolist()
    # Not bitwise: MKL picks kernels by pointer alignment, and HF's mmapped weights are
    # 8-byte aligned where ours are 64-byte aligned (~2e-6 on the head's logits).
    for x, y in zip(split.logits, whole.logits):
        assert_logits_close(x, y)


_LOAD_OFFLINE = """
import json, sys
from transformers import AutoProcessor, LlavaForConditionalGeneration
from adaptlink.model.samples import sample_requests
d = sys.argv[1]
proc = AutoProcessor.from_pretrained(d)
model = LlavaForConditionalGeneration.from_pretrained(d).eval()
req = sample_requests(1)[0]
inputs = proc(images=[req["image"]], text=[req["prompt"]], return_tensors="pt")
out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
print(json.dumps({"processor": type(proc).__name__, "n_image": int((inputs["input_ids"] == model.config.image_token_id).sum()),
                  "new": out[0, inputs["input_ids"].shape[1]:].tolist()}))
"""


def test_make_tiny_cli_seed_and_offline_load(tmp_path, capsys):
    """`adaptlink make-tiny DIR --seed N` writes a checkpoint that loads in a fresh offline process."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from adaptlink.cli import main as cli_main
    from adaptlink.model.tiny import read_spec

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert cli_main(["make-tiny", str(tmp_path / name), "--seed", str(seed)]) == 0
    assert read_spec(tmp_path / "a").seed == 5
    wa, wb, wc = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, different weights"
    assert sum(not torch.equal(wa[k], wc[k]) for k in wa) == len(wa), "another seed should redraw every tensor"

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _LOAD_OFFLINE, str(tmp_path / "a")], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["processor"] == "LlavaProcessor"
    assert got["n_image"] == read_spec(tmp_path / "a").image_tokens
    assert len(got["new"]) == 4


def test_rows_finishing_at_eos_match_hf_generate(tiny_ckpt):
    """A row that hits eos is fed pad while the other goes on; both stop as generate stops."""
    model, processor = load_reference(tiny_ckpt)
    inputs = _batch(processor, sample_requests(2, seed=3))
    with torch.inference_mode():
        free = model.generate(**inputs, do_sample=False, max_new_tokens=10)[:, inputs["input_ids"].shape[1]:]
    # An eos that row 0 emits before row 1 does, so that the rows finish at different steps.
    firsts = {t: [row.tolist().index(t) if t in row.tolist() else 99 for row in free] for t in free[0].tolist()}
    eos = next(t for t, (i0, i1) in firsts.items() if i0 < i1 < 9)
    pad = model.config.pad_token_id
    with torch.inference_mode():
        hf = model.generate(**inputs, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad,
                            output_logits=True, return_dict_in_generate=True)
    hf_tokens = hf.sequences[:, inputs["input_ids"].shape[1]:]
    assert hf_tokens.shape[1] < 10 and (hf_tokens[0] == pad).any(), "the case should stop early with a padded row"
    blocks = LlavaBlocks.load(str(tiny_ckpt), block_ids(LlavaBlocks.from_model(model).info))
    out = generate(blocks, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                   max_new_tokens=10, eos_token_ids={eos}, pad_token_id=pad)
    assert out.tokens.tolist() == hf_tokens.tolist()
    assert len(out.logits) == len(hf.logits)
    for ours, theirs in zip(out.logits, hf.logits):
        assert_logits_close(ours, theirs)
