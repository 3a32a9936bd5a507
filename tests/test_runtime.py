"""The runtime: a pipelined run over any plan produces HF generate's tokens, and survives a dropout.

Two tiers: an in-process message bus drives real StageExecutors and the real Coordinator
(fast: routing, pipelining, replay logic); then real gloo ranks started by the launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from adaptlink.blocks import LlavaBlocks
from adaptlink.reference import eos_ids
from adaptlink.tiny import hf_reference, load_reference, write_sample_requests
from partitioner.types import Plan
from plans import all_blocks, manual_plan, write_plan
from runtime.coordinator import Coordinator
from runtime.engine import loaded_blocks
from runtime.requests import read_prompts
from runtime.stage import StageExecutor
from runtime.transport import Message, PeerFailure


def decoder(ckpt, lo, hi):
    return [f"decoder.layer.{i}" for i in range(lo, hi)]


def vision(ckpt):
    ids = all_blocks(str(ckpt))
    return ids[: ids.index("text.embed")]


# ---- in-process tier ------------------------------------------------------------------------

class Bus:
    """Every rank's executor in one process; messages delivered in order, a rank can be killed."""

    def __init__(self, plan: Plan, source: str):
        self.q: deque = deque()
        self.dead: set[int] = set()
        self.failures: deque = deque()
        self.world_size = len(plan.devices)
        self.ex = {}
        for s in plan.devices:
            blocks = LlavaBlocks.load(source, loaded_blocks(plan, s.rank))
            self.ex[s.rank] = StageExecutor(s.rank, blocks, plan.block_ranks(), plan.coordinator,
                                            lambda dst, h, t, src=s.rank: self.send_from(src, dst, h, t))
        self.coordinator = plan.coordinator
        self.sent = 0

    def send_from(self, src, dst, header, tensors):
        if src in self.dead or dst in self.dead:
            return
        self.sent += 1
        self.q.append((src, dst, header, tensors))

    # the coordinator's transport
    def send(self, dst, header, tensors=None, block=True):
        self.send_from(self.coordinator, dst, header, tensors or {})

    def recv(self, timeout=None):
        if self.failures:
            raise PeerFailure(self.failures.popleft(), "killed by the test")
        while self.q:
            src, dst, header, tensors = self.q.popleft()
            if dst in self.dead or src in self.dead:
                continue
            if dst == self.coordinator:
                return Message(src, 0, header, tensors)
            ex = self.ex[dst]
            kind = header["kind"]
            if kind == "act":
                ex.handle(header, tensors)
            elif kind == "free":
                ex.free(header["req"])
            elif kind == "route":
                ex.set_routes(header["routes"], header["rv"])
        return None

    def kill(self, rank):
        self.dead.add(rank)
        self.failures.append(rank)


def _coordinator(bus, plan, ckpt, prompts, in_flight):
    model, processor = load_reference(ckpt)
    requests, failed = read_prompts(prompts, processor, eos_token_ids=frozenset(eos_ids(model.config)))
    holders = {s.rank: set(loaded_blocks(plan, s.rank)) for s in plan.devices}
    preferred = {s.rank: plan.backup_holder(s.rank) for s in plan.devices}
    return Coordinator(bus.ex[plan.coordinator], bus, requests, in_flight=in_flight, holders=holders,
                       preferred=preferred, tokenizer=processor.tokenizer), failed


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    return write_sample_requests(tmp_path_factory.mktemp("req"), n=5, seed=11, max_new_tokens=10)


@pytest.fixture(scope="module")
def reference_tokens(tiny_ckpt, requests_file):
    return hf_reference(tiny_ckpt, requests_file)


@pytest.mark.parametrize("layout", ["vision-apart-uneven", "vision-on-coordinator", "one-device"])
def test_in_process_pipeline_matches_hf(tiny_ckpt, requests_file, reference_tokens, layout):
    ckpt = str(tiny_ckpt)
    shares = {
        "vision-apart-uneven": [["text.embed", "merge", "head"], vision(ckpt), decoder(ckpt, 0, 1), decoder(ckpt, 1, 4)],
        "vision-on-coordinator": [vision(ckpt) + ["text.embed", "merge", *decoder(ckpt, 0, 1), "head"], decoder(ckpt, 1, 4)],
        "one-device": [all_blocks(ckpt)],
    }[layout]
    plan = Plan.from_dict(manual_plan(ckpt, shares))
    bus = Bus(plan, ckpt)
    coord, failed = _coordinator(bus, plan, tiny_ckpt, requests_file, in_flight=3)
    results = coord.run()
    assert not failed
    assert [r.tokens for r in results] == reference_tokens
    assert all(r.error is None and r.text is not None for r in results)
    # Several requests were in flight at once: the coordinator admitted more before the first finished.
    assert max(len(r.tokens) for r in results) > 1
    # Caches are freed on every rank once requests finish (deliver the last `free` messages).
    while bus.q:
        bus.recv()
    assert all(not ex.caches and not ex.work for ex in bus.ex.values())


