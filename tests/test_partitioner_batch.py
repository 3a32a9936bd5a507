"""The batch-aware planner: cluster/2 cost tables (and /1 files still read), the cost of a
micro-batch of B rows, the choice of B under memory, the simulator's prediction for a
batched plan, and the run taking B and M from plan.json."""

from __future__ import annotations

import json

import pytest

from adaptlink.cli import main as cli_main
from adaptlink.launch import parser as run_parser
from adaptlink.options import RunOptions
from partitioner.costs import CostModel, measured_seconds, table_seconds
from partitioner.errors import ClusterSpecError, InfeasiblePlanError
from partitioner.planner import make_plan
from partitioner.simulate import simulate
from partitioner.synthetic import synthetic_graph
from partitioner.types import Workload, load_plan
from partitioner.validate import cluster_from_dict, load_cluster
from runtime.scheduler import BatchLimits

ROWS = {"1": 1.0e-3, "2": 2.2e-3, "4": 2.4e-3, "8": 3.0e-3, "16": 4.5e-3, "32": 8.0e-3}
"""One decode step of a decoder layer at 1..32 rows: MKL-like, 2 rows cost more than 2 x 1."""


def measured(rows=ROWS):
    def kind(pre, dec, table=None):
        t = {"prefill_s": pre, "decode_s": dec}
        if table is not None:
            t["decode_s_by_rows"] = {k: v * dec / ROWS["1"] for k, v in table.items()}
            t["prefill_s_by_tokens"] = {"32": pre / 2, "64": pre}
        return t
    return {"model": "synthetic:tiny", "prefill_tokens": 64, "decode_context": 68, "images_per_request": 1,
            "blocks": {"vision_embed": kind(2e-3, 0.0), "vision_layer": kind(3e-3, 0.0),
                       "projector": kind(1e-3, 0.0), "text_embed": kind(1e-4, 1e-5, rows),
                       "merge": kind(1e-4, 1e-5, rows), "decoder_layer": kind(8e-3, 1e-3, rows),
                       "head": kind(2e-3, 5e-4, rows)}}


def cluster(memory=(2_000_000_000, 2_000_000_000), slowdowns=(1.0, 2.0), schema="adaptlink.cluster/2", rows=ROWS):
    devs = [{"name": f"cpu{i}", "memory_bytes": m, "compute": {"measured": measured(rows if schema.endswith("/2") else None)},
             "emulation": {"slowdown": s, "memory_cap_bytes": None}}
            for i, (m, s) in enumerate(zip(memory, slowdowns))]
    return {"schema": schema, "name": "two", "devices": devs,
            "links": {"default": {"bandwidth_bytes_per_s": 1e9, "latency_s": 1e-4}}}


def graph():
    return synthetic_graph("synthetic:tiny", prefill_tokens=64, decode_tokens=8, dtype="float32")


# ---------------------------------------------------------------------------------------------
# cluster/2 and /1


def test_cluster_2_round_trips_with_its_tables(tmp_path):
    cl = cluster_from_dict(cluster())
    d = cl.to_dict()
    assert d["schema"] == "adaptlink.cluster/2"
    p = tmp_path / "cluster.json"
    p.write_text(json.dumps(d))
    again = load_cluster(p)
    assert again.to_dict() == d
    assert again.devices[0].compute["measured"]["blocks"]["decoder_layer"]["decode_s_by_rows"]["32"] == ROWS["32"]


def test_cluster_1_is_read_and_costs_rows_times_one_row():
    cl = cluster_from_dict(cluster(schema="adaptlink.cluster/1"))
    m = cl.devices[0].compute["measured"]
    notes = []
    pre, dec = measured_seconds(m, "decoder_layer", Workload(64, 8, batch_rows=8), notes=notes)
    assert pre == pytest.approx(8e-3) and dec == pytest.approx(8 * 1e-3)
    assert notes and "cluster/1" in notes[0]
    cm = CostModel.build(graph(), cl, cl.devices, batch_rows=8)
    assert cm.notes  # and the plan says so
    assert make_plan(graph(), cl, batch_rows=8).predicted["notes"] == cm.notes


@pytest.mark.parametrize("bad, field", [({"0": 1.0}, "decode_s_by_rows.0"), ({"x": 1.0}, "decode_s_by_rows.x"),
                                        ({"4": -1.0}, "decode_s_by_rows.4"), ({}, "decode_s_by_rows")])
