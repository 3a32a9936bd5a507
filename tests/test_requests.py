"""prompts.jsonl in: every bad line fails alone, with its field named; stop ids as generate reads them.

Unit tier: `read_prompts` on files mixing good and bad lines, no process group. The
multi-rank run of one such file (every good request identical to HF generate) is at the
end of tests/test_runtime.py.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from adaptlink.model.blocks import LlavaBlocks
from adaptlink.model.reference import eos_ids, generate, load_generation_config, pad_id
from adaptlink.model.reference import hf_reference, load_reference
from adaptlink.model.samples import read_requests, write_sample_requests
from plans import all_blocks
from runtime.requests import MAX_IMAGE_PIXELS, RequestLimits, Result, read_prompts


def two_eos_checkpoint(src: Path, dst: Path, requests: list[dict],
                       max_new_tokens: int = 10) -> tuple[Path, int, int, list[int]]:
    """A copy of checkpoint `src` whose generation_config.json lists two eos ids, [eos, extra],
    `extra` being a token HF's greedy run of one of `requests` emits at a step >= 2 and not before.

    Returns (directory, that request's index, extra, the tokens generate gives it there: up to
    and including `extra`). config.json still names only the first eos id, as in every
    Llama-3-based checkpoint."""
    for i, tokens in enumerate(hf_reference(src, requests, max_new_tokens)):
        k = next((k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] != 2), None)
        if k is not None:
            break
    else:
        raise AssertionError("no request emits a new token at step >= 2: pick other requests")
    shutil.copytree(src, dst)
    gc_path = dst / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    first = gc["eos_token_id"]
    gc["eos_token_id"] = [first, tokens[k]]
    gc_path.write_text(json.dumps(gc, indent=1))
    assert json.loads((dst / "config.json").read_text())["text_config"]["eos_token_id"] == first
    return dst, i, tokens[k], tokens[: k + 1]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    model, processor = load_reference(tiny_ckpt)
    return model, processor, RequestLimits.from_config(model.config)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_requests(tmp_path_factory.mktemp("req"), n=2, seed=3, max_new_tokens=6)


def _read(path: Path, tiny, **kw):
    model, processor, limits = tiny
    requests, failed = read_prompts(path, processor, limits=kw.pop("limits", limits), **kw)
    rows = {r.line: ("ok", r) for r in requests} | {f.line: ("error", f) for f in failed}
    return [rows[k] for k in sorted(rows)]


def _write(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


# ---- each bad kind of line fails alone, naming its field ----------------------------------------

def test_each_bad_line_fails_alone_naming_its_field(tiny, sample, tmp_path):
    good = json.loads(sample.read_text().splitlines()[0])
    text = {"prompt": "USER: hello ASSISTANT:", "max_new_tokens": 4}
    cases = [  # (line, what its error must say)
        (b'{"id": "latin1", "prompt": "caf\xe9"}', "not valid UTF-8"),
        ({"id": "seed", **text, "seed": 2**64}, "seed"),
        ({"id": "seedneg", **text, "seed": -1}, "seed"),
        (b'{"id": "nan", "prompt": "x", "temperature": NaN}', "temperature"),
        ({"id": "denormal", **text, "temperature": 1e-310}, "temperature"),
        ({"id": "inf", **text, "top_p": float("inf")}, "top_p"),
        ({"id": "big", "input_ids": [1, 2**63]}, "input_ids[1]"),
        ({"id": "vocab", "input_ids": [1, tiny[2].vocab_size]}, "input_ids[1]"),
        ({"id": "imgtok", "input_ids": [1, tiny[2].image_token_id]}, "image token"),
        ({"id": "ctx", "prompt": "hello " * 600}, "max_position_embeddings"),
        ({"id": "ctx2", **text, "max_new_tokens": tiny[2].context - 2}, "max_position_embeddings"),
        ({"id": "maxnew", **text, "max_new_tokens": 10**6}, "max_new_tokens"),
        ({"id": "stop", **text, "stop_token_ids": [2**70]}, "stop_token_ids"),
        (b"[" * 100_000, "not valid JSON"),                       # nested past the recursion limit
        (b'{"id": "digits", "max_new_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        ({"id": 1.5, **text}, "id: must be a string or an integer"),
        ({"id": None, **text}, "id: must be a string or an integer"),
        ({"id": True, **text}, "id: must be a string or an integer"),
        ({"id": ["a"], **text}, "id: must be a string or an integer"),
    ]
    path = _write(tmp_path / "p.jsonl", [good] + [c for c, _ in cases] + [{**good, "id": "last"}])
    rows = _read(path, tiny)
    assert [k for k, _ in rows] == ["ok"] + ["error"] * len(cases) + ["ok"]
    for (kind, row), (_, want) in zip(rows[1:-1], cases):
        assert f"{path}:{row.line}: " in row.error and want in row.error, (row.line, row.error)
    # a bad id's row gets a generated id, never "None" or a Python repr
    assert [r.id for _, r in rows[-5:-1]] == [f"line{n}" for n in range(len(cases) - 2, len(cases) + 2)]
    # the good lines around them are served as if alone
    alone = _read(_write(tmp_path / "alone.jsonl", [good]), tiny)[0][1]
    assert torch.equal(rows[0][1].input_ids, alone.input_ids) and torch.equal(rows[-1][1].input_ids, alone.input_ids)


def test_seed_at_the_top_of_its_range_is_served(tiny, tmp_path):
    rows = _read(_write(tmp_path / "p.jsonl", [{"id": "s", "prompt": "x", "seed": 2**64 - 1, "temperature": 1.0}]), tiny)
    assert rows[0][0] == "ok" and rows[0][1].seed == 2**64 - 1
    torch.Generator().manual_seed(rows[0][1].seed)  # the coordinator's use of it


def test_context_limit_counts_prompt_image_and_new_tokens(tiny, sample, tmp_path):
    good = json.loads(sample.read_text().splitlines()[0])
    n = _read(_write(tmp_path / "a.jsonl", [good]), tiny)[0][1].input_ids.shape[1]  # image tokens included
    ctx = tiny[2].context
    rows = _read(_write(tmp_path / "b.jsonl", [{**good, "max_new_tokens": ctx - n},
                                               {**good, "id": "over", "max_new_tokens": ctx - n + 1}]), tiny)
    assert [k for k, _ in rows] == ["ok", "error"]
    assert f"{n} prompt tokens + {ctx - n + 1} new" in rows[1][1].error
    # the default --max-new-tokens is held to the same bound, and named as the default
    rows = _read(_write(tmp_path / "c.jsonl", [{"id": "d", "prompt": "x"}]), tiny, default_max_new_tokens=ctx + 1)
    assert rows[0][0] == "error" and "max_new_tokens (the default, --max-new-tokens)" in rows[0][1].error


def test_a_line_over_the_byte_cap_is_refused_unread(tiny, tmp_path):
    cap = 1000
    lines = [{"id": "a", "prompt": "x"}, {"id": "huge", "prompt": "y" * 5000}, {"id": "b", "prompt": "z"}]
    rows = _read(_write(tmp_path / "p.jsonl", lines), tiny, limits=RequestLimits(max_line_bytes=cap))
    assert [(k, r.id) for k, r in rows] == [("ok", "a"), ("error", "line2"), ("ok", "b")]
    assert "longer than the 1000-byte limit" in rows[1][1].error
    # the default cap: a 9 MiB line is refused the same way, and lines after it are read
    big = tmp_path / "big.jsonl"
    big.write_bytes(json.dumps(lines[0]).encode() + b"\n" + b"y" * (9 * 2**20) + b"\n" + json.dumps(lines[2]).encode())
    assert [(k, r.id) for k, r in _read(big, tiny)] == [("ok", "a"), ("error", "line2"), ("ok", "b")]


def test_a_non_utf8_byte_fails_its_line_only_and_a_bom_is_allowed(tiny, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\r\n{"id": "b", "prompt": "\xff"}\n{"id": "c", "prompt": "y"}')
    rows = _read(path, tiny)
    assert [(k, r.id) for k, r in rows] == [("ok", "a"), ("error", "line2"), ("ok", "c")]
    assert "byte 0xff" in rows[1][1].error


# ---- ids -------------------------------------------------------------------------------------

def test_ids_are_echoed_as_given_and_generated_ids_never_collide(tiny, tmp_path):
    lines = [{"id": 7, "prompt": "x"},             # an int stays an int
             {"prompt": "no id"},                   # line2, taken below: gets line2~1
             {"id": "line2", "prompt": "given"},
             {"id": "line2~1", "prompt": "given"},  # so it gets line2~2
             {"prompt": "no id"},                   # line5
             {"id": "7", "prompt": "a string 7 is another id than the int 7"},
             {"id": 7, "prompt": "twice"}]
    rows = _read(_write(tmp_path / "p.jsonl", lines), tiny)
    ids = [r.id for _, r in rows]
    assert ids == [7, "line2~2", "line2", "line2~1", "line5", "7", 7]
    assert type(ids[0]) is int and [k for k, _ in rows] == ["ok"] * 6 + ["error"]
    assert 'id: 7 appears twice' in rows[-1][1].error
    served = [r.id for k, r in rows if k == "ok"]
    assert len(set(map(json.dumps, served))) == len(served)
    assert json.loads(json.dumps(Result(id=ids[0]).to_json()))["id"] == 7


# ---- images ----------------------------------------------------------------------------------

def write_bomb_png(path: Path) -> Path:
    """A 20000 x 20000 PNG of ~50 KB: decoded, 1.2 GB as RGB."""
    Image.new("1", (20000, 20000)).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    return path


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    return write_bomb_png(tmp_path_factory.mktemp("img") / "bomb.png")


def test_images_beyond_the_pixel_limit_are_refused_before_decoding(tiny, bomb_png, tmp_path):
    between = tmp_path / "between.png"  # over our cap, under PIL's own: PIL alone would decode it
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    assert side * side < Image.MAX_IMAGE_PIXELS
    Image.new("1", (side, side)).save(between)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(ok)
    lines = [{"id": i, "prompt": "<image> what?", "image": str(p)} for i, p in
             (("bomb", bomb_png), ("between", between), ("ok", ok))]
    rows = _read(_write(tmp_path / "p.jsonl", lines), tiny)
    assert [k for k, _ in rows] == ["error", "error", "ok"]
    assert "pixel limit" in rows[0][1].error and "bomb.png" in rows[0][1].error
    assert f"{side} x {side}" in rows[1][1].error and "pixel limit" in rows[1][1].error


def test_a_fifo_or_device_as_image_is_refused_without_blocking(tiny, tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing PIL can use
    lines = [{"id": i, "prompt": "<image> what?", "image": p} for i, p in
             (("fifo", str(fifo)), ("dev", "/dev/zero"), ("dir", str(tmp_path)), ("bad", str(bad)),
              ("nul", "a\u0000b.png"))]
    path = _write(tmp_path / "p.jsonl", lines)
    got = []
    t = threading.Thread(target=lambda: got.append(_read(path, tiny)), daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # blocked opening the FIFO: release it, then fail
        open(fifo, "wb").close()
        pytest.fail("read_prompts blocked on a FIFO given as an image")
    rows = got[0]
    assert [k for k, _ in rows] == ["error"] * 5
    for (_, r), want in zip(rows, ["not a regular file"] * 3 + ["cannot read", "cannot open"]):
        assert want in r.error and "image" in r.error, r.error


# ---- stop ids from generation_config.json ------------------------------------------------------

def test_stop_ids_come_from_generation_config_as_generate_reads_them(tiny_ckpt, sample, tmp_path):
    """Two eos ids in generation_config.json, the second emitted early: read_prompts' stop ids and
    the reference executor stop where HF generate stops."""
    ckpt, i, extra, want = two_eos_checkpoint(Path(tiny_ckpt), tmp_path / "ckpt", read_requests(sample))
    req = read_requests(sample)[i]
    assert hf_reference(ckpt, [req], 10)[0] == want  # generate stops at the second eos id
    model, processor = load_reference(ckpt)
    gc = load_generation_config(ckpt, model.config)
    assert eos_ids(model.config, gc) == {2, extra} and eos_ids(model.config) == {2}  # config.json: one
    assert pad_id(model.config, gc) == 3
    requests, _ = read_prompts(sample, processor, eos_token_ids=frozenset(eos_ids(model.config, gc)))
    assert {2, extra} <= requests[i].stop_token_ids
    blocks = LlavaBlocks.load(str(ckpt), all_blocks(str(ckpt)))
    inputs = processor(images=[Image.open(req["image"]).convert("RGB")], text=[req["prompt"]], return_tensors="pt")
    out = generate(blocks, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                   max_new_tokens=10, generation_config=gc)
    assert out.tokens[0].tolist() == want
    # no generation_config.json: derived from config.json, as from_pretrained does
    (ckpt / "generation_config.json").unlink()
    assert eos_ids(model.config, load_generation_config(ckpt, model.config)) == {2}


def test_an_unforeseen_error_reading_a_line_fails_that_line_only(tiny, monkeypatch, tmp_path):
    import runtime.requests as rq

    real = rq._check_context

    def boom(where, name, n, max_new, limits):
        if n == 3:
            raise RuntimeError("unforeseen")
        return real(where, name, n, max_new, limits)

    monkeypatch.setattr(rq, "_check_context", boom)
    lines = [{"id": "a", "input_ids": [1, 5]}, {"id": "b", "input_ids": [1, 5, 6]}, {"id": "c", "input_ids": [1]}]
    rows = _read(_write(tmp_path / "p.jsonl", lines), tiny)
    assert [(k, r.id) for k, r in rows] == [("ok", "a"), ("error", "b"), ("ok", "c")]
    assert "RuntimeError: unforeseen" in rows[1][1].error and f"{tmp_path / 'p.jsonl'}:2: " in rows[1][1].error
