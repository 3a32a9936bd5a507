"""The block graph: structure, exact parameter counts, FLOPs against torch's flop counter, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptlink.blocks import LlavaBlocks, Step
from adaptlink.cli import main as cli_main
from adaptlink.config import ModelInfo, load_config
from adaptlink.errors import ModelSourceError
from adaptlink.graph import block_ids, build_graph, graph_to_dict


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
    with pytest.raises(ModelSourceError, match="model_type: expected 'llava', got 'bert'"):
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
