"""Pre-flight: a bad plan or checkpoint is refused by `adaptlink run` with one line, exit 2,
before any device process starts; a device opens only the shards holding its tensors.

Every case runs the real command line (`python -m adaptlink.cli run`) on a damaged copy of
a tiny sharded checkpoint (7 shards of ~250 KB) and checks that no rank was started: the
--log-dir that the launcher creates when it spawns the ranks never appears.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptlink.plans import chain_shares, manual_plan, write_plan
from adaptlink.model.samples import write_sample_requests
from adaptlink.model.tiny import build_tiny

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny checkpoint saved in shards with an index, as large hub checkpoints are."""
    out = tmp_path_factory.mktemp("sharded")
    model, processor = build_tiny()
    model.save_pretrained(out, max_shard_size="300KB")
    processor.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 3
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_sample_requests(tmp_path_factory.mktemp("req"), n=2, seed=3, max_new_tokens=4)


@pytest.fixture
def ckpt(sharded, tmp_path) -> Path:
    """A fresh copy of the sharded checkpoint for one test to damage."""
    return Path(shutil.copytree(sharded, tmp_path / "ckpt"))


def weight_map(ckpt: Path) -> dict[str, str]:
    return json.loads((ckpt / INDEX).read_text())["weight_map"]


def shard_of(ckpt: Path, disk_name: str) -> Path:
    return ckpt / weight_map(ckpt)[disk_name]


def plan_doc(ckpt: Path) -> dict:
    """3 ranks: coordinator with the vision branch, then decoder layers 0-1 and 2-3."""
    return manual_plan(str(ckpt), chain_shares(str(ckpt), [2, 2]))