@pytest.mark.parametrize("replay", ["recompute", "exact"])
def test_in_process_failover_replays_to_identical_tokens(tiny_ckpt, requests_file, reference_tokens, replay):
    ckpt = str(tiny_ckpt)
    shares = [["text.embed", "merge", "head"] + vision(ckpt), decoder(ckpt, 0, 2), decoder(ckpt, 2, 4)]
    plan = Plan.from_dict(manual_plan(ckpt, shares, backups={1: 2, 2: 1}))
    bus = Bus(plan, ckpt)
    coord, _ = _coordinator(bus, plan, tiny_ckpt, requests_file, in_flight=3)
    coord.replay = replay
    issued = []
    real_inject = bus.ex[0].inject
    bus.ex[0].inject = lambda req, epoch, step, pos, inputs, image: (
        issued.append((epoch, step, inputs["input_ids"].shape[1])), real_inject(req, epoch, step, pos, inputs, image))
    real_on_output = coord._on_output
    seen = {"n": 0}

    def on_output(header, tensors):  # kill rank 2 after the 7th token, mid-generation
        real_on_output(header, tensors)
        seen["n"] += 1
        if seen["n"] == 7:
            bus.kill(2)

    bus.ex[0].on_output = on_output
    results = coord.run()
    assert [r.tokens for r in results] == reference_tokens
    assert len(coord.failovers) == 1 and coord.failovers[0].rank == 2
    assert set(coord.failovers[0].rerouted.values()) == {1}
    assert coord.failovers[0].replayed, "requests in flight must be replayed"
    assert coord.replay_mismatches == 0
    replays = [(step, q) for epoch, step, q in issued if epoch == 1]
    if replay == "recompute":  # one prefill of prompt + tokens so far, then decode steps of one token
        assert any(step > 0 and q > 1 for step, q in replays)
    else:  # original chunking: every replayed step after the prefill feeds one token
        assert all(q == 1 for step, q in replays if step > 0)


def test_in_process_second_dropout_without_copy_fails_cleanly(tiny_ckpt, requests_file):
    ckpt = str(tiny_ckpt)
    shares = [["text.embed", "merge", "head"] + vision(ckpt), decoder(ckpt, 0, 2), decoder(ckpt, 2, 4)]
    plan = Plan.from_dict(manual_plan(ckpt, shares, backups={2: 1}))  # rank 1 backs up rank 2 only
    bus = Bus(plan, ckpt)
    coord, _ = _coordinator(bus, plan, tiny_ckpt, requests_file, in_flight=2)
    real = coord._on_output
    n = {"tokens": 0}

    def on_output(header, tensors):
        real(header, tensors)
        n["tokens"] += 1
        if n["tokens"] == 3:
            bus.kill(2)   # survived: rank 1 holds rank 2's share
        if n["tokens"] == 12:
            bus.kill(1)   # not survived: nobody else holds rank 1's or rank 2's blocks

    bus.ex[0].on_output = on_output
    results = coord.run()
    assert len(results) == 5  # every request is accounted for
    unfinished = [r for r in results if r.error]
    assert unfinished and all("no live device holds a copy" in r.error for r in unfinished)


# ---- real ranks -------------------------------------------------------------------------------

