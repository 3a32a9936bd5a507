"""Nothing finished is ever lost: out.jsonl is written as requests finish, completed however
the run ends (the coordinator SIGKILLed, SIGTERM of `adaptlink run`, --timeout, a full disk),
`--resume` finishes an interrupted job with HF generate's tokens, outputs that cannot be
written are refused before any device starts, and the metrics file exists on every path.

Unit tests of the writer first; then real runs of `adaptlink run` (gloo ranks on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptlink.model.reference import hf_reference

from adaptlink.model.samples import write_sample_requests
from plans import chain_shares, manual_plan, write_plan
from runtime.requests import OutputError, Result, ResultWriter, complete_output, completed_rows, id_key, read_rows

RUN = (sys.executable, "-m", "adaptlink.cli", "run")


def rows_of(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs at tmp_path/fs (we run as root in CI; skipped, saying why, where not)."""
    where = tmp_path / "fs"
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path, leave_bytes: int) -> None:
    """Fill the tmpfs but for `leave_bytes` (a multiple of its 4 KiB pages)."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    (fs / "filler").write_bytes(b"\0" * (free - leave_bytes))
    assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize == leave_bytes


# ---- the writer ----------------------------------------------------------------------------------

def test_writer_streams_each_row_and_ends_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "stale", "tokens": [1]}\n')  # an earlier run's
    w = ResultWriter(out).start([(2, {"id": "bad", "error": "x", "tokens": []})])
    assert rows_of(out) == [{"id": "bad", "error": "x", "tokens": []}]  # the stale row is gone at once
    w.add(Result("c", tokens=[3], line=3))
    w.add(Result("a", tokens=[1], line=1))
    # on disk as soon as added (a SIGKILL now loses nothing), in the order they finished
    assert [r["id"] for r in rows_of(out)] == ["bad", "c", "a"]
    w.close()
    assert [r["id"] for r in rows_of(out)] == ["a", "bad", "c"]  # one per input line, in input order
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))


def test_resume_reads_complete_rows_and_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "tokens": [1]}\n{"id": "b", "error": "cancelled", "tokens": [2]}\n{"id": "c", "tok')
    assert completed_rows(out) == {id_key("a"): {"id": "a", "tokens": [1]}}  # b failed, c was torn
    # ids are echoed as given: the integer 1 and the string "1" are two requests
    (tmp_path / "ints.jsonl").write_text('{"id": 1, "tokens": [5]}\n{"id": "1", "error": "x", "tokens": []}\n')
    assert completed_rows(tmp_path / "ints.jsonl") == {id_key(1): {"id": 1, "tokens": [5]}}
    out.write_text('{"id": "a", "tokens": [1]}\n{"id": "c", "tok\n{"id": "d", "tokens": []}\n')
    with pytest.raises(OutputError, match=r"out.jsonl:2: not an out.jsonl row"):
        read_rows(out)  # damage before the last line is not a crash's: refused, naming the line


def test_complete_output_gives_each_missing_request_an_error_row_in_input_order(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a"}\n\n{"id": "b"}\nnot json\n{"id": "c"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "c", "tokens": [3]}\n{"id": "a", "tokens": [1]}\n{"id": "b", "tok')
    assert complete_output(out, prompts, "not finished: killed") == ["b", "line4"]
    assert rows_of(out) == [{"id": "a", "tokens": [1]}, {"id": "b", "error": "not finished: killed", "tokens": []},
                            {"id": "line4", "error": "not finished: killed", "tokens": []},
                            {"id": "c", "tokens": [3]}]


def test_a_full_disk_leaves_only_whole_rows_and_says_which_file(tmpfs):
    out = tmpfs / "out.jsonl"
    w = ResultWriter(out).start()
    fill(tmpfs, 4096)  # one page left: rows of ~150 bytes fill it, the next write is cut short
    written = 0
    with pytest.raises(OutputError, match=rf"{out}: cannot write: No space left on device"):
        for i in range(100):
            w.add(Result(f"r{i}", tokens=list(range(20)), line=i + 1))
            written += 1
    size = out.stat().st_size
    torn = len(json.dumps(Result(f"r{written}", tokens=list(range(20))).to_json())) + 1
    assert size <= 4096 < size + torn  # the page was filled up to the row that did not fit
    rows = rows_of(out)  # every line parses: the torn row was cut off
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(written)]
    w.add(Result("later", line=200))  # kept in memory only; no second exception
    with pytest.raises(OutputError):
        w.close()
    assert len(rows_of(out)) == written


# ---- refused before any device starts ----------------------------------------------------------

def _refused(tiny_ckpt, tmp_path, *args):
    plan = write_plan(tmp_path / "plan.json", manual_plan(str(tiny_ckpt), chain_shares(str(tiny_ckpt), [4])))
    prompts = write_sample_requests(tmp_path / "req", n=1, max_new_tokens=2)
    t = time.monotonic()
    p = subprocess.run([*RUN, "--plan", str(plan), "--prompts", str(prompts), "--log-dir", str(tmp_path / "logs"),
                        *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line
    assert not (tmp_path / "logs").exists()  # no rank was started
    assert time.monotonic() - t < 60
    return p.stderr


def test_unwritable_outputs_are_refused_before_any_device_starts(tiny_ckpt, tmp_path, tmpfs):
    err = _refused(tiny_ckpt, tmp_path, "--out", str(tmp_path / "no" / "such" / "out.jsonl"))
    assert "--out" in err and "does not exist" in err
    (tmp_path / "file").write_text("")
    err = _refused(tiny_ckpt, tmp_path, "--out", str(tmp_path / "out.jsonl"), "--metrics", str(tmp_path / "file" / "m.json"))
    assert "--metrics" in err and "does not exist (or is not a directory)" in err
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    err = _refused(tiny_ckpt, tmp_path, "--out", str(tmpfs / "out.jsonl"))
    assert "--out" in err and "read-only" in err
    err = _refused(tiny_ckpt, tmp_path, "--out", str(tmp_path / "out.jsonl"), "--resume", "--metrics", str(tmpfs / "m"))
    assert "--metrics" in err and "read-only" in err


# ---- real runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    return write_sample_requests(tmp_path_factory.mktemp("req"), n=5, seed=11, max_new_tokens=10)


@pytest.fixture(scope="module")
def reference_tokens(tiny_ckpt, requests_file):
    return hf_reference(tiny_ckpt, requests_file)


def _copies(requests_file, reference_tokens, path, n):
    """`n` copies of the 5 sample requests under new ids; {id: HF tokens}."""
    lines = [json.loads(x) for x in requests_file.read_text().splitlines()]
    want, out = {}, []
    for k in range(n):
        for line, ref in zip(lines, reference_tokens):
            out.append(json.dumps({**line, "id": f"{line['id']}_{k}"}))
            want[f"{line['id']}_{k}"] = ref
    path.write_text("\n".join(out) + "\n")
    return path, want


def _plan(tiny_ckpt, tmp_path, slowdown=1.0):
    ckpt = str(tiny_ckpt)
    return write_plan(tmp_path / "plan.json", manual_plan(ckpt, chain_shares(ckpt, [4]), in_flight=1,
                                                           slowdowns=[1.0, slowdown]))


def _run(plan, prompts, out, metrics, *extra, timeout=240):
    return subprocess.run([*RUN, "--plan", str(plan), "--prompts", str(prompts), "--out", str(out),
                           "--metrics", str(metrics), *extra], capture_output=True, text=True, timeout=timeout)


def _check_rows(out, want: dict, error_has: str) -> tuple[list[dict], list[dict]]:
    """One row per request in input order; finished rows carry HF's tokens; the others are
    error rows saying why. Returns (finished, errors)."""
    rows = rows_of(out)
    assert [r["id"] for r in rows] == list(want)
    done = [r for r in rows if "error" not in r]
    errors = [r for r in rows if "error" in r]
    assert all(r["tokens"] == want[r["id"]] for r in done)
    assert all(error_has in r["error"] for r in errors), {r["error"] for r in errors}
    return done, errors


def test_coordinator_sigkilled_keeps_finished_rows_and_resume_completes_them(tiny_ckpt, requests_file,
                                                                              reference_tokens, tmp_path):
    plan = _plan(tiny_ckpt, tmp_path)
    want = dict(zip([json.loads(x)["id"] for x in requests_file.read_text().splitlines()], reference_tokens))
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    out.write_text('{"id": "stale", "tokens": []}\n')
    metrics.write_text('{"stale": true}')
    # one in flight, 10 tokens each: 2 requests are finished when the coordinator dies at >= 25 tokens
    r = _run(plan, requests_file, out, metrics, "--inject", "kill:rank=0,after_tokens=25")
    assert r.returncode != 0
    done, errors = _check_rows(out, want, "the coordinator (rank 0) killed by SIGKILL")
    assert len(done) >= 2 and errors, r.stderr[-3000:]
    m = json.loads(metrics.read_text())
    assert m["written_by"] == "launcher" and "killed by SIGKILL" in m["fatal"]
    assert m["unfinished"] == [x["id"] for x in errors] and m["completed"] == len(done)
    assert "unfinished requests have error rows" in r.stderr

    r = _run(plan, requests_file, out, metrics, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = rows_of(out)
    assert [x["tokens"] for x in rows] == reference_tokens  # as an uninterrupted run
    assert [x for x in rows if x["id"] in {d["id"] for d in done}] == done  # kept as they were
    m = json.loads(metrics.read_text())
    assert m["resumed"] == len(done) and m["completed"] == len(errors) and m["fatal"] is None


def test_stale_outputs_are_replaced_when_the_coordinator_dies_while_loading(tiny_ckpt, requests_file, tmp_path):
    plan = _plan(tiny_ckpt, tmp_path)
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    out.write_text("".join(json.dumps({"id": json.loads(x)["id"], "tokens": [7]}) + "\n"
                           for x in requests_file.read_text().splitlines()))  # looks complete
    metrics.write_text('{"completed": 5}')
    r = _run(plan, requests_file, out, metrics, "--inject", "kill:rank=0,after=0.3")
    assert r.returncode != 0
    rows = rows_of(out)
    assert len(rows) == 5 and all("killed by SIGKILL" in x["error"] for x in rows)
    m = json.loads(metrics.read_text())
    assert m["written_by"] == "launcher" and m["completed"] == 0 and len(m["unfinished"]) == 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_of_adaptlink_run_keeps_finished_rows_and_ends_the_rest(tiny_ckpt, requests_file,
                                                                                   reference_tokens, tmp_path, sig):
    prompts, want = _copies(requests_file, reference_tokens, tmp_path / "prompts.jsonl", 6)
    plan = _plan(tiny_ckpt, tmp_path, slowdown=20.0)  # ~0.5 s a request: 15 s of serving
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    p = subprocess.Popen([*RUN, "--plan", str(plan), "--prompts", str(prompts), "--out", str(out),
                          "--metrics", str(metrics)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and len(out.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read()[-3000:]
            time.sleep(0.05)
        p.send_signal(sig)  # to `adaptlink run` alone: it forwards the end to the coordinator
        _, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + sig, stderr[-3000:]
    done, errors = _check_rows(out, want, f"cancelled: {sig.name}")
    assert len(done) >= 2 and errors
    m = json.loads(metrics.read_text())  # the coordinator's own, with its ranks' numbers
    assert m["signal"] == sig.name and m["fatal"].startswith(f"cancelled: {sig.name}") and set(m["ranks"]) == {"0", "1"}
    assert m["completed"] == len(done) and m["unfinished"] == [x["id"] for x in errors]


def test_timeout_keeps_finished_rows_and_ends_the_rest(tiny_ckpt, requests_file, reference_tokens, tmp_path):
    prompts, want = _copies(requests_file, reference_tokens, tmp_path / "prompts.jsonl", 12)
    plan = _plan(tiny_ckpt, tmp_path, slowdown=20.0)  # ~30 s of serving after ~8 s of start
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    r = _run(plan, prompts, out, metrics, "--timeout", "20")
    assert r.returncode == 124, r.stderr[-3000:]
    done, errors = _check_rows(out, want, "the run exceeded its --timeout")
    assert errors
    m = json.loads(metrics.read_text())
    assert "--timeout" in m["fatal"] and m["completed"] == len(done)
    if "ranks" in m:  # the coordinator was serving (not still loading) when its time ran out
        assert m["signal"] == "SIGALRM" and done
    print(f"--timeout 20: {len(done)} finished, {len(errors)} error rows; metrics by "
          f"{m.get('written_by', 'the coordinator')}")


def test_a_run_where_every_request_fails_does_not_exit_0(tiny_ckpt, tmp_path):
    plan = _plan(tiny_ckpt, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x <image>", "image": "missing.png"}\n{"id": "b", "prompt": ""}\n')
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    r = _run(plan, prompts, out, metrics)
    assert r.returncode == 4, r.stderr[-3000:]
    assert [x["id"] for x in rows_of(out)] == ["a", "b"] and all("error" in x for x in rows_of(out))
    assert "every one of the 2 requests failed" in r.stderr
    assert json.loads(metrics.read_text())["completed"] == 0


def test_a_disk_that_fills_mid_run_ends_it_with_whole_rows_and_one_error_line(tiny_ckpt, requests_file,
                                                                               reference_tokens, tmpfs, tmp_path):
    prompts, want = _copies(requests_file, reference_tokens, tmp_path / "prompts.jsonl", 10)
    plan = _plan(tiny_ckpt, tmp_path)
    out, metrics = tmpfs / "out.jsonl", tmp_path / "metrics.json"
    fill(tmpfs, 4096)  # 50 rows of ~130 bytes do not fit in the page left
    r = _run(plan, prompts, out, metrics)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"{out}: cannot write: No space left on device" in r.stderr
    rows = rows_of(out)  # whole rows only, each as HF's
    assert 0 < len(rows) < len(want) and all(x["tokens"] == want[x["id"]] for x in rows)
    m = json.loads(metrics.read_text())
    assert m["fatal"].startswith(f"not written: {out}: cannot write")


def test_ctrl_c_of_the_terminal_while_loading_ends_at_once_with_every_row(tiny_ckpt, requests_file, tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the ranks leave the end to the
    launcher, the coordinator leaves at once, and every request still gets its row."""
    plan = _plan(tiny_ckpt, tmp_path)
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    p = subprocess.Popen([*RUN, "--plan", str(plan), "--prompts", str(requests_file), "--out", str(out),
                          "--metrics", str(metrics), "--log-dir", str(tmp_path / "logs")],
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "logs" / "rank1.log").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # the ranks are importing torch
        t = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, stderr[-3000:]
    assert time.monotonic() - t < 15  # not the launcher's 20 s grace
    rows = rows_of(out)
    assert len(rows) == 5 and all(x["error"].startswith("cancelled: SIGINT") for x in rows)
    assert json.loads(metrics.read_text())["signal"] == "SIGINT"
    assert "Traceback" not in (tmp_path / "logs" / "rank0.log").read_text()