def run_cli(plan: dict, tmp_path: Path, prompts: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    path = write_plan(tmp_path / "plan.json", plan)
    return subprocess.run([sys.executable, "-m", "adaptlink.cli", "run", "--plan", str(path),
                           "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
                           "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(r: subprocess.CompletedProcess, tmp_path: Path, *expected: str) -> str:
    """Exit 2, one error line containing every `expected` piece, no rank started."""
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("adaptlink run: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for piece in expected:
        assert piece in errors[0], (piece, errors[0])
    assert not (tmp_path / "logs").exists(), "a device process was started"
    assert not (tmp_path / "out.jsonl").exists()
    return errors[0]


# ---- the checkpoint ---------------------------------------------------------------------------

def test_missing_processor_file_is_refused(ckpt, tmp_path, prompts):
    (ckpt / "tokenizer.json").unlink()
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{ckpt}: the processor (tokenizer and image processor) does not load")


def test_truncated_shard_is_refused(ckpt, tmp_path, prompts):
    shard = shard_of(ckpt, "language_model.model.layers.2.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{shard}: truncated: its header describes {len(data):,} bytes, the file has {len(data) // 2:,}")


def test_garbage_shard_is_refused(ckpt, tmp_path, prompts):
    shard = shard_of(ckpt, "language_model.model.layers.1.mlp.down_proj.weight")
    shard.write_bytes(os.urandom(shard.stat().st_size))
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{shard}: not a safetensors file")


def test_bad_index_json_is_refused(ckpt, tmp_path, prompts):
    (ckpt / INDEX).write_text('{"weight_map": {"language_model.lm_head.weight": ')
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path, f"{ckpt / INDEX}: not valid JSON")


def test_missing_shard_is_refused(ckpt, tmp_path, prompts):
    shard = shard_of(ckpt, "language_model.model.layers.3.mlp.down_proj.weight")
    shard.unlink()
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{ckpt / INDEX}: weight_map: shard '{shard.name}' does not exist")


def test_tensor_deleted_from_a_shard_is_a_checkpoint_error_not_a_dropout(ckpt, tmp_path, prompts):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = shard_of(ckpt, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{shard}: no tensor '{name}' ({INDEX} places it in this shard; needed by devices[1] "
                   f"for decoder.layer.1)")


def test_tensor_missing_from_the_index_is_named(ckpt, tmp_path, prompts):
    doc = json.loads((ckpt / INDEX).read_text())
    del doc["weight_map"]["language_model.model.layers.3.self_attn.o_proj.weight"]
    (ckpt / INDEX).write_text(json.dumps(doc))
    assert_refused(run_cli(plan_doc(ckpt), tmp_path, prompts), tmp_path,
                   f"{ckpt / INDEX}: weight_map: no tensor 'model.language_model.layers.3.self_attn.o_proj.weight' "
                   "(needed by devices[2] for decoder.layer.3)")


# ---- the plan ---------------------------------------------------------------------------------

def test_block_on_no_device_is_refused(ckpt, tmp_path, prompts):
    doc = plan_doc(ckpt)
    doc["devices"][2]["blocks"].remove("decoder.layer.3")
    assert_refused(run_cli(doc, tmp_path, prompts), tmp_path,
                   "plan.json: blocks: 'decoder.layer.3' is placed on no device")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1"])
def test_torch_device_torch_cannot_parse_is_refused(ckpt, tmp_path, prompts, bad):
    doc = plan_doc(ckpt)
    doc["devices"][1]["torch_device"] = bad
    assert_refused(run_cli(doc, tmp_path, prompts), tmp_path,
                   "plan.json: devices[1].torch_device: must be a torch device", json.dumps(bad))


def test_torch_device_absent_on_this_host_is_refused(ckpt, tmp_path, prompts):
    doc = plan_doc(ckpt)
    doc["devices"][1]["torch_device"] = "cuda:7"
    n = torch.cuda.device_count()
    assert n < 8
    assert_refused(run_cli(doc, tmp_path, prompts), tmp_path,
                   f"plan.json: devices[1].torch_device: 'cuda:7' does not exist on this host ({n} CUDA device")


def test_more_threads_than_cores_is_refused(ckpt, tmp_path, prompts):
    doc = plan_doc(ckpt)
    doc["devices"][2]["threads"] = 10**6
    assert_refused(run_cli(doc, tmp_path, prompts), tmp_path,
                   f"plan.json: devices[2].threads: 1000000 is more than this host's {os.cpu_count()} cores")


@pytest.mark.parametrize("emulation, field", [({"slowdown": 0.5}, "emulation.slowdown: must be >= 1"),
                                               ({"slowdonw": 2.0}, "emulation.slowdonw: unknown field")])
def test_bad_emulation_is_refused_as_in_cluster_json(ckpt, tmp_path, prompts, emulation, field):
    doc = plan_doc(ckpt)
    doc["devices"][1]["emulation"] = emulation
    assert_refused(run_cli(doc, tmp_path, prompts), tmp_path, f"plan.json: devices[1].{field}")


def test_a_sound_plan_and_checkpoint_pass_the_preflight(ckpt):
    """The control: the undamaged sharded checkpoint passes, with the hash the ranks are given."""
    from adaptlink.preflight import check_run
    from partitioner.types import Plan

    plan = Plan.from_dict(plan_doc(ckpt))
    assert check_run(plan, "plan.json", local_ranks=range(3)) == plan.plan_hash()


# ---- the plan hash handed to the ranks --------------------------------------------------------

def test_plan_swapped_after_the_preflight_is_refused_by_the_ranks(ckpt, tmp_path, prompts, monkeypatch):
    """plan.json replaced between the launcher's pre-flight and the ranks' start: every rank
    refuses it with one line, exit 2; the run is not served and no dropout is blamed."""
    import runtime.launcher
    from adaptlink.cli import main

    path = write_plan(tmp_path / "plan.json", plan_doc(ckpt))
    swapped = plan_doc(ckpt)
    swapped["workload"]["in_flight"] = 1
    real = runtime.launcher.Launcher.start

    def swap_then_launch(self):
        write_plan(path, swapped)
        return real(self)

    monkeypatch.setattr(runtime.launcher.Launcher, "start", swap_then_launch)
    rc = main(["run", "--plan", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
               "--metrics", str(tmp_path / "metrics.json"), "--log-dir", str(tmp_path / "logs"), "--timeout", "120"])
    assert rc == 2
    logs = {r: (tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(3)}
    refusal = re.compile(rf"adaptlink.launch: error: {re.escape(str(path))}: changed since the launcher checked "
                         rf"it \(plan hash \w{{12}}, checked \w{{12}}\): rank 0 refuses to start; run again")
    assert refusal.search(logs[0]), logs[0]
    # nothing was served: the launcher gave every request an error row naming the coordinator's exit
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows and all("error" in r and not r["tokens"] for r in rows), rows
    assert all("Traceback" not in x and "failover" not in x for x in logs.values())


def test_a_rank_told_another_plan_hash_refuses_before_joining(ckpt, tmp_path, prompts):
    """A rank started directly with a hash that is not its plan's: exit 2, one line, fast
    (it never joins: no store is listening at MASTER_PORT)."""
    path = write_plan(tmp_path / "plan.json", plan_doc(ckpt))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9",
           "ADAPTLINK_LAUNCHER": "1", "ADAPTLINK_PLAN_HASH": "0" * 64}
    r = subprocess.run([sys.executable, "-m", "adaptlink.launch", "--plan", str(path), "--prompts", str(prompts)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"adaptlink.launch: error: {path}: changed since"), r.stderr
    assert "rank 1 refuses to start" in errors[0]
    assert "Traceback" not in r.stderr


# ---- which shards a device opens --------------------------------------------------------------

def test_a_device_opens_only_the_shards_holding_its_tensors(sharded, monkeypatch):
    import safetensors

    from adaptlink.model.blocks import LlavaBlocks

    opened = []
    real = safetensors.safe_open

    def recording(filename, *args, **kwargs):
        opened.append(Path(filename).name)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    wm = weight_map(sharded)
    want = {f for n, f in wm.items() if n.startswith("language_model.model.layers.2.")}
    blocks = LlavaBlocks.load(str(sharded), ["decoder.layer.2"])
    assert sorted(opened) == sorted(want) and len(want) < len(set(wm.values()))
    # and the weights are the checkpoint's
    name = "language_model.model.layers.2.mlp.up_proj.weight"
    stored = load_file(sharded / wm[name])[name]
    assert torch.equal(blocks.model.get_parameter("model.language_model.layers.2.mlp.up_proj.weight"), stored)