def _run(plan_path, prompts, out, *extra, timeout=240):
    return subprocess.run([sys.executable, "-m", "adaptlink.launch", "--plan", str(plan_path),
                           "--prompts", str(prompts), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout)


def test_gloo_ranks_match_hf_and_fail_bad_lines_only(tiny_ckpt, requests_file, reference_tokens, tmp_path):
    """4 real ranks: vision on its own rank, decoder split 1:3, 4 in flight, bad lines in the input."""
    ckpt = str(tiny_ckpt)
    shares = [["text.embed", "merge", "head"], vision(ckpt), decoder(ckpt, 0, 1), decoder(ckpt, 1, 4)]
    plan = write_plan(tmp_path / "plan.json", manual_plan(ckpt, shares, in_flight=4))
    lines = requests_file.read_text().splitlines()
    bad = ['{"id": "broken", "prompt": ', json.dumps({"id": "noimg", "prompt": "a <image> b", "image": "missing.png"})]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines[:2] + bad + lines[2:]) + "\n")
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    r = _run(plan, prompts, out, "--metrics", str(metrics))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    good = {x["id"]: x for x in rows if "error" not in x}
    assert [good[json.loads(x)["id"]]["tokens"] for x in lines] == reference_tokens
    errors = {x["id"]: x["error"] for x in rows if "error" in x}
    assert set(errors) == {"line3", "noimg"}
    assert "not valid JSON" in errors["line3"] and "missing.png" in errors["noimg"]
    assert len(rows) == len(lines) + 2  # every id exactly once
    m = json.loads(metrics.read_text())
    assert m["completed"] == len(lines) and m["tokens_per_s"] > 0
    assert set(m["ranks"]) == {"0", "1", "2", "3"}
    # Each rank holds its share, not the whole model: the 3-layer rank holds 3x the 1-layer rank's weights.
    assert m["ranks"]["3"]["param_bytes"] == 3 * m["ranks"]["2"]["param_bytes"]


@pytest.mark.parametrize("recovery", ["preloaded", "cold"])
def test_sigkilled_rank_is_survived_with_identical_tokens(tiny_ckpt, requests_file, reference_tokens, tmp_path,
                                                          recovery):
    """3 ranks, a non-coordinator SIGKILLed mid-generation; every request finishes, tokens as HF's.
    Cold recovery (nothing preloaded) loads the share from the checkpoint when the rank dies."""
    ckpt = str(tiny_ckpt)
    shares = [["text.embed", "merge", "head"] + vision(ckpt), decoder(ckpt, 0, 2), decoder(ckpt, 2, 4)]
    plan = write_plan(tmp_path / "plan.json", manual_plan(ckpt, shares, backups={1: 2, 2: 1}, in_flight=3))
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    r = _run(plan, requests_file, out, "--metrics", str(metrics), "--inject", "kill:rank=2,after_tokens=12",
             "--recovery", recovery)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["tokens"] for x in rows] == reference_tokens
    m = json.loads(metrics.read_text())
    assert [f["rank"] for f in m["failovers"]] == [2]
    assert set(m["failovers"][0]["rerouted"].values()) == {1}
    assert (m["failovers"][0]["cold_load_s"] is not None) == (recovery == "cold")
    assert m["replay_mismatches"] == 0


def test_plan_that_cannot_fit_is_refused_before_anything_loads(tiny_ckpt, requests_file, tmp_path):
    ckpt = str(tiny_ckpt)
    shares = [["text.embed", "merge", "head"] + vision(ckpt), decoder(ckpt, 0, 4)]
    doc = manual_plan(ckpt, shares)
    doc["devices"][1]["emulation"] = {"slowdown": 1.0, "memory_cap_bytes": 1000}
    plan = write_plan(tmp_path / "plan.json", doc)
    r = _run(plan, requests_file, tmp_path / "out.jsonl", timeout=120)
    assert r.returncode == 2
    assert "devices[1] (dev1) needs" in r.stderr and "has 1,000" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert "rank" not in r.stderr.split("error:")[0]  # no rank was started


def test_plan_hash_mismatch_is_refused():
    from runtime.engine import PlanMismatchError, check_plan_hash

    class Store(dict):
        def set(self, k, v):
            self[k] = v.encode()

        def get(self, k):
            return self[k]

        def wait(self, keys, timeout):
            assert all(k in self for k in keys)

    store = Store()

    class P:
        def __init__(self, h):
            self.h = h

        def plan_hash(self):
            return self.h

    check_plan_hash(P("a" * 64), 0, store, 0, "plan.json")
    check_plan_hash(P("a" * 64), 1, store, 0, "plan.json")
    with pytest.raises(PlanMismatchError, match="plan.json: plan hash bbbbbbbbbbbb on rank 2 differs"):
        check_plan_hash(P("b" * 64), 2, store, 0, "plan.json")