def test_a_bad_table_is_refused_naming_the_field(bad, field):
    d = cluster()
    d["devices"][1]["compute"]["measured"]["blocks"]["head"]["decode_s_by_rows"] = bad
    with pytest.raises(ClusterSpecError, match=rf"devices\[1\]\.compute\.measured\.blocks\.head\.{field}"):
        cluster_from_dict(d)


def test_an_unknown_schema_is_refused():
    d = cluster(schema="adaptlink.cluster/3")
    with pytest.raises(ClusterSpecError, match="schema"):
        cluster_from_dict(d)


def test_tables_interpolate_between_counts_and_extrapolate_in_proportion_beyond():
    t = {"1": 1.0, "4": 2.5, "8": 3.0}
    assert table_seconds(t, 1) == (1.0, False)
    assert table_seconds(t, 2) == (pytest.approx(1.5), False)  # 1 + (2.5 - 1) / 3
    assert table_seconds(t, 6) == (pytest.approx(2.75), False)
    assert table_seconds({"4": 2.0, "8": 3.0}, 2) == (2.0, False)  # below: never cheaper than measured
    assert table_seconds(t, 16) == (pytest.approx(6.0), True)     # beyond: 8 rows' per-row cost
    notes = []
    m = measured()
    _, dec = measured_seconds(m, "decoder_layer", Workload(64, 8, batch_rows=64), notes=notes)
    assert dec == pytest.approx(2 * ROWS["32"]) and "extrapolated" in notes[0]


# ---------------------------------------------------------------------------------------------
# the cost of a micro-batch


def test_a_batched_plan_costs_a_request_its_share_of_the_micro_batch():
    cl = cluster_from_dict(cluster())
    one, eight = (CostModel.build(graph(), cl, cl.devices, batch_rows=B, micro_batches=3) for B in (1, 8))
    d = eight.blocks.index("decoder.layer.0")
    assert eight.decode_s[d, 1] == pytest.approx(2.0 * ROWS["8"])  # one micro-batch step, slowdown 2
    assert eight.compute_s[d, 1] == pytest.approx(one.prefill_s[d, 1] + 8 * 2.0 * ROWS["8"] / 8)
    assert eight.workload.in_flight == 24 and eight.customers == 3
    # KV for B * M rows: 8x the rows of B = 1
    assert eight.kv_bytes[d, 0] == pytest.approx(8 * one.kv_bytes[d, 0])
    # one message per micro-batch step on a decode edge
    e = next(i for i, (u, v) in enumerate(eight.edges) if eight.blocks[u] == "decoder.layer.0")
    assert eight.edge_messages[e] == pytest.approx(1 + 8 / 8) and one.edge_messages[e] == 1 + 8


def test_the_simulator_predicts_a_batched_plan():
    """One device, one micro-batch in flight: every step waits for the one before, so a
    micro-batch of B requests takes B prefills plus T steps of the B-row micro-batch."""
    d = cluster()
    d["devices"] = d["devices"][:1]
    cl = cluster_from_dict(d)
    for B in (1, 4, 8):
        cm = CostModel.build(graph(), cl, cl.devices, batch_rows=B, micro_batches=1)
        assign = [0] * cm.n_blocks
        sim = simulate(cm, assign)
        T = cm.workload.decode_tokens
        vision = [i for i, k in enumerate(cm.kinds) if k.startswith("vision") or k == "projector"]
        per_mb = B * cm.prefill_s[:, 0].sum() + T * sum(cm.decode_s[i, 0] for i in range(cm.n_blocks) if i not in vision)
        assert sim.tokens_per_s == pytest.approx(B * T / per_mb, rel=1e-9)
        assert sim.in_flight == B


def test_the_simulator_reaches_the_bound_with_enough_micro_batches():
    cl = cluster_from_dict(cluster())
    cm = CostModel.build(graph(), cl, cl.devices, batch_rows=8, micro_batches=6)
    assign = [0 if cm.kinds[b] in ("text_embed", "head", "merge") or cm.kinds[b].startswith("vision")
              or cm.kinds[b] == "projector" else 1 for b in range(cm.n_blocks)]
    assert not cm.structure_problems(assign)
    sim = simulate(cm, assign)
    ev = cm.evaluate(assign)
    assert sim.tokens_per_s <= 8 / ev.bottleneck_s * 1.0001
    assert sim.tokens_per_s == pytest.approx(cm.workload.decode_tokens / ev.bottleneck_s, rel=0.05)


