"""Issue 14: forged, altered, replayed and malformed frames are refused; a rank's messages
are checked against what its role may send. Nothing here trusts the sender.

Wire-level checks run in-process; the frame attacks run on real gloo ranks (one launch,
tests/helpers/transport_worker.py `attacks`): each attacking rank sends rank 0 one bad
frame while rank 1 streams genuine messages to it.
"""

from __future__ import annotations

import pytest
import torch

from helpers.runner import run_scenario
from helpers.transport_worker import ATTACK_CAP, ATTACKS, N_GOOD
from runtime import messages, wire
from runtime.auth import RunSecret
from runtime.messages import Refused, check
from runtime.transport import one_line

SECRET = RunSecret(bytes(range(32)))


# ---------------------------------------------------------------------------- wire, no processes
def _frame(secret=SECRET, src=1, dst=0, seq=5):
    tensors = {"small": torch.arange(6.0), "big": torch.randn(wire.INLINE_MAX // 4 + 3)}
    return wire.encode(seq, {"kind": "act", "req": 1}, tensors, secret=secret, src=src, dst=dst)


def _verify(fr, secret=SECRET, src=1, dst=0, seq=5):
    return wire.verify(secret, src, dst, seq, wire.decode_prefix(fr.prefix), fr.body, fr.bulk)


def test_tag_covers_every_byte_and_the_link():
    fr = _frame()
    assert _verify(fr)
    # another run's secret, another link (sender or receiver), no secret at all
    assert not _verify(fr, secret=RunSecret(bytes(32)))
    assert not _verify(fr, src=2) and not _verify(fr, dst=3)
    assert not _verify(_frame(secret=None))
    # one bit anywhere: envelope, inline tensor, bulk tensor, the tag itself
    n_env = wire.decode_prefix(fr.prefix).env_len
    for where in (1, n_env + 20, fr.body.numel() - 1):
        bad = _frame()
        bad.body[where] ^= 1
        assert not _verify(bad), where
    bad = _frame()
    bad.bulk[0] = bad.bulk[0].clone()
    bad.bulk[0][-1] ^= 1
    assert not _verify(bad)
    # the same frame taken for another seq (a replay) is refused
    assert not _verify(fr, seq=6)


@pytest.mark.parametrize("words", [
    [wire.MAGIC, 100, 4 << 30, 0],           # 4 GiB body
    [wire.MAGIC, 2 << 20, 0, 0],             # envelope over MAX_ENVELOPE
    [wire.MAGIC, 100, 0, 1 << 40],           # absurd tensor count
    [wire.MAGIC, 0, 0, 0], [wire.MAGIC, -5, 0, 0], [1, 2, 3, 4],
])
def test_prefix_is_bounded_before_anything_is_allocated(words):
    with pytest.raises(wire.WireError):
        wire.decode_prefix(torch.tensor(words, dtype=torch.int64), max_bytes=ATTACK_CAP)


def _body(env_obj=None, raw: bytes | None = None, inline_len=0):
    env = raw if raw is not None else wire.pack_header(env_obj)
    body = torch.zeros(wire._align(len(env)) + inline_len + wire.MAC_LEN, dtype=torch.uint8)
    body[: len(env)] = torch.frombuffer(bytearray(env), dtype=torch.uint8)
    return body, wire.Prefix(len(env), body.numel(), 0)


V = wire.WIRE_VERSION


@pytest.mark.parametrize("env", [
    b"\xc1" * 10, b"\x00\x01", b"\x92\x01",                                          # not msgpack / truncated
    {"v": V, "seq": "0", "h": {}, "t": []}, {"v": V, "seq": 0, "h": [], "t": []},
    {"v": V, "seq": 0, "h": {}, "t": 5}, {"v": V, "seq": -1, "h": {}, "t": []}, {"v": 1},
    {"v": V, "seq": 0, "h": {}, "t": [["x"]]},
    {"v": V, "seq": 0, "h": {}, "t": [[1, "float32", [1], 4, 0]]},
    {"v": V, "seq": 0, "h": {}, "t": [["x", "pickle", [1], 4, 0]]},
    {"v": V, "seq": 0, "h": {}, "t": [["x", "float32", [-1], -4, 0]]},
    {"v": V, "seq": 0, "h": {}, "t": [["x", "float32", [2], 4, 0]]},           # nbytes != shape
    {"v": V, "seq": 0, "h": {}, "t": [["x", "float32", [8], 32, 0]]},          # past the inline area
    {"v": V, "seq": 0, "h": {}, "t": [["x", "float32", [1], 4, 3]]},           # unaligned
    {"v": V, "seq": 0, "h": {}, "t": [["x", "uint8", [4 << 30], 4 << 30, -1]]},  # bulk over the cap
], ids=repr)
def test_malformed_envelopes_raise_wire_error_only(env):
    body, pre = _body(raw=env) if isinstance(env, bytes) else _body(env, inline_len=16)
    if isinstance(env, dict) and env.get("t") and isinstance(env["t"], list) and env["t"][0][-1:] == [-1]:
        pre = pre._replace(n_bulk=1)
    with pytest.raises(wire.WireError):
        wire.decode_envelope(body, pre, max_bytes=ATTACK_CAP)


def test_one_line_reason_never_raises():
    class Bad(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert one_line(RuntimeError("")) == "RuntimeError"  # str(e).splitlines()[0] raised IndexError
    assert one_line(Bad()) == "Bad"
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert len(one_line(ValueError("x" * 999))) == 200


# ---------------------------------------------------------------------------- role rules
ACT = {"kind": "act", "mb": 0, "rows": [[0, 0, 0, 3, False]], "block": "text.embed", "rv": 0}


@pytest.mark.parametrize("src,header,me,why", [
    (1, {"kind": "stop"}, 2, "only the coordinator"),
    (1, {"kind": "route", "rv": 1, "routes": {"head": 1}}, 2, "only the coordinator"),
    (2, {"kind": "free", "req": 0}, 1, "only the coordinator"),
    (2, {"kind": "load", "blocks": ["head"]}, 1, "only the coordinator"),
    (1, {"kind": "stats", "stats": {}}, 2, "only the coordinator takes"),
    (1, {"kind": "error", "req": 0, "epoch": 0, "error": "x", "rank": 2}, 0, "in the name of"),
    (0, {"kind": "free"}, 1, "without field 'req'"),
    (0, {"kind": "free", "req": "0"}, 1, "bad value"),
    (0, {"kind": "free", "req": True}, 1, "bad value"),
    (0, {"kind": "route", "rv": 1, "routes": {"head": "x"}}, 1, "bad value"),
    (1, {**ACT, "rows": [[0, 0, 0, 3, 1]]}, 2, "bad value"),
    (1, {k: v for k, v in ACT.items() if k != "rv"}, 2, "without field 'rv'"),
    (1, {"kind": "bogus"}, 2, "unknown kind"),
    (1, ["kind", "stop"], 2, "not a dict"),
])
def test_messages_outside_a_rank_role_are_refused(src, header, me, why):
    with pytest.raises(Refused, match=why):
        check(src, header, me=me, coordinator=0)


def test_messages_within_a_rank_role_pass():
    assert check(0, {"kind": "stop"}, me=2, coordinator=0) == "stop"
    assert check(2, ACT, me=1, coordinator=0) == "act"
    assert check(2, {"kind": "error", "req": 1, "epoch": 0, "error": "e", "rank": 2}, me=0, coordinator=0) == "error"
    assert check(3, {"kind": "stats", "stats": {"a": 1}}, me=0, coordinator=0) == "stats"


def test_message_cap_fits_the_model(tiny_ckpt):
    from plans import manual_plan
    from partitioner.types import Plan
    from plans import all_blocks

    plan = Plan.from_dict(manual_plan(str(tiny_ckpt), [all_blocks(str(tiny_ckpt))]))
    cap = messages.message_cap(plan)
    assert cap == messages.MIN_CAP  # a tiny model: the floor
    assert 4 << 30 > cap


# ---------------------------------------------------------------------------- real gloo ranks
@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """One launch: rank 0 receives, rank 1 streams genuine messages, ranks 2.. attack."""
    _, res = run_scenario("attacks", 2 + len(ATTACKS), tmp_path_factory.mktemp("attacks"),
                          env=SECRET.env(), timeout_s=90)
    return res


WHY = {"bad_tag": "bad tag", "tampered": "bad tag", "replay": "expected 1 (replayed",
       "garbage": "not msgpack", "types": "wrong type", "spec": "outside the inline area",
       "huge_body": "out of bounds", "huge_bulk": "over this run's"}


@pytest.mark.parametrize("name", ATTACKS)
def test_forged_or_malformed_frame_fences_its_sender_at_once(attacked, name):
    rank = str(2 + ATTACKS.index(name))
    reason = attacked["failures"].get(rank)
    assert reason is not None, f"{name}: rank {rank} was never fenced ({attacked['failures']})"
    assert reason.startswith(f"protocol error from rank {rank}") and WHY[name] in reason, reason
    delay = attacked["t_failure"][rank] - attacked["t_attack"][rank]
    assert 0 <= delay < 2.0, (name, delay)


def test_the_receiver_goes_on_and_delivers_only_genuine_messages(attacked):
    # rank 1's stream arrived whole, in order, checked tensor by tensor, the last one after
    # every attacker was fenced: the receiver thread survived all of them
    assert attacked["good"] == N_GOOD + 1
    st = attacked["stats"]
    assert st["receiver_restarts"] == 0 and "1" not in {str(k) for k in st["fenced"]}
    assert st["protocol_errors"] == len(ATTACKS) and st["bad_tags"] == 2
    # the only attacker message delivered: the genuine one that the replay attack repeated
    assert attacked["other"] == [[2 + ATTACKS.index("replay"), 0, {"legit": True}]]


# ---------------------------------------------------------------------------- a real run
def test_forged_messages_mid_run_are_dropped_and_tokens_match_hf(tiny_ckpt, tmp_path):
    """3 real ranks, no backups (a rank lost would end the run): rank 2, a member of the run
    with its secret, sends forged `stop`/`route`/`free`/`load` to rank 1, acts for blocks
    it does not run (tokens of `head` to the coordinator, `merge` to rank 1) and headers
    missing fields. All are dropped and counted; every token is HF generate's."""
    import json
    import sys
    from pathlib import Path

    from adaptlink.model.reference import hf_reference

    from adaptlink.model.samples import write_sample_requests
    from plans import all_blocks, manual_plan, write_plan
    from runtime.launcher import launch_local

    ckpt = str(tiny_ckpt)
    ids = all_blocks(ckpt)
    dec = [b for b in ids if b.startswith("decoder.")]
    shares = [[b for b in ids if not b.startswith("decoder.")], dec[:2], dec[2:]]
    plan = write_plan(tmp_path / "plan.json", manual_plan(ckpt, shares, in_flight=3))
    prompts = write_sample_requests(tmp_path, n=5, seed=11, max_new_tokens=10)
    want = hf_reference(tiny_ckpt, prompts)
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    args = ["--plan", str(plan), "--prompts", str(prompts), "--out", str(out), "--metrics", str(metrics)]
    forger = Path(__file__).with_name("helpers") / "forger.py"
    result = launch_local(lambda r: [sys.executable, str(forger), "2", *args] if r == 2
                          else [sys.executable, "-m", "adaptlink.launch", *args],
                          3, secret=SECRET, timeout_s=180, log_dir=tmp_path)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(3))
    assert result.ok and result.returncodes == {0: 0, 1: 0, 2: 0}, (result, logs)
    assert '{"forged": 66}' in (tmp_path / "rank2.log").read_text(), logs
    assert [json.loads(x)["tokens"] for x in out.read_text().splitlines()] == want
    m = json.loads(metrics.read_text())
    assert m["failovers"] == [] and m["fatal"] is None

    def refused_from_2(rank):
        return sum(n for k, n in m["ranks"][str(rank)]["refused"].items() if k.startswith("2:"))

    assert refused_from_2(1) == 12 and refused_from_2(0) == 54, (m["ranks"]["0"]["refused"],
                                                                  m["ranks"]["1"]["refused"])
