"""The profiler: measured compute and links, cluster.json in and out (emulation knobs
themselves: test_emulation.py).

The multi-rank test starts two real gloo ranks on 127.0.0.1 (`adaptlink profile --local 2`)
and checks the measurements against the knobs that were set: a 2x slowdown must show as
2x, an emulated 100 Mbit/s link as 100 Mbit/s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from adaptlink import cli
from adaptlink.model.graph import build_graph
from adaptlink.profiler import (KINDS, ProfileError, ProfileOptions, fit_probe, measure_compute,
                                predict_request_s, usable_memory)
from partitioner.validate import load_cluster
from runtime.auth import RunSecret

# Big enough that a decoder layer's prefill takes milliseconds, not microseconds of python.
MID = dict(text_hidden=256, text_intermediate=1024, text_heads=4, text_kv_heads=4,
           vision_hidden=128, vision_intermediate=512, image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def mid_ckpt(make_ckpt):
    return make_ckpt(**MID)


@pytest.fixture(scope="module")
def small_ckpt(tiny_ckpt):
    """The default tiny checkpoint (16 image tokens, 4 decoder layers, 2 vision layers used)."""
    return tiny_ckpt


# ---------------------------------------------------------------------------- measurement


def test_fit_probe_recovers_bandwidth_and_one_way_latency():
    bw, lat = 12.5e6, 0.002
    samples = [(s, 2 * lat + s / bw + 1e-5 * (i % 3)) for i in range(9) for s in (0, 2**18, 2**20)]
    fit = fit_probe(samples)
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(bw, rel=1e-3)
    assert fit["latency_s"] == pytest.approx(lat, rel=1e-2)


def test_fit_probe_on_a_link_too_fast_to_tell_gives_a_lower_bound():
    samples = [(s, 0.002) for s in (0, 2**20, 2**22) for _ in range(3)]
    fit = fit_probe(samples)
    assert fit["bandwidth_lower_bound"] is True
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(2**22 / 0.002)


def test_measure_compute_every_kind_and_the_prediction(small_ckpt):
    opts = ProfileOptions(model=str(small_ckpt), prefill_tokens=32, decode_tokens=8, warmup=1,
                          repeats=3, min_repeats=3)
    m = measure_compute(opts, slowdown=3.0)
    assert m["prefill_tokens"] == 32 and m["decode_context"] == 36
    assert set(m["blocks"]) == set(KINDS)
    for kind, t in m["blocks"].items():
        assert t["prefill_s"] > 0 and t["spread"] >= 0
        # Each padded run lasts at least 3 x the fastest run (the padder's reference), and
        # the fastest run is >= median * (1 - spread): so the padded median is at least that.
        # (Not 3 x the median: a run slower than the fastest is padded less, or not at all.)
        # Unpadded runs would pass only with a spread over 2/3 in every measurement.
        for phase in ("prefill", "decode") if "decode_repeats" in t else ("prefill",):
            fastest = t[f"{phase}_s"] * (1 - t[f"{phase}_spread"] - 1e-4)
            assert t[f"{phase}_repeats"] == 3
            assert t[f"emulated_{phase}_s"] >= 3.0 * fastest, (phase, t)
        if kind.startswith("vision") or kind == "projector":
            assert t["decode_s"] == 0 and "decode_repeats" not in t
        else:
            assert t["decode_s"] > 0
    G = build_graph(str(small_ckpt), prefill_tokens=32, decode_tokens=8)
    b = m["blocks"]
    by_hand = (b["vision_embed"]["prefill_s"] + 2 * b["vision_layer"]["prefill_s"] + b["projector"]["prefill_s"]
               + sum(b[k]["prefill_s"] + 8 * b[k]["decode_s"] for k in ("text_embed", "merge", "head"))
               + 4 * (b["decoder_layer"]["prefill_s"] + 8 * b["decoder_layer"]["decode_s"]))
    assert predict_request_s(m, G) == pytest.approx(by_hand)


def test_text_kinds_are_timed_at_each_row_count_through_the_batched_path(small_ckpt, monkeypatch):
    from adaptlink.model.blocks import LlavaBlocks
    from partitioner.costs import measured_seconds
    from partitioner.types import Workload
    from partitioner.validate import cluster_from_dict

    shapes = []
    real = LlavaBlocks.run_batch

    def spy(self, ids, mb, x, kv=None, **kw):
        shapes.append((ids[0], len(mb), mb.T))
        return real(self, ids, mb, x, kv, **kw)

    monkeypatch.setattr(LlavaBlocks, "run_batch", spy)
    opts = ProfileOptions(model=str(small_ckpt), prefill_tokens=32, decode_tokens=8, rows=(1, 4),
                          prefill_counts=(16, 32), repeats=2, min_repeats=2, budget_s=0.1)
    m = measure_compute(opts)
    for kind, t in m["blocks"].items():
        if kind.startswith("vision") or kind == "projector":
            assert "decode_s_by_rows" not in t and "prefill_s_by_tokens" not in t
            continue
        assert set(t["decode_s_by_rows"]) == {"1", "4"} and set(t["prefill_s_by_tokens"]) == {"16", "32"}
        assert t["decode_s"] == t["decode_s_by_rows"]["1"] and t["prefill_s"] == t["prefill_s_by_tokens"]["32"]
        assert all(v > 0 for v in t["decode_s_by_rows"].values())
        # a decode of 4 rows ran as one micro-batch of 4 rows, 1 token each
        assert (f"{'decoder.layer.0' if kind == 'decoder_layer' else t['block']}", 4, 4) in shapes
    cl = cluster_from_dict({"schema": "adaptlink.cluster/2", "devices": [
        {"name": "cpu0", "memory_bytes": 10**9, "compute": {"measured": m}}],
        "links": {"default": {"bandwidth_bytes_per_s": 1e9, "latency_s": 1e-4}}})
    got = measured_seconds(cl.devices[0].compute["measured"], "decoder_layer", Workload(32, 8, batch_rows=4))
    assert got == (m["blocks"]["decoder_layer"]["prefill_s"], m["blocks"]["decoder_layer"]["decode_s_by_rows"]["4"])


def test_layer_kinds_are_timed_over_distinct_layers_up_to_cycle_bytes(small_ckpt):
    """A layer timed alone again and again runs from cache; a stage reads every layer's weights.
    So layers are timed back to back over distinct copies (time per layer), bounded in bytes."""
    from adaptlink.model.blocks import LlavaBlocks
    from adaptlink.model.config import load_config
    from adaptlink.profiler import _layer_copies

    def opts(cycle_bytes):
        return ProfileOptions(model=str(small_ckpt), prefill_tokens=32, warmup=0, repeats=1, min_repeats=1,
                              kinds=("decoder_layer", "vision_layer", "head"), cycle_bytes=cycle_bytes)

    m = measure_compute(opts(1 << 30))
    assert m["blocks"]["decoder_layer"]["copies"] == 4 and m["blocks"]["vision_layer"]["copies"] == 2
    assert "copies" not in m["blocks"]["head"]
    blocks = LlavaBlocks.load("preset:profile", ["decoder.layer.0"], config=load_config(str(small_ckpt)))
    layer = blocks.param_bytes()
    assert _layer_copies(blocks, opts(3 * layer))["decoder_layer"] == [f"decoder.layer.{i}" for i in range(3)]
    assert _layer_copies(blocks, opts(0))["decoder_layer"] == ["decoder.layer.0"]
    one = measure_compute(opts(0))["blocks"]["decoder_layer"]
    assert "copies" not in one and one["prefill_s"] > 0 and one["decode_s"] > 0


def test_profiling_a_checkpoint_reads_only_its_config(small_ckpt, tmp_path):
    """Random weights from the config: a directory with config.json and no weights is enough."""
    cfg_only = tmp_path / "config-only"
    cfg_only.mkdir()
    shutil.copy(small_ckpt / "config.json", cfg_only / "config.json")
    opts = ProfileOptions(model=str(cfg_only), prefill_tokens=32, warmup=0, repeats=1, min_repeats=1,
                          kinds=("decoder_layer", "head"))
    m = measure_compute(opts)
    assert set(m["blocks"]) == {"decoder_layer", "head"}
    assert all(t["prefill_s"] > 0 and t["decode_s"] > 0 for t in m["blocks"].values())


def test_usable_memory_is_free_minus_the_stated_reserve_split_among_ranks():
    for reserve, rule in ((None, "max(1 GiB, 10% of total)"), ("10%", "10% of total"), ("1MiB", "1MiB")):
        u = usable_memory("cpu", reserve, shared_by=2)
        m = u["memory"]
        expected = {None: max(2**30, m["total_bytes"] // 10), "10%": int(m["total_bytes"] * 10.0 / 100),
                    "1MiB": 2**20}[reserve]
        assert m["reserve_bytes"] == expected and m["reserve_rule"] == rule and m["shared_by"] == 2
        assert u["memory_bytes"] == (m["free_bytes"] - expected) // 2 > 0
    with pytest.raises(ProfileError, match="--memory-reserve"):
        usable_memory("cpu", "100%")


def test_too_few_prefill_tokens_for_the_image(small_ckpt, capsys):
    rc = cli.main(["profile", "--model", str(small_ckpt), "--prefill-tokens", "4", "--out", "/dev/null"])
    assert rc == 2
    assert "--prefill-tokens: 4 cannot hold 1 image(s) of 16 tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------------- cluster.json


def _jetson() -> dict:
    """A device not at hand, from datasheet figures."""
    return {"schema": "adaptlink.cluster/1", "name": "edge",
            "devices": [{"name": "jetson", "host": "10.0.0.7", "torch_device": "cuda:0", "dtype": "float16",
                         "threads": 6, "memory_bytes": 30_000_000_000,
                         "compute": {"roofline": {"flops_per_s": 5.3e12, "memory_bytes_per_s": 1.0e11}}}],
            "links": {"default": {"bandwidth_bytes_per_s": 1.25e8, "latency_s": 0.001}}}


def test_hand_written_cluster_is_accepted(tmp_path, capsys):
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(_jetson()))
    assert cli.main(["profile", "--check", str(path)]) == 0
    assert "valid adaptlink.cluster/1, 1 devices" in capsys.readouterr().out


@pytest.mark.parametrize("breakage, field", [
    (lambda d: d["devices"][0].update(memory_bytes=-5), "devices[0].memory_bytes"),
    (lambda d: d["devices"][0].pop("memory_bytes"), "devices[0].memory_bytes"),
    (lambda d: d["devices"][0].pop("compute"), "devices[0].compute"),
    (lambda d: d["devices"][0]["compute"]["roofline"].pop("flops_per_s"), "devices[0].compute.roofline.flops_per_s"),
    (lambda d: d.update(schema="adaptlink.cluster/0"), "schema"),
    (lambda d: d["links"].pop("default"), "links.default"),
    (lambda d: d["devices"][0]["compute"].update(measured={"prefill_tokens": 64, "blocks": {
        "decoder_layer": {"prefill_s": 0.01}}}), "devices[0].compute.measured.blocks.decoder_layer.decode_s"),
    (lambda d: d["devices"][0]["compute"].update(measured={"blocks": {
        "decoder_layer": {"prefill_s": 0.01, "decode_s": 0.001}}}), "devices[0].compute.measured.prefill_tokens"),
    (lambda d: d["devices"][0].update(emulation={"slowdown": "2x"}), "devices[0].emulation.slowdown"),
    (lambda d: d["links"].update(pairs=[{"src": "jetson", "dst": "nowhere", "bandwidth_bytes_per_s": 1,
                                         "latency_s": 0}]), "links.pairs[0].dst"),
])
def test_malformed_cluster_exits_2_naming_file_and_field(tmp_path, breakage, field):
    d = _jetson()
    breakage(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    proc = subprocess.run([sys.executable, "-m", "adaptlink.cli", "profile", "--check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: {field}:" in proc.stderr


def test_unreadable_cluster_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text(json.dumps(_jetson())[:-20])
    proc = subprocess.run([sys.executable, "-m", "adaptlink.cli", "profile", "--check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: not valid JSON" in proc.stderr


def test_lone_device_profile_merged_with_a_hand_written_one(small_ckpt, tmp_path):
    edge = tmp_path / "edge.json"
    edge.write_text(json.dumps(_jetson()))
    out = tmp_path / "cluster.json"
    rc = cli.main(["profile", "--model", str(small_ckpt), "--out", str(out), "--prefill-tokens", "32",
                   "--warmup", "0", "--repeats", "1", "--min-repeats", "1", "--kinds", "decoder_layer,head",
                   "--memory-cap", "1GiB", "--merge", str(edge), "--names", "laptop"])
    assert rc == 0
    cluster = load_cluster(out)  # the partitioner's loader accepts what we write
    assert [d.name for d in cluster.devices] == ["laptop", "jetson"]
    laptop = json.loads(out.read_text())["devices"][0]
    assert laptop["emulation"] == {"slowdown": 1.0, "memory_cap_bytes": 2**30}
    assert set(laptop["compute"]["measured"]["blocks"]) == {"decoder_layer", "head"}
    assert laptop["memory"]["reserve_bytes"] >= 2**30 and laptop["memory_bytes"] > 0


# ---------------------------------------------------------------------------- two ranks


def test_two_local_ranks_slowdown_and_emulated_link(mid_ckpt, tmp_path):
    """Rank 1 is emulated 2x slower; the link between them is emulated at 100 Mbit/s."""
    out = tmp_path / "cluster.json"
    cmd = [sys.executable, "-m", "adaptlink.cli", "profile", "--model", str(mid_ckpt), "--out", str(out),
           "--local", "2", "--threads", "1", "--slowdown", "1,2", "--link-bandwidth", "100Mbit",
           "--prefill-tokens", "128", "--repeats", "9", "--min-repeats", "9",
           "--kinds", "vision_layer,decoder_layer,head",
           "--link-sizes", "0,256KiB,1MiB", "--timeout", "120"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cluster = load_cluster(out)
    d = json.loads(out.read_text())
    fast, slow = (x["compute"]["measured"]["blocks"] for x in d["devices"])
    assert [x["threads"] for x in d["devices"]] == [1, 1]
    assert d["devices"][0]["emulation"] is None
    assert d["devices"][1]["emulation"] == {"slowdown": 2.0, "memory_cap_bytes": None}
    assert cluster.devices[1].slowdown == 2.0

    # The slow device as observed (padded) against the fast one: 2x within 25%.
    ratio = slow["decoder_layer"]["emulated_prefill_s"] / fast["decoder_layer"]["prefill_s"]
    assert 1.5 <= ratio <= 2.5, (ratio, fast["decoder_layer"], slow["decoder_layer"])
    per_request = [sum(b[k].get(f"{p}_s", 0) for k in b for p in ("prefill", "decode")) for b in (fast, slow)]
    per_request[1] = sum(b.get(f"emulated_{p}_s", 0) for b in slow.values() for p in ("prefill", "decode"))
    assert 1.5 <= per_request[1] / per_request[0] <= 2.5, per_request

    pairs = {(p["src"], p["dst"]): p for p in d["links"]["pairs"]}
    assert set(pairs) == {("cpu0", "cpu1"), ("cpu1", "cpu0")}
    for p in pairs.values():
        assert p["emulated"] is True and p["emulated_as"]["bandwidth_bytes_per_s"] == 12.5e6
        assert abs(p["bandwidth_bytes_per_s"] / 12.5e6 - 1) <= 0.15, p
    assert cluster.link("cpu0", "cpu1").emulated
    assert "EMULATED" in proc.stdout


def test_one_torchrun_per_device(small_ckpt, tmp_path):
    """`torchrun --nnodes 2 --node-rank i --nproc-per-node 1` twice, as on two machines:
    rank 0 writes one cluster.json with both devices and both directions of their link."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "cluster.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **RunSecret.generate().env()}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
         "--nproc-per-node", "1", "--max-restarts", "0", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "adaptlink.cli", "profile", "--model", str(small_ckpt), "--out", str(out), "--names", "a,b",
         "--threads", "1", "--prefill-tokens", "32", "--warmup", "0", "--repeats", "1", "--min-repeats", "1",
         "--kinds", "decoder_layer", "--link-sizes", "0,64KiB", "--link-repeats", "1", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    try:
        logs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    d = json.loads(out.read_text())
    load_cluster(out)
    assert [x["name"] for x in d["devices"]] == ["a", "b"]
    assert all(x["threads"] == 1 and x["memory"]["shared_by"] == 2 for x in d["devices"])
    assert all(x["compute"]["measured"]["blocks"]["decoder_layer"]["prefill_s"] > 0 for x in d["devices"])
    assert {(p["src"], p["dst"]) for p in d["links"]["pairs"]} == {("a", "b"), ("b", "a")}
    assert all(p["emulated"] is False and p["bandwidth_bytes_per_s"] > 0 for p in d["links"]["pairs"])
