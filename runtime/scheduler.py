"""The coordinator's scheduler: which rows go into the next micro-batch (docs/BATCHING.md).

Each step the coordinator asks `form_batch` for a micro-batch made of the requests that are
ready: every request waiting to decode contributes one row of one token (oldest first),
then prompts still to prefill fill what is left of the token budget, the first one that
does not fit cut into a chunk (chunked prefill), so decode rows never wait behind a long
image prompt. Requests join and leave between steps (continuous batching).

Rules a micro-batch obeys:
- at most `rows` rows and `tokens` tokens (a decode row counts one token);
- a chunk boundary never falls inside a request's image tokens: the chunk that holds them
  holds all of them (`has_image`), and only that chunk carries the request's pixels; when
  the image tokens alone exceed the budget they go whole, alone, in a micro-batch;
- a request has at most one row per micro-batch, and a row only while none of the
  request's rows is still in the pipeline (the next chunk needs the previous one's KV).

`KVLedger` admits a request only when every stage can hold its KV to the end
(`prompt + max_new_tokens` tokens, the stage's bytes per token times that), so a stage's
`KVStore` budget is a safety net, not a queue.

`rows_per_batch` spreads the requests in flight over the micro-batches the pipeline needs
(at least one per stage), so every stage has work while the others run theirs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from partitioner.types import Device
from partitioner.vocab import block_kind, dtype_bytes


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How big a micro-batch may be, and how many may be in the pipeline at once."""

    rows: int = 32
    """Rows (requests) per micro-batch."""
    tokens: int = 256
    """Tokens per micro-batch: decode rows count one, prefill chunks their length."""
    micro_batches: int = 0
    """Micro-batches in flight; 0: one per pipeline stage, plus one to cover the hand-offs
    (one for a one-stage pipeline, which runs each at once)."""

    def __post_init__(self):
        for name in ("rows", "tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} per micro-batch must be >= 1, got {getattr(self, name)}")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches must be >= 0, got {self.micro_batches}")

    @classmethod
    def for_plan(cls, workload, rows: int | None = None, tokens: int = 256,
                 micro_batches: int | None = None) -> "BatchLimits":
        """The limits of a run of a plan whose workload is `workload`: `rows` and
        `micro_batches` where given, else the plan's `batch_rows` and `micro_batches` (what
        the planner costed and sized the KV for), else 32 rows and one per stage, plus one."""
        if rows is None:
            rows = getattr(workload, "batch_rows", None) or 32
        if micro_batches is None:
            micro_batches = getattr(workload, "micro_batches", None) or 0
        return cls(rows, tokens, micro_batches)

    def in_flight(self, stages: int) -> int:
        """Micro-batches to keep in the pipeline of `stages` stages."""
        return self.micro_batches or (stages + 1 if stages > 1 else 1)

    def rows_per_batch(self, active: int, stages: int) -> int:
        """Rows per micro-batch that spread `active` requests over the micro-batches in flight."""
        return max(1, min(self.rows, math.ceil(active / self.in_flight(stages))))


@dataclass(slots=True)
class Pending:
    """What one request needs next: `todo` tokens from position `pos` before a token is chosen."""

    req: int
    pos: int
    todo: int
    image: tuple[int, int] | None = None
    """Positions [start, end) of the request's image tokens still to be fed, or None."""
    order: float = 0.0
    """Ties broken oldest first (admission time)."""

    @property
    def decoding(self) -> bool:
        return self.todo == 1 and self.image is None


@dataclass(frozen=True, slots=True)
class Piece:
    """One row of a micro-batch: `q` tokens of request `req` from `pos`; `last`: the head's
    logits for it choose a token (the prompt's last chunk, or a decode step)."""

    req: int
    pos: int
    q: int
    has_image: bool
    last: bool


def image_span(ids: Sequence[int], image_token_id: int | None) -> tuple[int, int] | None:
    """[first, last + 1) of the image tokens in `ids` (every image of the request, and the text
    between them: one chunk holds them all), or None."""
    if image_token_id is None:
        return None
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    return (at[0], at[-1] + 1) if at else None


