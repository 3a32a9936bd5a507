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

Each kind is a `Kind`, its rule a `Spec` in `SPECS` (fields and sender); every header is
built by the function of its kind here (`act(...)`, `route(...)`, ...), a plain dict whose
`kind` is the plain string, so the bytes on the wire are those of the literals they replace.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from adaptlink.model.config import ModelInfo, load_config
from partitioner.vocab import dtype_bytes

log = logging.getLogger(__name__)

LOG_FIRST = 5  # refusals logged per (sender, reason) before only counting them


class Kind(enum.StrEnum):
    """The kind of a message: its header's `kind` field, on the wire as the plain string."""

    ACT = "act"          # a block's outputs for one micro-batch; `input`: the coordinator's
    ROUTE = "route"      # the route table, versioned
    FREE = "free"        # drop a request's state
    STOP = "stop"        # end of run: report your stats
    LOAD = "load"        # cold recovery: load these blocks from the checkpoint
    LOADED = "loaded"    # ... done
    ERROR = "error"      # a request cannot be served
    STATS = "stats"      # a rank's numbers, at the end


UNKNOWN = "?"  # the kind a Refused names when the header has none that is known


def kind_of(header: Any) -> Kind | None:
    """The header's kind, or None (not a dict, no kind, an unknown one); fields unchecked."""
    kind = header.get("kind") if isinstance(header, dict) else None
    if not isinstance(kind, str):
        return None
    try:
        return Kind(kind)
    except ValueError:
        return None


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


class Sender(enum.Enum):
    """Who may send a kind, to whom (the rules of the module docstring)."""

    COORDINATOR = "from the coordinator only"
    TO_COORDINATOR = "to the coordinator only"
    PRODUCER = "from the rank running the producer block"  # judged by StageExecutor.handle


@dataclass(frozen=True, slots=True)
class Spec:
    """What a message of one kind must carry (field -> check) and who may send it."""

    sender: Sender
    fields: dict[str, Callable[[Any], bool]] = field(default_factory=dict)
    optional: dict[str, Callable[[Any], bool]] = field(default_factory=dict)


SPECS: dict[Kind, Spec] = {
    Kind.ACT: Spec(Sender.PRODUCER, {"mb": _nat, "rows": _rows, "block": _str, "rv": _nat}),
    Kind.ROUTE: Spec(Sender.COORDINATOR, {"rv": _nat, "routes": _routes}),
    Kind.FREE: Spec(Sender.COORDINATOR, {"req": _nat}),
    Kind.STOP: Spec(Sender.COORDINATOR),
    Kind.LOAD: Spec(Sender.COORDINATOR, {"blocks": _str_list}),
    Kind.LOADED: Spec(Sender.TO_COORDINATOR, {"blocks": _str_list}),
    Kind.ERROR: Spec(Sender.TO_COORDINATOR, {"req": _nat, "epoch": _nat, "error": _str}, {"rank": _nat, "rows": _nat}),
    Kind.STATS: Spec(Sender.TO_COORDINATOR, {"stats": _dict}),
}


# ---- the headers, built here only (plain dicts, field order as ever: the bytes on the wire) --

def act(mb: int, rows: list[list], block: str, rv: int) -> dict:
    """The outputs of `block` for micro-batch `mb` (its rows: `MicroBatch.to_header()`)."""
    return {"kind": Kind.ACT.value, "mb": mb, "rows": rows, "block": block, "rv": rv}


def route(rv: int, routes: dict[str, int]) -> dict:
    return {"kind": Kind.ROUTE.value, "rv": rv, "routes": routes}


def free(req: int) -> dict:
    return {"kind": Kind.FREE.value, "req": req}


def stop() -> dict:
    return {"kind": Kind.STOP.value}


def load(blocks: list[str]) -> dict:
    return {"kind": Kind.LOAD.value, "blocks": blocks}


def loaded(blocks: list[str]) -> dict:
    return {"kind": Kind.LOADED.value, "blocks": blocks}


def error(req: int, epoch: int, error: str, rank: int, rows: int = 1) -> dict:
    """Request `req` cannot be served here: a micro-batch of `rows` rows holding it failed."""
    return {"kind": Kind.ERROR.value, "req": req, "epoch": epoch, "error": error, "rank": rank, "rows": rows}


def stats(report: dict) -> dict:
    return {"kind": Kind.STATS.value, "stats": report}


class Refused(ValueError):
    """A message this rank will not act on; `reason` is one line, safe to log."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _bad(kind: Kind, header: dict, name: str) -> Refused:
    return Refused(kind, f"{kind} field {name!r} has a bad value ({type(header[name]).__name__})")


def check(src: int, header: Any, *, me: int, coordinator: int) -> Kind:
    """The message's kind, once its header has every field of that kind, of the right type,
    and `src` may send it to `me` (the act's route rule is StageExecutor.handle's). Raises Refused."""
    if not isinstance(header, dict):
        raise Refused(UNKNOWN, f"header is a {type(header).__name__}, not a dict")
    kind = kind_of(header)
    if kind is None:
        raise Refused(UNKNOWN, f"unknown kind {str(header.get('kind'))[:40]!r}")
    spec = SPECS[kind]
    for name, ok in spec.fields.items():
        if name not in header:
            raise Refused(kind, f"{kind} without field {name!r}")
        if not ok(header[name]):
            raise _bad(kind, header, name)
    for name, ok in spec.optional.items():
        if name in header and not ok(header[name]):
            raise _bad(kind, header, name)
    if spec.sender is Sender.COORDINATOR and src != coordinator:
        raise Refused(kind, f"{kind} from rank {src}: only the coordinator (rank {coordinator}) sends it")
    if spec.sender is Sender.TO_COORDINATOR and me != coordinator:
        raise Refused(kind, f"{kind} from rank {src} to rank {me}: only the coordinator takes it")
    if kind is Kind.ERROR and header.get("rank", src) != src:
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
    images *= info.max_tiles  # LLaVA-NeXT: every tile of the largest grid
    vision = images * info.vision_tokens * vc.hidden_size * nb * (1 + len(info.feature_picks))
    pixels = images * 3 * vc.image_size ** 2 * nb
    logits = rows * tc.vocab_size * (nb + 8)
    return max(MIN_CAP, SAFETY * max(text, vision, pixels, logits) + HEADER_ALLOWANCE)
