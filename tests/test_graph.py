"""The block graph: structure, exact parameter counts, FLOPs against torch's flop counter, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.cli import main as cli_main
from adaptlink.model.config import ModelInfo, load_config
from partitioner.errors import ModelSourceError
from adaptlink.model.graph import block_ids, build_graph, graph_to_dict


@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-1.5-13b"])
def test_preset_param_total_equals_hf_model(preset):
    from transformers import LlavaForConditionalGeneration

    config = load_config(f"preset:{preset}")
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    G = build_graph(f"preset:{preset}")
    assert G.graph["total_params"] == sum(p.numel() for p in hf.parameters())
    # Blocks + the modules LLaVA never runs (last CLIP layer at feature layer -2, post_layernorm).
    unused = sum(p.numel() for p in hf.model.vision_tower.encoder.layers[-1].parameters()) + \
        sum(p.numel() for p in hf.model.vision_tower.post_layernorm.parameters())
    assert G.graph["unused_params"] == unused
    assert sum(G.nodes[b]["params"] for b in G) + unused == G.graph["total_params"]


def test_llava_7b_published_size():
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters.
    assert build_graph("preset:llava-1.5-7b").graph["total_params"] == 7_063_427_072


def test_graph_shape_is_a_dag_joining_two_branches():
    G = build_graph("preset:llava-1.5-7b")
    assert nx.is_directed_acyclic_graph(G)
    assert sorted(G.predecessors("merge")) == ["projector", "text.embed"]
    assert [n for n in G if G.in_degree(n) == 0] == ["vision.embed", "text.embed"]
    assert [n for n in G if G.out_degree(n) == 0] == ["head"]
    # feature layer -2 of 24: layers 0..22 run, 23 never does.
    assert "vision.layer.22" in G and "vision.layer.23" not in G
    assert sum(1 for n in G if n.startswith("decoder.layer.")) == 32
    assert G.nodes["decoder.layer.0"]["kv_bytes_per_token"] == 2 * 4096 * 4
    assert G.edges["merge", "decoder.layer.0"]["bytes_prefill"] == 640 * 4096 * 4


@pytest.mark.parametrize("fl,used", [(-1, 3), (-2, 2), (1, 1), ([-3, -1], 3), ([1, 2], 2)])
def test_only_vision_layers_up_to_the_feature_layer(make_ckpt, fl, used):
    G = build_graph(str(make_ckpt(vision_feature_layer=fl)))
    assert [n for n in G if n.startswith("vision.layer.")] == [f"vision.layer.{i}" for i in range(used)]


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(text_kv_heads=4, vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
    dict(text_model="mistral", sliding_window=12),  # decode attends to the window only
    dict(text_model="qwen2", vision_model="siglip", sliding_window=10, max_window_layers=2),
])
def test_flops_agree_with_torch_flop_counter(make_ckpt, overrides):
    """Every block's prefill and decode FLOPs within 5% of what torch counts on the real modules."""
    ckpt = str(make_ckpt(**overrides))
    config = load_config(ckpt)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"  # CPU sdpa is invisible to FlopCounterMode; eager is matmuls
    info = ModelInfo.from_config(config)
    S, images = 40, 2
    G = build_graph(ckpt, prefill_tokens=S, decode_tokens=0, images_per_request=images, config=config)
    blocks = LlavaBlocks.load(ckpt, block_ids(info), config=config)
    vc = config.vision_config
    ids = torch.randint(5, 100, (1, S))
    ids[0, 3:3 + images * info.image_tokens] = info.image_token_id
    px = torch.randn(images, 3, vc.image_size, vc.image_size)

    measured = {}
    x = {"pixel_values": px}
    for b in block_ids(info)[: info.vision_layers_used + 2]:
        measured[b] = (_count(lambda: x.update(blocks.run(b, x, Step(ids)))), 0)
    text = block_ids(info)[info.vision_layers_used + 2:]
    feats = x["image_features"]
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    # Prefill of S tokens.
    xp, step = {"input_ids": ids, "image_features": feats}, Step.prefill(ones(S), cache=blocks.new_cache())
    prefill = {b: _count(lambda: xp.update(blocks.run(b, xp, step))) for b in text}
    # One decode step at context S: prefill S-1 tokens, then count the S-th.
    step = Step.prefill(ones(S - 1), cache=blocks.new_cache())
    blocks.run_many(text, {"input_ids": ids[:, :S - 1], "image_features": feats}, step)
    xd, step = {"input_ids": ids[:, S - 1:]}, step.next(ones(S))
    decode = {b: _count(lambda: xd.update(blocks.run(b, xd, step))) for b in text}
    measured.update({b: (prefill[b], decode[b]) for b in text})

    for b, (fp, fd) in measured.items():
        node = G.nodes[b]
        for name, got, want in (("prefill", fp, node["flops_prefill"]), ("decode", fd, node["flops_decode"])):
            if want == 0:
                assert got == 0, f"{b} {name}: torch counts {got} FLOPs, graph says 0"
            else:
                assert abs(got - want) <= 0.05 * want, f"{b} {name}: torch {got}, graph {want}"


