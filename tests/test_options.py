"""RunOptions: the flags of a run as one typed value, to argv and back (adaptlink.options)."""

from __future__ import annotations

import dataclasses

import pytest

from adaptlink.launch import parser
from adaptlink.options import RunOptions
from runtime.roles import StartedBy, process_role

EVERY_FIELD = RunOptions(
    plan="p/plan.json", prompts="prompts.jsonl", out="o/out.jsonl", metrics="m.json", in_flight=3,
    max_new_tokens=7, max_batch_rows=4, max_batch_tokens=48, micro_batches=3,
    inject=["kill:rank=1,after=2.5", "stop:rank=2,after_tokens=9"], recovery="cold",
    cold_from_disk=True, cold_read_mbps=12.5, replay="exact", secret_file="s.hex", log_dir="logs",
    timeout=0.1, resume=True, serve=True, host="0.0.0.0", port=8123, served_model_name="m", max_waiting=5,
    api_key="k", api_key_file="k.txt", allow_remote_images=True, media_dir="media", verbose=True)


def parse(argv: list[str]) -> RunOptions:
    return RunOptions.from_args(parser().parse_args(argv))


def test_every_field_is_set_away_from_its_default():
    defaults = RunOptions(plan="x")
    for f in dataclasses.fields(RunOptions):
        assert getattr(EVERY_FIELD, f.name) != getattr(defaults, f.name), f.name


@pytest.mark.parametrize("opts", [EVERY_FIELD, RunOptions(plan="plan.json"),
                                  RunOptions(plan="a b.json", in_flight=0, cold_read_mbps=0.0, timeout=1e9)])
def test_to_argv_parses_back_to_the_same_options(opts):
    assert parse(opts.to_argv()) == opts


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RunOptions)])
def test_each_field_alone_round_trips(name):
    opts = dataclasses.replace(RunOptions(plan="plan.json"), **{name: getattr(EVERY_FIELD, name)})
    assert parse(opts.to_argv()) == opts


def test_from_args_reads_the_parsers_defaults():
    assert parse(["--plan", "plan.json"]) == RunOptions(plan="plan.json")


def test_cold_read_speed_in_bytes():
    assert EVERY_FIELD.cold_read_bytes_per_s == 12.5e6
    assert RunOptions(plan="p").cold_read_bytes_per_s is None
    assert RunOptions(plan="p", cold_read_mbps=0.0).cold_read_bytes_per_s is None


@pytest.mark.parametrize("env, started_by, rank_of_4, rank_of_1", [
    ({}, StartedBy.NONE, False, False),
    ({"ADAPTLINK_LAUNCHER": "1", "RANK": "2", "WORLD_SIZE": "4"}, StartedBy.LAUNCHER, True, True),
    ({"RANK": "0", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "r"}, StartedBy.TORCHRUN, True, False),
    ({"RANK": "0", "WORLD_SIZE": "1"}, StartedBy.TORCHRUN, False, False),  # launches: one process
    ({"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "r"}, StartedBy.TORCHRUN, False, True),
])
def test_process_role(env, started_by, rank_of_4, rank_of_1):
    role = process_role(env)
    assert role.started_by is started_by
    assert role.is_rank(4) == rank_of_4 and role.is_rank(1) == rank_of_1


def test_launcher_coordinator():
    env = {"ADAPTLINK_LAUNCHER": "1", "RANK": "1", "WORLD_SIZE": "2", "ADAPTLINK_COORDINATOR": "1"}
    assert process_role(env).is_launcher_coordinator
    assert not process_role({**env, "RANK": "0"}).is_launcher_coordinator
    assert not process_role({"RANK": "1", "ADAPTLINK_COORDINATOR": "1"}).is_launcher_coordinator
    assert process_role(env).is_coordinator(1) and process_role(env).rank_index == 1
    assert process_role({}).rank_index == 0


@pytest.mark.parametrize("flag,value", [("--max-batch-rows", "0"), ("--max-batch-tokens", "0"),
                                        ("--micro-batches", "-1")])
def test_batch_limits_out_of_range_are_refused_naming_the_flag(flag, value, tmp_path, capsys):
    from adaptlink.launch import main

    assert main(["--plan", str(tmp_path / "plan.json"), flag, value]) == 2
    assert f"{flag}: must be >=" in capsys.readouterr().err
