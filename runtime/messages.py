"""What each message between ranks must look like, and who may send it.

The transport (`runtime.transport`) proves a message comes from a rank of this run and was
not altered; this module decides whether that rank may send it. Every receive dispatch
(`engine._serve_worker`, `Coordinator.run`) calls `check(src, header, ...)` before acting
on a message; a message that fails is dropped, counted and logged (`Refusals`), never a
crash: a header missing a field once raised KeyError in the worker's loop and ended the rank.

Rules (the role each rank has in the run):
- `route`, `free`, `stop`, `load`: from the coordinator only.
- `loaded`, `error`, `stats`: to the coordinator only; an `error` names its own rank.
- `act` for producer block B under routes version rv: only from the rank that routes v`rv`
  run B on (`input`: the coordinator). This is checked by `StageExecutor.handle`, which
  keeps every route version it has seen: after a failover an in-flight act of the old
  routes still names its old version and is judged by it (then dropped by its epoch).
  So only the head's rank delivers tokens (an `act` of block `head`).

A message of the next issue's typed layer will replace the table; the rules stay.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

log = logging.getLogger(__name__)

LOG_FIRST = 5  # refusals logged per (sender, reason) before only counting them


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0  # not bool: True is an int


def _bool(v: Any) -> bool:
    return type(v) is bool


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _routes(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _nat(r) for k, r in v.items())


def _dict(v: Any) -> bool:
    return isinstance(v, dict)


MAX_ROWS = 4096  # rows of one micro-batch, far above any BatchLimits


def _rows(v: Any) -> bool:
    """A micro-batch's rows: [[req, epoch, pos, q >= 1, has_image], ...], one row per request."""
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_ROWS:
        return False
    for r in v:
        if not (isinstance(r, list) and len(r) == 5 and all(_nat(x) for x in r[:4]) and r[3] >= 1 and _bool(r[4])):
            return False
    return len({r[0] for r in v}) == len(v)


# kind -> required field -> check
FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "act": {"mb": _nat, "rows": _rows, "block": _str, "rv": _nat},
    "route": {"rv": _nat, "routes": _routes},
    "free": {"req": _nat},
    "stop": {},
    "load": {"blocks": _str_list},
    "loaded": {"blocks": _str_list},
    "error": {"req": _nat, "epoch": _nat, "error": _str},
    "stats": {"stats": _dict},
}
OPTIONAL: dict[str, dict[str, Callable[[Any], bool]]] = {"error": {"rank": _nat, "rows": _nat}}
FROM_COORDINATOR = frozenset({"route", "free", "stop", "load"})
TO_COORDINATOR = frozenset({"loaded", "error", "stats"})


class Refused(ValueError):
    """A message this rank will not act on; `reason` is one line, safe to log."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def check(src: int, header: Any, *, me: int, coordinator: int) -> str:
    """The message's kind, once its header has every field of that kind, of the right type,
    and `src` may send it to `me` (the act's route rule is StageExecutor.handle's). Raises Refused."""
    if not isinstance(header, dict):
        raise Refused("?", f"header is a {type(header).__name__}, not a dict")
    kind = header.get("kind")
    fields = FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise Refused("?", f"unknown kind {str(kind)[:40]!r}")
    for name, ok in fields.items():
        if name not in header:
            raise Refused(kind, f"{kind} without field {name!r}")
        if not ok(header[name]):
            raise Refused(kind, f"{kind} field {name!r} has a bad value ({type(header[name]).__name__})")
    for name, ok in OPTIONAL.get(kind, {}).items():
        if name in header and not ok(header[name]):
            raise Refused(kind, f"{kind} field {name!r} has a bad value ({type(header[name]).__name__})")
    if kind in FROM_COORDINATOR and src != coordinator:
        raise Refused(kind, f"{kind} from rank {src}: only the coordinator (rank {coordinator}) sends it")
    if kind in TO_COORDINATOR and me != coordinator:
        raise Refused(kind, f"{kind} from rank {src} to rank {me}: only the coordinator takes it")
    if kind == "error" and header.get("rank", src) != src:
        raise Refused(kind, f"error from rank {src} in the name of rank {header['rank']}")
    return kind


class Refusals:
    """Counts of refused messages by (sender, kind); the first few of each are logged."""

    def __init__(self, rank: int):
        self.rank = rank
        self.counts: Counter[tuple[int, str]] = Counter()

    def add(self, src: int, e: Refused) -> None:
        key = (src, e.kind)
        self.counts[key] += 1
        if self.counts[key] <= LOG_FIRST:
            log.warning("rank %d: dropped a message from rank %d: %s", self.rank, src, e.reason)

    def total(self) -> int:
        return sum(self.counts.values())

    def stats(self) -> dict[str, int]:
        """`"<src>:<kind>" -> count`, JSON-ready."""
        return {f"{s}:{k}": n for (s, k), n in sorted(self.counts.items())}


# ---------------------------------------------------------------------------- size cap
HEADER_ALLOWANCE = 1 << 20  # envelope, route table, stats report
SAFETY = 4  # over the largest tensor set one message of the run can carry
MIN_CAP = 16 << 20


def message_cap(plan, batch=None) -> int:
    """The most bytes one message of this run may carry: SAFETY x the largest thing a block
    edge or the coordinator's input carries at the model's longest context (prompt + every
    generated token: a recompute replay sends them in one prefill), plus HEADER_ALLOWANCE.

    Figures (float32, one image): the tiny test model ~ 16 MiB (the floor); LLaVA-1.5-7B at
    4,096 positions: 4 x 4096 x 4096 x 4 B = 256 MiB. A peer announcing more is fenced
    before anything is allocated (a 4 GiB announcement once blocked a receiver ~4,300 s)."""
    from adaptlink.model.config import ModelInfo, load_config
    from adaptlink.model.graph import dtype_bytes

    source = plan.model["source"]
    config = load_config(source)
    info = ModelInfo.from_config(config, source=source)
    vc, tc = config.vision_config, config.text_config
    nb = max([4] + [dtype_bytes(s.dtype) for s in plan.devices])  # logits are float32
    w = plan.workload
    positions = max(int(getattr(tc, "max_position_embeddings", 0) or 0),
                    w.prefill_tokens + w.decode_tokens)
    images = max(1, w.images_per_request)
    # a micro-batch (`batch`, a runtime.scheduler.BatchLimits) carries up to its token budget,
    # or one prompt whole (image tokens are never cut); the images and logits of all its rows
    rows = batch.rows if batch is not None else 1
    positions = max(positions, batch.tokens if batch is not None else 0)
    images *= rows
    text = positions * (tc.hidden_size * nb + 8)  # hidden state + token ids
    vision = images * (info.patches_per_image + 1) * vc.hidden_size * nb * (1 + len(info.feature_picks))
    pixels = images * 3 * vc.image_size ** 2 * nb
    logits = rows * tc.vocab_size * (nb + 8)
    return max(MIN_CAP, SAFETY * max(text, vision, pixels, logits) + HEADER_ALLOWANCE)