def test_graph_json_cli(capsys):
    assert cli_main(["graph", "--model", "preset:llava-1.5-7b", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_params"] == 7_063_427_072
    assert doc["blocks"][0]["id"] == "vision.embed" and doc["blocks"][-1]["id"] == "head"
    assert {"params", "param_bytes", "flops_prefill", "flops_decode", "out_bytes_prefill",
            "kv_bytes_per_token"} <= set(doc["blocks"][0])
    assert graph_to_dict(build_graph("preset:llava-1.5-7b"))["blocks"] == doc["blocks"]


def _write_config(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return str(tmp_path)


@pytest.mark.parametrize("source,needle", [
    ("preset:llava-9b", "unknown preset 'llava-9b'"),
    ("/nonexistent/dir", "not a checkpoint directory"),
])
def test_bad_sources_are_named(source, needle):
    with pytest.raises(ModelSourceError, match=needle):
        load_config(source)


def test_not_llava_and_out_of_range_feature_layer(tmp_path, make_ckpt):
    with pytest.raises(ModelSourceError, match="model_type: 'bert' is not supported \\(supported: 'llava'"):
        load_config(_write_config(tmp_path, model_type="bert"))
    ckpt = make_ckpt()
    cfg = json.loads((ckpt / "config.json").read_text())
    for bad, needle in ((7, "out of range"), (0, "not supported")):
        d = tmp_path / f"fl{bad}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, "vision_feature_layer": bad}))
        with pytest.raises(ModelSourceError, match=f"vision_feature_layer: .*{needle}"):
            load_config(str(d))


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "adaptlink.cli", "graph", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{tmp_path}: not a LLaVA checkpoint: no config.json" in r.stderr


@pytest.mark.parametrize("case,needle", [
    ("preset", "preset:llava-9b: unknown preset 'llava-9b'"),
    ("feature-layer", "vision_feature_layer: 9 is out of range for a vision tower of 3 layers"),
    ("bert", "model_type: 'bert' is not supported (supported: 'llava' (LlavaForConditionalGeneration), "
             "'llava_next' (LlavaNextForConditionalGeneration))"),
    ("onevision", "model_type: 'llava_onevision' is not supported"),
    ("next-full-clip", "vision_feature_select_strategy: 'full' with 'clip_vision_model' leaves a class token"),
    ("json-list", "not a LLaVA config: expected a JSON object, got list"),
    ("pixtral", "vision_config.model_type: 'pixtral' is not supported (supported: 'clip_vision_model', "
                "'siglip_vision_model')"),
    ("gemma", "text_config.model_type: 'gemma' is not supported (supported: 'llama', 'mistral', 'qwen2')"),
    ("prefill", "--prefill-tokens: must be >= 1, got 0"),
])
def test_cli_bad_inputs_one_line_exit_2(tmp_path, make_ckpt, capsys, case, needle):
    cfg = json.loads((make_ckpt() / "config.json").read_text())
    docs = {
        "feature-layer": {**cfg, "vision_feature_layer": 9},
        "bert": {"model_type": "bert"},
        "onevision": {**cfg, "model_type": "llava_onevision"},
        "next-full-clip": {**cfg, "model_type": "llava_next", "vision_feature_select_strategy": "full",
                           "image_grid_pinpoints": [[32, 64]]},
        "json-list": [1, 2],
        "pixtral": {**cfg, "vision_config": {**cfg["vision_config"], "model_type": "pixtral"}},
        "gemma": {**cfg, "text_config": {**cfg["text_config"], "model_type": "gemma"}},
    }
    if case == "preset":
        argv = ["graph", "--model", "preset:llava-9b"]
    elif case == "prefill":
        argv = ["graph", "--model", "preset:llava-1.5-7b", "--prefill-tokens", "0"]
    else:
        (tmp_path / "config.json").write_text(json.dumps(docs[case]))
        argv = ["graph", "--model", str(tmp_path)]
    capsys.readouterr()  # drop what building the fixture checkpoint printed
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adaptlink graph: error: "), err
    assert needle in err
    if case not in ("preset", "prefill"):
        assert str(tmp_path) in err


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_param_total_and_bytes_per_dtype(make_ckpt, tie):
    """A checkpoint's graph counts what HF loads from it; bytes scale with the dtype."""
    from transformers import LlavaForConditionalGeneration

    ckpt = str(make_ckpt(tie_word_embeddings=True) if tie else make_ckpt())
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, local_files_only=True)
    G = build_graph(ckpt)
    assert G.graph["total_params"] == sum(p.numel() for p in hf.parameters())
    assert G.graph["unused_params"] == sum(p.numel() for p in hf.model.vision_tower.encoder.layers[-1].parameters()) \
        + sum(p.numel() for p in hf.model.vision_tower.post_layernorm.parameters())
    head_params = hf.lm_head.weight.numel() + hf.model.language_model.norm.weight.numel()
    assert G.nodes["head"]["param_bytes"] == 4 * head_params  # a tied head's holder stores its own copy
    assert G.nodes["head"]["params"] == head_params - (hf.lm_head.weight.numel() if tie else 0)
    half = build_graph(ckpt, dtype="bfloat16")
    for b in G:
        assert half.nodes[b]["param_bytes"] * 2 == G.nodes[b]["param_bytes"]
    layer = sum(p.numel() for p in hf.model.language_model.layers[0].parameters())
    assert G.nodes["decoder.layer.0"]["params"] == layer and G.nodes["decoder.layer.0"]["param_bytes"] == 4 * layer


@pytest.mark.parametrize("overrides", [dict(), dict(vision_feature_layer=[1, -1], vision_feature_select_strategy="full"),
                                       dict(vision_feature_layer=[-1, -1]),  # a layer picked twice travels once
                                       dict(text_model="mistral", text_kv_heads=1),
                                       dict(text_model="qwen2", vision_model="siglip")])
def test_out_and_kv_bytes_are_the_real_tensors(make_ckpt, overrides):
    """Edge bytes equal the tensors a block really hands on; KV bytes what its cache really holds."""
    ckpt = str(make_ckpt(**overrides))
    config = load_config(ckpt)
    info = ModelInfo.from_config(config)
    S, images = 40, 2
    G = build_graph(ckpt, prefill_tokens=S, decode_tokens=0, images_per_request=images)
    blocks = LlavaBlocks.load(ckpt, block_ids(info))
    vc = config.vision_config
    ids = torch.randint(5, 100, (1, S))
    ids[0, 3:3 + images * info.image_tokens] = info.image_token_id

    def nbytes(out, b):
        if b == "head":  # only the token goes on; logits stay with the head
            out = {"token": out["token"]}
        return sum(t.numel() * t.element_size() for t in out.values())

    x = {"pixel_values": torch.randn(images, 3, vc.image_size, vc.image_size), "input_ids": ids}
    cache = blocks.new_cache()
    step = Step.prefill(torch.ones(1, S, dtype=torch.long), cache=cache)
    for b in block_ids(info):
        out = blocks.run(b, x, step)
        # What crosses each out-edge is this block's output (vision outputs replace the carried state).
        if b.startswith("vision."):
            x = {k: v for k, v in x.items() if not k.startswith("vision_")}
        x.update(out)
        assert nbytes(out, b) == G.nodes[b]["out_bytes_prefill"], b
        for _, dst, d in G.out_edges(b, data=True):
            assert d["bytes_prefill"] == nbytes(out, b), (b, dst)
    step = step.next(torch.ones(1, S + 1, dtype=torch.long))
    x = {"input_ids": x["token"][:, None]}
    for b in block_ids(info)[info.vision_layers_used + 2:]:
        out = blocks.run(b, x, step)
        x.update(out)
        assert nbytes(out, b) == G.nodes[b]["out_bytes_decode"], b
    for i in range(info.text_layers):
        layer = cache.layers[i]
        kv = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        assert kv == (S + 1) * G.nodes[f"decoder.layer.{i}"]["kv_bytes_per_token"]