def chunk(p: Pending, left: int, alone: bool) -> int:
    """Tokens of `p` that fit in `left` without cutting its image tokens; 0: none fit.

    `alone`: the micro-batch is empty, so image tokens longer than the budget go whole."""
    q = min(p.todo, left)
    if q < 1:
        return 0
    if p.image is not None:
        a, b = p.image
        end = p.pos + q
        if a < end < b:                  # would cut the image tokens
            if a > p.pos:
                q = a - p.pos            # stop before them
            elif alone:
                q = min(p.todo, b - p.pos)  # they go whole, over the budget
            else:
                return 0
    return q


def form_batch(pending: Iterable[Pending], *, rows: int, tokens: int) -> list[Piece]:
    """The rows of the next micro-batch from the requests ready now (see the module docstring)."""
    ready = sorted(pending, key=lambda p: (not p.decoding, p.order, p.req))
    out: list[Piece] = []
    left = tokens
    for p in ready:
        if len(out) >= rows or left < 1:
            break
        q = chunk(p, left, alone=not out)
        if q == 0:
            continue  # image tokens that do not fit beside the rows taken: a later micro-batch
        has_image = p.image is not None and p.pos <= p.image[0] and p.pos + q >= p.image[1]
        out.append(Piece(p.req, p.pos, q, has_image, last=q == p.todo))
        left -= q
    return out


@dataclass
class KVLedger:
    """KV reserved per stage: a request is admitted only if every stage can hold it to the end.

    `stages`: rank -> (bytes per token on that stage, budget in bytes or None: unbounded)."""

    stages: dict[int, tuple[int, int | None]]
    reserved: dict[int, dict[int, int]] = field(default_factory=dict)  # req -> rank -> bytes

    @classmethod
    def for_plan(cls, plan, routes: Mapping[str, int], kv_heads: int, head_dim: int) -> "KVLedger":
        """Each stage's bytes per token (the decoder layers `routes` give it, in its dtype) and
        its budget (`kv_budget`); stages without a decoder layer hold no KV."""
        layers: dict[int, int] = {}
        for b, r in routes.items():
            if block_kind(b, default="") == "decoder_layer":
                layers[r] = layers.get(r, 0) + 1
        stages = {}
        for s in plan.devices:
            if layers.get(s.rank):
                bpt = layers[s.rank] * 2 * kv_heads * head_dim * dtype_bytes(s.dtype)
                stages[s.rank] = (bpt, kv_budget(s))
        return cls(stages)

    def need(self, tokens: int) -> dict[int, int]:
        return {r: tokens * bpt for r, (bpt, _) in self.stages.items()}

    def used(self, rank: int) -> int:
        return sum(res.get(rank, 0) for res in self.reserved.values())

    def free(self, rank: int) -> int | None:
        budget = self.stages[rank][1]
        return None if budget is None else budget - self.used(rank)

    def fits(self, tokens: int) -> bool:
        return all(self.free(r) is None or n <= self.free(r) for r, n in self.need(tokens).items())

    def too_small(self, tokens: int) -> int | None:
        """A stage whose whole budget cannot hold `tokens` (a request that would wait forever), or None."""
        return next((r for r, (bpt, b) in sorted(self.stages.items()) if b is not None and tokens * bpt > b), None)

    def ever_fits(self, tokens: int) -> bool:
        """Whether an empty engine could hold it (else it would wait forever)."""
        return self.too_small(tokens) is None

    def reserve(self, req: int, tokens: int) -> bool:
        if req in self.reserved or not self.fits(tokens):
            return False
        self.reserved[req] = self.need(tokens)
        return True

    def release(self, req: int) -> None:
        self.reserved.pop(req, None)

    def stats(self) -> dict[int, dict[str, int | None]]:
        return {r: {"bytes_per_token": bpt, "budget": b, "reserved": self.used(r)}
                for r, (bpt, b) in sorted(self.stages.items())}


def kv_budget(stage) -> int | None:
    """Bytes a plan stage may give its KV: its memory (or emulated cap) less what the plan
    predicts for everything else on it (weights, backups, activations); None when the plan
    predicts nothing (a hand-written plan)."""
    mem = (stage.predicted or {}).get("memory")
    if not mem:
        return None
    capacity = Device.usable_bytes(stage.memory_bytes, stage.emulation)
    return max(0, capacity - sum(int(mem.get(k, 0)) for k in ("weights", "backups", "activations")))
