"""Micro-batches through the blocks: packed rows of several requests give each request's own tokens.

(a) continuous batching through every block in one process equals HF `generate` on each
request alone; (b) the per-stage KV store; (c) the same micro-batches through two holders
with disjoint blocks equal one holder with all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from adaptlink.model.blocks import LlavaBlocks
from adaptlink.model.graph import block_ids
from adaptlink.model.kv import (GrowingKVStore, KVBudgetError, KVError, KVPositionError, SlotKVStore,
                               sdpa_bottom_right)
from adaptlink.model.microbatch import MicroBatch, Row
from adaptlink.model.reference import eos_ids, generate, load_reference
from adaptlink.model.samples import sample_images
from numerics import assert_logits_close

LONG_IMAGE_PROMPT = ("USER: <image>\nWrite a short story about what happens next in this scene, and say "
                     "whether it is day or night. ASSISTANT:")
LONG_TEXT_PROMPT = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps, "
                    "and wrote down the colour of the sea before lighting the lamp:")

# id, prompt, image index (None: text only), max_new_tokens, chunk sizes of the prompt (None: one),
# tick at which it joins. b leaves early; d (image) and e (text) prefill in two chunks next to
# other rows' decodes; e and f join after b has left and its KV was freed.
REQUESTS = [
    ("a", "USER: <image>\nWhat is shown here? ASSISTANT:", 0, 8, None, 0),
    ("b", "Hello there, how are", None, 4, None, 0),
    ("c", "Question: what colour is the <image> mostly? Answer:", 1, 10, None, 0),
    ("d", LONG_IMAGE_PROMPT, 2, 7, "split", 2),
    ("e", LONG_TEXT_PROMPT, None, 6, "split", 5),
    ("f", "<image> Describe it.", 3, 6, None, 6),
]


@dataclass
class Req:
    id: str
    ids: torch.Tensor                  # [L] prompt ids
    pixel_values: torch.Tensor | None  # [1, 3, H, W]
    max_new: int
    chunks: list[int]
    join: int
    pos: int = 0
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return load_reference(tiny_ckpt)


def _requests(processor, image_token_id, spec=REQUESTS) -> list[Req]:
    images = sample_images(4, seed=7)
    out = []
    for rid, prompt, img, max_new, chunks, join in spec:
        if img is None:
            enc = processor(text=[prompt], return_tensors="pt")
            pv = None
        else:
            enc = processor(images=[images[img]], text=[prompt], return_tensors="pt")
            pv = enc["pixel_values"]
        ids = enc["input_ids"][0]
        L = len(ids)
        if chunks == "split":  # the first chunk ends a few tokens after the image, or mid-prompt
            where = (ids == image_token_id).nonzero()
            cut = int(where[-1]) + 4 if len(where) else L // 2
            chunks = [cut, L - cut]
        out.append(Req(rid, ids, pv, max_new, chunks or [L], join))
    return out


def _hf_alone(model, req: Req):
    """HF generate on this request alone: (tokens, logits [n, V])."""
    kw = {"input_ids": req.ids[None], "attention_mask": torch.ones(1, len(req.ids), dtype=torch.long)}
    if req.pixel_values is not None:
        kw["pixel_values"] = req.pixel_values
    with torch.inference_mode():
        out = model.generate(**kw, do_sample=False, max_new_tokens=req.max_new,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(req.ids):].tolist(), torch.cat(out.logits).float()


def _drive(stages, reqs: list[Req], eos: set[int], image_token_id: int, log: list | None = None):
    """Continuous batching: every tick one micro-batch of all active requests (a prefill chunk
    or one decode token each) through `stages` [(holder, block ids, kv store or None)]."""
    pending = sorted(reqs, key=lambda r: r.join)
    active: list[Req] = []
    tick = 0
    while pending or active:
        while pending and pending[0].join <= tick:
            active.append(pending.pop(0))
        rows, ids, pixels = [], [], []
        for r in active:
            if r.chunks:
                q = r.chunks[0]
                part = r.ids[r.pos:r.pos + q]
            else:
                q, part = 1, torch.tensor([r.tokens[-1]])
            has_image = bool((part == image_token_id).any())
            rows.append(Row(r.id, 0, r.pos, q, has_image))
            ids.append(part)
            if has_image:
                pixels.append(r.pixel_values)
        mb = MicroBatch(tuple(rows))
        state = {"input_ids": torch.cat(ids)[None]}
        if pixels:
            state["pixel_values"] = torch.cat(pixels)
        for holder, held, kv in stages:
            state = holder.run_batch(held, mb, state, kv)
        if log is not None:
            log.append((mb.to_header(), state["logits"].clone()))
        for i, r in enumerate(list(active)):
            r.pos += mb.rows[i].q
            if r.chunks:
                r.chunks.pop(0)
                if r.chunks:
                    continue  # a middle chunk: its logits row is not a token
            tok = int(state["token"][i])
            r.tokens.append(tok)
            r.logits.append(state["logits"][i])
            for _, _, kv in stages:
                if kv is not None:
                    assert kv.tokens(r.id) == r.pos
            if len(r.tokens) == r.max_new or tok in eos:
                active.remove(r)
                for _, _, kv in stages:
                    if kv is not None:
                        used = kv.bytes_used
                        assert kv.free(r.id) > 0 and kv.bytes_used < used
                        assert r.id not in kv.requests() and kv.tokens(r.id) == 0
        tick += 1
    return tick


STORES = {"growing": {}, "slots": dict(slots=5, max_tokens=96)}


@pytest.mark.parametrize("store", list(STORES))
def test_continuous_batching_equals_hf_generate_alone(tiny_ckpt, ref, store):
    model, processor = ref
    blocks = LlavaBlocks.load(str(tiny_ckpt), block_ids(LlavaBlocks.from_model(model).info))
    info = blocks.info
    reqs = _requests(processor, info.image_token_id)
    want = {r.id: _hf_alone(model, r) for r in reqs}
    kv = blocks.new_kv_store(**STORES[store])
    log = []
    _drive([(blocks, blocks.block_ids, kv)], reqs, eos_ids(blocks.config), info.image_token_id, log)

    # The schedule exercised what it should: packed prefills, a prefill beside decodes,
    # both halves of a chunked prefill beside decodes, and requests joining after one left.
    headers = [h for h, _ in log]
    assert sum(1 for _, _, _, q, _ in headers[0] if q > 1) == 3
    assert any(any(q > 1 for *_, q, _ in h) and any(q == 1 for *_, q, _ in h) for h in headers)
    d_rows = [row for h in headers for row in h if row[0] == "d"]
    assert d_rows[0][2:] == [0, reqs[3].ids.shape[0] - d_rows[1][3], True] and d_rows[1][4] is False
    assert d_rows[1][2] == d_rows[0][3] > 0
    assert kv.requests() == [] and kv.bytes_used == 0

    for r in reqs:
        tokens, logits = want[r.id]
        assert r.tokens == tokens, r.id
        assert_logits_close(torch.stack(r.logits), logits, r.id)

    # The one-request path still works on layers switched to packed attention.
    alone = generate(blocks, reqs[0].ids[None], None, reqs[0].pixel_values, max_new_tokens=reqs[0].max_new)
    assert alone.tokens[0].tolist() == want["a"][0]


def test_stage_split_equals_one_holder(tiny_ckpt, ref):
    model, processor = ref
    ids = block_ids(LlavaBlocks.from_model(model).info)
    cut = ids.index("decoder.layer.2")
    whole = LlavaBlocks.load(str(tiny_ckpt), ids)
    first, rest = LlavaBlocks.load(str(tiny_ckpt), ids[:cut]), LlavaBlocks.load(str(tiny_ckpt), ids[cut:])
    assert first.new_kv_store().layers == (0, 1) and rest.new_kv_store().layers == (2, 3)
    eos, image_token = eos_ids(whole.config), whole.info.image_token_id
    spec = [s for s in REQUESTS if s[0] in ("a", "b", "d")]

    log_one, log_two = [], []
    one = _requests(processor, image_token, spec)
    _drive([(whole, ids, whole.new_kv_store())], one, eos, image_token, log_one)
    two = _requests(processor, image_token, spec)
    kv_first, kv_rest = first.new_kv_store(), rest.new_kv_store()
    _drive([(first, ids[:cut], kv_first), (rest, ids[cut:], kv_rest)], two, eos, image_token, log_two)

    assert [r.tokens for r in one] == [r.tokens for r in two]
    assert [h for h, _ in log_one] == [h for h, _ in log_two]
    for (_, x), (_, y) in zip(log_one, log_two):
        assert_logits_close(y, x)
    assert kv_first.bytes_used == kv_rest.bytes_used == 0


def test_mqa_and_mha_decode_rows_match_alone(make_ckpt):
    """GQA extremes: packed rows through every block equal each request run alone (reference path)."""
    for kv_heads in (1, 4):
        model, processor = load_reference(make_ckpt(text_kv_heads=kv_heads))
        blocks = LlavaBlocks.from_model(model)
        spec = [s for s in REQUESTS if s[0] in ("a", "b", "c")]
        reqs = _requests(processor, blocks.info.image_token_id, spec)
        _drive([(blocks, blocks.block_ids, blocks.new_kv_store())], reqs, eos_ids(blocks.config),
               blocks.info.image_token_id)
        for r in reqs:
            assert r.tokens == _hf_alone(model, r)[0], (kv_heads, r.id)


def test_run_batch_refuses_a_wrong_pos_before_computing(tiny_ckpt, ref):
    model, processor = ref
    blocks = LlavaBlocks.from_model(model)
    text = [b for b in blocks.block_ids if not b.startswith(("vision", "projector"))]
    kv = blocks.new_kv_store()
    ids = torch.arange(10, 16)[None]
    blocks.run_batch(text, MicroBatch.of(("x", 0, 0, 6, False)), {"input_ids": ids}, kv)
    assert kv.tokens("x") == 6
    mb = MicroBatch.of(("y", 0, 0, 3, False), ("x", 0, 5, 1, False))
    with pytest.raises(KVPositionError, match=r"'x': row at pos 5 but this stage holds 6 tokens"):
        blocks.run_batch(text, mb, {"input_ids": torch.arange(4)[None]}, kv)
    assert kv.requests() == ["x"] and kv.tokens("x") == 6  # y's room was given back
    with pytest.raises(ValueError, match="packs 2 tokens; input_ids is"):
        blocks.run_batch(text, MicroBatch.of(("x", 0, 6, 1, False), ("z", 0, 0, 1, False)),
                         {"input_ids": torch.arange(3)[None]}, kv)
    assert kv.tokens("x") == 6 and kv.requests() == ["x"]
    with pytest.raises(ValueError, match="needs the stage's KV store"):
        blocks.run_batch(text, MicroBatch.of(("x", 0, 6, 1, False)), {"input_ids": ids[:, :1]})


# ---- (b) the KV store ------------------------------------------------------------------------

def _kv(**kw):
    return GrowingKVStore([5, 6], kv_heads=2, head_dim=4, min_capacity=4, **kw)


def _step(kv, req, pos, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv.begin(req, pos, q)
    outs = []
    for layer in kv.layers:
        k, v = torch.randn(1, 2, q, 4, generator=g), torch.randn(1, 2, q, 4, generator=g)
        outs.append((k, v, *kv.append(req, layer, k, v)))
    kv.commit(req)
    return outs


def test_kv_grows_by_doubling_zeroed_and_keeps_history():
    kv = _kv()
    hist = {5: [], 6: []}
    caps = []
    for t in range(20):
        for layer, (k, v, k_all, v_all) in zip(kv.layers, _step(kv, "r", t, 1, seed=t)):
            hist[layer].append(k)
            assert torch.equal(k_all, torch.cat(hist[layer], dim=2)) and k_all.shape == (1, 2, t + 1, 4)
        caps.append(kv.capacity("r"))
        buf = kv._entries["r"].buf
        assert not buf[:, :, :, t + 1:].any(), "beyond the held tokens the buffer is zero"
    assert sorted(set(caps)) == [4, 8, 16, 32] and kv.grows == 4
    assert kv.tokens("r") == 20 and kv.bytes_used == 32 * kv.bytes_per_token
    assert kv.bytes_per_token == 2 * 2 * 2 * 4 * 4 and kv.bytes_for(10) == 10 * kv.bytes_per_token
    k, v = kv.view("r", 6)
    assert torch.equal(k, torch.cat(hist[6], dim=2))
    # A chunk of 40 at once grows to fit (a prefill) in one allocation.
    grows = kv.grows
    _step(kv, "p", 0, 40)
    assert kv.capacity("p") == 64 and kv.grows == grows + 1
    with pytest.raises(KVError, match="not one of this store's layers"):
        kv.view("r", 4)


def test_kv_budget_refuses_and_leaves_the_store_as_it_was():
    kv = _kv(budget_bytes=_kv().bytes_for(24))
    _step(kv, "a", 0, 16)                      # capacity 16
    used = kv.bytes_used
    with pytest.raises(KVBudgetError, match=r"request 'b' needs 9 tokens .* only 1,024 of the stage's 3,072 B") as e:
        kv.begin("b", 0, 9)
    assert e.value.req == "b" and e.value.free_bytes == kv.bytes_for(8)
    assert kv.requests() == ["a"] and kv.bytes_used == used
    _step(kv, "b", 0, 8)                       # exactly what is left fits
    assert kv.bytes_free == 0
    with pytest.raises(KVBudgetError):
        kv.begin("a", 16, 1)                   # "a" cannot grow past 16 now
    assert kv.tokens("a") == 16
    assert kv.free("b") == kv.bytes_for(8)
    _step(kv, "a", 16, 1)                      # the doubling is clipped to what fits
    assert kv.tokens("a") == 17 and kv.capacity("a") == 17
    # All or none: the second row does not fit, so the first row's new request is given back.
    rows = [Row("c", 0, 0, 2), Row("a", 0, 17, 8)]
    with pytest.raises(KVBudgetError):
        kv.begin_batch(rows)
    assert kv.requests() == ["a"] and kv.tokens("a") == 17


def test_kv_free_and_position_checks():
    kv = _kv()
    _step(kv, "r", 0, 5)
    with pytest.raises(KVPositionError, match=r"'r': row at pos 3 but this stage holds 5 tokens"):
        kv.begin("r", 3, 1)
    with pytest.raises(KVPositionError, match="holds 0 tokens of it .* freed or never started"):
        kv.begin("new", 4, 1)
    cap = kv.capacity("r")
    assert cap == 8 and kv.free("r") == cap * kv.bytes_per_token
    assert kv.requests() == [] and kv.bytes_used == 0 and kv.tokens("r") == 0 and kv.free("r") == 0
    with pytest.raises(KVPositionError):
        kv.begin("r", 5, 1)                    # a replay must start again at 0
    _step(kv, "r", 0, 3)
    kv.begin("r", 3, 2)
    with pytest.raises(KVError, match="append of 1 tokens at layer 5, but the step begun has 2"):
        kv.append("r", 5, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    kv.rollback("r")
    assert kv.tokens("r") == 3
    with pytest.raises(KVError, match="two rows"):
        kv.begin_batch([Row("r", 0, 3, 1), Row("r", 0, 3, 1)])


def test_bottom_right_mask_on_a_history_with_gqa():
    g = torch.Generator().manual_seed(0)
    q, L, H, Hkv, Dh = 3, 7, 4, 2, 8
    query = torch.randn(1, H, q, Dh, generator=g)
    key, value = torch.randn(1, Hkv, L, Dh, generator=g), torch.randn(1, Hkv, L, Dh, generator=g)
    got = sdpa_bottom_right(query, key, value, None)
    k, v = key.repeat_interleave(H // Hkv, 1), value.repeat_interleave(H // Hkv, 1)
    scores = query @ k.transpose(-1, -2) / Dh ** 0.5
    allowed = torch.arange(L)[None] <= torch.arange(L - q, L)[:, None]  # query i at position L-q+i
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(got, want)
    # The whole sequence at once (is_causal) agrees with its last q rows computed on their own,
    # and a single query (no mask) with the last row.
    whole = torch.randn(1, H, L, Dh, generator=g)
    full = sdpa_bottom_right(whole, key, value, None)
    torch.testing.assert_close(full[:, :, -q:], sdpa_bottom_right(whole[:, :, -q:], key, value, None))
    torch.testing.assert_close(full[:, :, -1:], sdpa_bottom_right(whole[:, :, -1:], key, value, None))


def test_slot_store_reuses_zeroed_slots_and_refuses_when_full():
    kv = SlotKVStore([3], kv_heads=2, head_dim=4, slots=2, max_tokens=8)
    assert kv.budget_bytes == 2 * 8 * kv.bytes_per_token and kv.bytes_free == kv.budget_bytes
    _step(kv, "a", 0, 5)
    _step(kv, "b", 0, 2)
    assert (kv.slot("a"), kv.slot("b")) == (0, 1) and kv.bytes_free == 0
    with pytest.raises(KVBudgetError, match="all 2 are taken"):
        kv.begin("c", 0, 1)
    with pytest.raises(KVBudgetError, match="needs 9 tokens, a slot holds 8"):
        kv.begin("a", 5, 4)
    assert kv.free("a") == 8 * kv.bytes_per_token and not kv.buf[:, :, 0].any()
    _step(kv, "c", 0, 1)
    assert kv.slot("c") == 0 and kv.tokens("c") == 1 and kv.tokens("a") == 0
