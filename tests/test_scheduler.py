"""The coordinator's micro-batch scheduler (runtime.scheduler): pure rules, no model."""
from __future__ import annotations

import pytest

from runtime.scheduler import BatchLimits, KVLedger, Pending, Piece, form_batch, image_span


def test_decode_rows_go_first_and_a_long_prompt_is_chunked_behind_them():
    pending = [Pending(0, pos=0, todo=600, image=None, order=0),   # a long prompt, oldest
               *[Pending(i, pos=40 + i, todo=1, order=i) for i in range(1, 5)]]  # 4 decoding
    rows = form_batch(pending, rows=8, tokens=64)
    assert [r.req for r in rows] == [1, 2, 3, 4, 0]
    assert all(r.q == 1 and r.last for r in rows[:4])
    assert rows[4] == Piece(0, 0, 60, False, last=False)  # what is left of the budget
    assert sum(r.q for r in rows) == 64


def test_a_chunk_never_cuts_the_image_tokens():
    p = Pending(7, pos=0, todo=30, image=(5, 21), order=0)  # 16 image tokens at 5..20
    assert form_batch([p], rows=4, tokens=10) == [Piece(7, 0, 5, False, last=False)]  # stops before
    p.pos, p.todo = 5, 25
    # the image tokens alone exceed the budget: they go whole, alone
    assert form_batch([p], rows=4, tokens=10) == [Piece(7, 5, 16, True, last=False)]
    # ... but not beside another row: a later micro-batch takes them
    other = Pending(8, pos=3, todo=1, order=1)
    assert form_batch([p, other], rows=4, tokens=10) == [Piece(8, 3, 1, False, last=True)]
    # room for all: one chunk, the image inside it
    p.pos, p.todo, p.image = 0, 30, (5, 21)
    assert form_batch([p], rows=4, tokens=64) == [Piece(7, 0, 30, True, last=True)]


def test_row_and_token_limits_hold():
    pending = [Pending(i, pos=0, todo=10, order=i) for i in range(10)]
    rows = form_batch(pending, rows=3, tokens=1000)
    assert [r.req for r in rows] == [0, 1, 2]
    rows = form_batch(pending, rows=10, tokens=25)
    assert [(r.req, r.q, r.last) for r in rows] == [(0, 10, True), (1, 10, True), (2, 5, False)]


def test_image_span_covers_every_image_of_the_request():
    assert image_span([1, 9, 9, 9, 2, 9, 9, 3], 9) == (1, 7)
    assert image_span([1, 2, 3], 9) is None
    assert image_span([1, 2, 3], None) is None


def test_rows_per_batch_spread_requests_over_the_pipeline():
    lim = BatchLimits(rows=32, tokens=256)
    assert lim.in_flight(stages=4) == 5 and lim.in_flight(stages=1) == 1
    assert lim.rows_per_batch(active=10, stages=4) == 2
    assert lim.rows_per_batch(active=1, stages=4) == 1
    assert BatchLimits(rows=4, micro_batches=2).rows_per_batch(active=100, stages=3) == 4
    with pytest.raises(ValueError, match="tokens per micro-batch"):
        BatchLimits(tokens=0)


def test_kv_ledger_admits_only_what_every_stage_can_hold():
    ledger = KVLedger({0: (100, 10_000), 1: (300, 15_000), 2: (50, None)})
    assert ledger.reserve("a", 30)          # 3000 / 9000
    assert not ledger.reserve("b", 30)      # stage 1 would need 18000 > 15000
    assert ledger.free(1) == 6000 and ledger.free(2) is None
    assert ledger.reserve("b", 20)          # 6000 fits exactly
    assert not ledger.fits(1)
    ledger.release("a")
    assert ledger.fits(30) and ledger.ever_fits(50) and not ledger.ever_fits(51)
    assert ledger.too_small(51) == 1 and ledger.too_small(50) is None  # the stage that can never hold it
    assert ledger.stats()[1] == {"bytes_per_token": 300, "budget": 15_000, "reserved": 6000}
