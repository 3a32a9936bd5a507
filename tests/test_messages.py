"""The wire message kinds (runtime.messages): each header built by its kind's function
passes its kind's check, and packs to the bytes of the literal it replaced."""

from __future__ import annotations

import msgpack
import pytest

from runtime import messages
from runtime.messages import SPECS, Kind, Sender, check, kind_of

BUILT = {  # kind -> (header from its builder, the literal the code sent before)
    Kind.ACT: (messages.act(7, [[3, 1, 9, 1, False], [4, 0, 0, 30, True]], "head", 4),
               {"kind": "act", "mb": 7, "rows": [[3, 1, 9, 1, False], [4, 0, 0, 30, True]], "block": "head",
                "rv": 4}),
    Kind.ROUTE: (messages.route(2, {"head": 1}), {"kind": "route", "rv": 2, "routes": {"head": 1}}),
    Kind.FREE: (messages.free(5), {"kind": "free", "req": 5}),
    Kind.STOP: (messages.stop(), {"kind": "stop"}),
    Kind.LOAD: (messages.load(["head"]), {"kind": "load", "blocks": ["head"]}),
    Kind.LOADED: (messages.loaded(["head"]), {"kind": "loaded", "blocks": ["head"]}),
    Kind.ERROR: (messages.error(1, 0, "boom", 2, 3),
                 {"kind": "error", "req": 1, "epoch": 0, "error": "boom", "rank": 2, "rows": 3}),
    Kind.STATS: (messages.stats({"a": 1}), {"kind": "stats", "stats": {"a": 1}}),
}


def test_every_kind_has_a_spec_and_a_builder():
    assert set(SPECS) == set(Kind) == set(BUILT)


@pytest.mark.parametrize("kind", list(Kind))
def test_builder_packs_as_the_literal_and_passes_its_check(kind):
    header, literal = BUILT[kind]
    assert msgpack.packb(header, use_bin_type=True) == msgpack.packb(literal, use_bin_type=True)
    assert type(header["kind"]) is str
    spec = SPECS[kind]
    assert set(header) == {"kind", *spec.fields, *spec.optional}
    src, me = {Sender.COORDINATOR: (0, 2), Sender.TO_COORDINATOR: (2, 0), Sender.PRODUCER: (1, 2)}[spec.sender]
    assert check(src, header, me=me, coordinator=0) is kind is kind_of(header)


def test_kind_of_unknown():
    assert kind_of({"kind": "bogus"}) is None and kind_of(["kind"]) is None and kind_of({}) is None


@pytest.mark.parametrize("rows", [[], [[3, 0, 0, 1, False], [3, 0, 1, 1, False]], [[3, 0, 0, 0, False]],
                                  [[3, 0, -1, 1, False]], [[3, 0, 0, 1, 1]], [[3, 0, 0, 1]], "rows"])
def test_an_act_with_bad_rows_is_refused(rows):
    """No rows, a request twice, q = 0, a negative position, a non-bool image flag, a short row."""
    with pytest.raises(messages.Refused, match="rows"):
        check(1, messages.act(7, rows, "head", 4), me=2, coordinator=0)