# ---------------------------------------------------------------------------------------------
# choosing B


def test_with_room_the_planner_takes_the_largest_b():
    plan = make_plan(graph(), cluster_from_dict(cluster()), batch_rows="auto")
    assert plan.workload.batch_rows == 32 and plan.workload.micro_batches == 3
    assert plan.workload.in_flight == 96
    assert plan.predicted["batch_rows"] == 32
    assert all(s.predicted["memory_bytes"] <= s.predicted["capacity_bytes"] for s in plan.devices)


def test_the_planner_picks_a_smaller_b_when_memory_cannot_hold_more():
    g = graph()
    roomy = cluster_from_dict(cluster())
    need = {B: make_plan(g, roomy, batch_rows=B, backups=False).devices[0].predicted["memory_bytes"] for B in (8, 16)}
    cap = (need[8] + need[16]) // 2  # holds the KV of B = 8, not of 16
    tight = cluster_from_dict(cluster(memory=(cap, cap)))
    plan = make_plan(g, tight, batch_rows="auto", backups=False)
    assert plan.workload.batch_rows in (4, 8)
    assert all(s.predicted["memory_bytes"] <= cap for s in plan.devices)
    with pytest.raises(InfeasiblePlanError):
        make_plan(g, tight, batch_rows=32, backups=False)
    tried = {t["batch_rows"]: t["result"] for t in plan.predicted["batch_search"]["tried"]}
    assert tried[32] != "placed" and tried[16] != "placed"


def test_b_is_worth_more_than_its_rows_cost():
    """Where 2 rows cost more than 2 x one row, B = 2 is not chosen over B = 1."""
    rows = dict(ROWS, **{"2": 2.6e-3, "4": 5.0e-3, "8": 11e-3, "16": 30e-3, "32": 70e-3})
    plan = make_plan(graph(), cluster_from_dict(cluster(rows=rows)), batch_rows="auto")
    assert plan.workload.batch_rows == 1


# ---------------------------------------------------------------------------------------------
# plan.json's B and M are the run's defaults


def test_plan_cli_records_b_and_m_and_the_run_takes_them(tmp_path):
    cpath, out = tmp_path / "cluster.json", tmp_path / "plan.json"
    cpath.write_text(json.dumps(cluster()))
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(cpath), "--prefill-tokens", "64",
                     "--decode-tokens", "8", "--dtype", "float32", "--out", str(out)]) == 0
    plan = load_plan(out)
    B, M = plan.workload.batch_rows, plan.workload.micro_batches
    assert (B, M) == (32, 3)
    assert all("decode_s_per_micro_batch" in s.predicted for s in plan.devices)
    opts = RunOptions.from_args(run_parser().parse_args(["--plan", str(out)]))
    limits = BatchLimits.for_plan(plan.workload, opts.max_batch_rows, opts.max_batch_tokens, opts.micro_batches)
    assert (limits.rows, limits.micro_batches) == (B, M)
    given = RunOptions.from_args(run_parser().parse_args(["--plan", str(out), "--max-batch-rows", "4",
                                                          "--micro-batches", "0"]))
    limits = BatchLimits.for_plan(plan.workload, given.max_batch_rows, given.max_batch_tokens, given.micro_batches)
    assert (limits.rows, limits.micro_batches) == (4, 0)
    # a plan without micro-batches keeps the run's own defaults
    old = BatchLimits.for_plan(Workload(64, 8), None, 256, None)
    assert (old.rows, old.micro_batches) == (32, 0)


def test_plan_cli_none_plans_one_request_per_forward(tmp_path):
    cpath, out = tmp_path / "cluster.json", tmp_path / "plan.json"
    cpath.write_text(json.dumps(cluster()))
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(cpath), "--batch-rows", "none",
                     "--in-flight", "3", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert "batch_rows" not in d["workload"] and d["workload"]["in_flight"] == 3


def test_plan_cli_refuses_a_bad_batch_rows(tmp_path, capsys):
    cpath = tmp_path / "cluster.json"
    cpath.write_text(json.dumps(cluster()))
    assert cli_main(["plan", "--model", "synthetic:tiny", "--cluster", str(cpath), "--batch-rows", "0",
                     "--out", str(tmp_path / "p.json")]) == 2
    assert "--batch-rows" in capsys.readouterr().err
