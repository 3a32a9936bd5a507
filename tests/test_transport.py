"""Transport: the wire format, and real gloo ranks on 127.0.0.1 (runtime.launcher).

Multi-rank scenarios live in tests/helpers/transport_worker.py; rank 0 reports to
result.json and every rank asserts its own side (a failed check fails the launch).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers.runner import run_scenario
from runtime import wire
from runtime.launcher import KillSpec
from runtime.transport import Link, LinkEmulation, fit_link

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


# ---------------------------------------------------------------------------- wire, no processes
def roundtrip(header, tensors, seq=3):
    fr = wire.encode(seq, header, tensors)
    pre = env_len, body_len, n_bulk = wire.decode_prefix(fr.prefix)
    assert body_len == fr.body.numel() and n_bulk == len(fr.bulk)
    got_seq, got_header, specs = wire.decode_envelope(fr.body, pre)
    got = wire.materialize(specs, fr.body, pre, [b.clone() for b in fr.bulk])
    return got_seq, got_header, got, fr


def test_wire_roundtrip_every_dtype_and_shape():
    tensors = {
        "f32": torch.randn(3, 4), "f64": torch.randn(2, dtype=torch.float64),
        "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.tensor([-(2**62), 2**62]), "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.tensor([-3], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8), "bool": torch.tensor([[True, False]]),
        "c64": torch.randn(3, dtype=torch.complex64), "c128": torch.randn(1, dtype=torch.complex128),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2],
        "bulk": torch.randn(wire.INLINE_MAX // 4 + 10),  # too big to pack: its own gloo message
    }
    seq, header, got, fr = roundtrip({"req": 1, 2: [None, 1.5, b"\x00"], "s": "é"}, tensors)
    assert seq == 3 and header == {"req": 1, 2: [None, 1.5, b"\x00"], "s": "é"}
    assert len(fr.bulk) == 1
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name


def test_small_tensors_are_snapshots_bulk_tensors_are_not_copied():
    small, big = torch.zeros(4), torch.zeros(wire.INLINE_MAX // 4 + 1)
    fr = wire.encode(0, {}, {"small": small, "big": big})
    small += 1  # after encode: the packed copy is unaffected
    _, _, specs = wire.decode_envelope(fr.body, wire.decode_prefix(fr.prefix))
    got = wire.materialize(specs, fr.body, wire.decode_prefix(fr.prefix), fr.bulk)
    assert torch.equal(got["small"], torch.zeros(4))
    assert fr.bulk[0].data_ptr() == big.data_ptr()


@pytest.mark.parametrize("bad", [object(), torch.zeros(1), {1, 2}, {"x": [1, object()]}])
def test_header_that_is_not_msgpack_is_refused(bad):
    with pytest.raises(wire.WireError, match="msgpack"):
        wire.encode(0, {"ok": 1, "bad": bad}, {})


def test_no_pickle_on_the_wire():
    files = sorted(RUNTIME.glob("*.py")) + [RUNTIME.parent / "adaptlink" / "launch.py"]
    assert len(files) >= 9
    for path in files:
        src = path.read_text()
        assert not re.search(r"\b(import pickle|from pickle|cPickle|dill|torch\.save|torch\.load|"
                             r"\w*_object_list|send_object|recv_object|broadcast_object|gather_object|"
                             r"scatter_object)", src), path.name


def test_corrupt_prefix_is_rejected():
    with pytest.raises(wire.WireError):
        wire.decode_prefix(torch.tensor([1, 2, 3, 4], dtype=torch.int64))


def test_link_emulation_from_cluster_links():
    links = {"default": {"bandwidth_bytes_per_s": 1.25e8, "latency_s": 0.0005},
             "pairs": [{"src": "gpu0", "dst": "cpu1", "bandwidth_bytes_per_s": 1.25e7,
                        "latency_s": 0.002, "emulated": True}]}
    emu = LinkEmulation.from_spec(links, {"gpu0": 0, "cpu1": 1, "cpu2": 2})
    assert emu.link(0, 1) == Link(1.25e7, 0.002) == emu.link(1, 0)  # reverse shaped too
    assert emu.link(0, 2) is None  # the default is a real link, not emulated
    assert emu.link(1, 1) is None
    emu = LinkEmulation({(0, 1): (1e6, 0.01), (1, 0): (2e6, 0.0)}, default=(5e6, 0.001))
    assert emu.link(0, 1).seconds(1e6) == pytest.approx(1.01)
    assert emu.link(1, 0).seconds(1e6) == pytest.approx(0.5)
    assert emu.link(2, 0) == Link(5e6, 0.001)


def test_fit_link_recovers_latency_and_bandwidth():
    samples = [(s, 0.003 + s / 2e7 + (1e-4 if i % 2 else -1e-4))
               for i, s in enumerate([0, 10**5, 10**6, 2 * 10**6] * 3)]
    fit = fit_link(samples, per_size="all")
    assert fit.bandwidth_bytes_per_s == pytest.approx(2e7, rel=0.01)
    assert fit.latency_s == pytest.approx(0.003, abs=2e-4)
    # one descheduled sample (6x slower) does not move the default, per-size-minimum fit
    samples.append((10**6, 6 * (0.003 + 10**6 / 2e7)))
    assert fit_link(samples).bandwidth_bytes_per_s == pytest.approx(2e7, rel=0.02)
    with pytest.raises(ValueError):
        fit_link([(100, 0.1), (100, 0.2)])


# ---------------------------------------------------------------------------- real gloo ranks
def test_concurrent_senders_roundtrip_in_order(tmp_path):
    # ranks 1 and 2 send 40 messages each at once (several dtypes/shapes, some over
    # INLINE_MAX) to rank 0, which checks every tensor and per-sender seq and echoes back
    _, res = run_scenario("traffic", 3, tmp_path)
    assert res["seen"] == {"1": 40, "2": 40}
    st = res["stats"]
    assert st["seq_gaps"] == 0 and st["fenced"] == {}
    assert st["received"]["1"]["messages"] == 40 and st["received"]["1"]["bytes"] > 40 * 300_000 // 7
    assert st["sent"]["2"]["messages"] == 40


def test_killed_and_hung_peers_fail_fast_and_survivors_go_on(tmp_path):
    # rank 2 SIGKILLs itself half-way through a message to rank 0; rank 3 is SIGSTOPped by
    # the launcher after rank 0 has 20 of its messages; rank 1 talks to rank 0 throughout
    result, res = run_scenario("fault", 4, tmp_path,
                               inject=[KillSpec.parse("stop:rank=3,after_tokens=20")])
    failures, t_failure = res["failures"], res["t_failure"]
    # transport's own detection: the pending recv from rank 2 raised
    assert failures["2"].startswith("receive from rank 2 failed")
    detect2 = t_failure["2"] - res["t_kill2"]
    assert 0 <= detect2 < 1.0, detect2
    # heartbeat detection (Membership declares it dead within 0.5 s), fenced into the
    # transport by Membership.attach: rank 0's recv raises right after
    assert "no heartbeat" in failures["3"]
    (spec, at_s), = result.injected
    t_stop = result.started_at + at_s
    declared3 = res["deaths"]["3"][1] - t_stop
    detect3 = t_failure["3"] - t_stop
    assert 0 < declared3 < 0.5, declared3
    assert declared3 <= detect3 < declared3 + 0.5, (declared3, detect3)
    # the fenced, stopped rank was then SIGKILLed by the launcher
    ex3 = next(e for e in result.exits if e.rank == 3)
    assert ex3.cause == "fenced" and ex3.returncode == -9
    # survivors: 0 and 1 kept talking after both failures; sends to the dead fail at once
    assert res["from1_after"] >= 20
    assert res["late_send_s"] < 0.1
    # rank 1 was never told of rank 2's death: its send to it fails in gloo, promptly
    ds = res["dead_send"]
    assert ds.get("rank") == 2 and ds["reason"].startswith("send to rank 2 failed"), ds
    assert ds["s"] < 1.0, ds
    assert result.returncodes[1] == 0
    print(f"SIGKILL mid-message: recv raised after {detect2 * 1e3:.0f} ms; SIGSTOP: declared dead "
          f"after {declared3 * 1e3:.0f} ms, recv raised after {detect3 * 1e3:.0f} ms")


def test_emulated_100mbit_link_is_measured_within_15_percent(tmp_path):
    _, res = run_scenario("link", 2, tmp_path)
    mbit = res["bandwidth"] * 8 / 1e6
    assert mbit == pytest.approx(100, rel=0.15), res["samples"]
    assert 0.0015 < res["latency"] < 0.02  # 2 ms emulated + this machine's own overhead
    assert res["stats"]["sent"]["1"]["emulated_s"] > 0
    print(f"emulated 100 Mbit/s, 2 ms: measured {mbit:.1f} Mbit/s, {res['latency'] * 1e3:.2f} ms")
