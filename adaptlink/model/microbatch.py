"""A micro-batch: the rows of several requests packed into one forward (docs/BATCHING.md).

A micro-batch is its rows `(req, epoch, pos, q, has_image)` in packing order and the packed
tensors that flow between blocks:

    pixel_values   [n_img, 3, H, W]     the images of the rows with has_image, in row order
    image_features [n_feat, Dt]         projector output, rows' image tokens in row order
    input_ids      [1, T]               T = sum of the rows' q; row r holds tokens start_r .. start_r + q_r
    hidden         [1, T, Dt]           merge and decoder layer outputs
    logits         [B, V] float32, token [B]   head output: one row per request (its last token)

Row r's tokens are positions `pos_r .. pos_r + q_r - 1` of its request: a decode row has
q = 1, a prefill row q = the prompt (or one chunk of it, `pos` > 0 for the later chunks).
`has_image` says that the row's tokens include its image's tokens (all of them: a chunk
boundary never splits an image's token run; the merge checks it).

Decoder layers run HF's own decoder layer (LLaMA, Mistral, Qwen2) over `[1, T, D]` with per-token
`position_ids [1, T]` (rope per token), no cache and no mask: attention goes through the
function registered here (`PACKED_ATTENTION`), which attends each row to its own request's
history in the stage's `KVStore` (docs/BATCHING.md: pitfalls 1-4 are why HF must never
build the mask or read positions from a cache for a packed batch).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from adaptlink.model.kv import KVStore, Span

PACKED_ATTENTION = "adaptlink_packed"
"""The key of the packed-attention function in transformers' AttentionInterface."""
BATCH_KWARG = "adaptlink_batch"
"""The keyword that carries a `PackedBatch` through the decoder layer to the attention function."""


@dataclass(frozen=True, slots=True)
class Row:
    """One request's part of a micro-batch: `q` tokens from position `pos`."""

    req: Hashable
    epoch: int
    pos: int
    q: int
    has_image: bool = False

    def to_list(self) -> list:
        return [self.req, self.epoch, self.pos, self.q, self.has_image]

    @classmethod
    def from_list(cls, v: Sequence) -> "Row":
        req, epoch, pos, q, has_image = v
        return cls(req, int(epoch), int(pos), int(q), bool(has_image))


@dataclass(frozen=True)
class MicroBatch:
    """Rows in packing order; derived offsets and per-token positions."""

    rows: tuple[Row, ...]

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        if not self.rows:
            raise ValueError("a micro-batch needs at least one row")
        seen = set()
        for r in self.rows:
            if r.q < 1 or r.pos < 0:
                raise ValueError(f"row {r}: needs q >= 1 and pos >= 0")
            if r.req in seen:
                raise ValueError(f"request {r.req!r} has two rows in one micro-batch")
            seen.add(r.req)

    @classmethod
    def of(cls, *rows: Row | Sequence) -> "MicroBatch":
        return cls(tuple(r if isinstance(r, Row) else Row.from_list(r) for r in rows))

    def to_header(self) -> list[list]:
        """The rows as the wire header carries them: `[[req, epoch, pos, q, has_image], ...]`."""
        return [r.to_list() for r in self.rows]

    @classmethod
    def from_header(cls, rows: Sequence[Sequence]) -> "MicroBatch":
        return cls(tuple(Row.from_list(r) for r in rows))

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def starts(self) -> list[int]:
        out, t = [], 0
        for r in self.rows:
            out.append(t)
            t += r.q
        return out

    @property
    def T(self) -> int:
        return self.starts[-1] + self.rows[-1].q

    @cached_property
    def spans(self) -> tuple[Span, ...]:
        return tuple(Span(r.req, s, r.q) for r, s in zip(self.rows, self.starts))

    @property
    def image_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.has_image]

    def position_ids(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Per-token positions `[1, T]`: row r contributes pos_r .. pos_r + q_r - 1."""
        return torch.cat([torch.arange(r.pos, r.pos + r.q) for r in self.rows])[None].to(device)

    def last_index(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """`[B]`: the packed index of each row's last token (what the head reads)."""
        return torch.tensor([s + r.q - 1 for r, s in zip(self.rows, self.starts)], device=device)

    def split(self, packed: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """A packed tensor (`[1, T, ...]` by default) cut into its rows' parts."""
        return list(packed.split([r.q for r in self.rows], dim=dim))


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """What the packed-attention function needs at every layer: the store and the rows' spans."""

    kv: KVStore
    spans: tuple[Span, ...]


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs):
    """The attention function registered as `PACKED_ATTENTION`.

    With a `PackedBatch` in `kwargs[BATCH_KWARG]`: each row attends to its own request's
    history at this layer (`module.layer_idx`, global) in the stage's KV store; returns
    `([1, T, H, Dh], None)` as HF's attention functions do. Without one (the one-request
    path, `LlavaBlocks.run`, on a layer switched to packed attention), it is exactly the
    layer's previous attention function."""
    batch = kwargs.pop(BATCH_KWARG, None)
    if batch is None:
        fallback = getattr(module, "_adaptlink_fallback_attn", "sdpa")
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(fallback, eager_attention_forward)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is not None:
        raise ValueError("packed attention builds its own per-row masks; got an attention_mask")
    # Mistral and Qwen2 layers pass their window (None: full attention), as to HF's own functions
    window = kwargs.get("sliding_window")
    return batch.kv.attend(module.layer_idx, batch.spans, query, key, value, scaling, window=window), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def use_packed_attention(attn: nn.Module) -> None:
    """Switch one attention module (a decoder layer's `self_attn`) to packed attention.

    The module gets its own copy of the config with `_attn_implementation = PACKED_ATTENTION`,
    so that the model's shared config (which `create_causal_mask` and the vision tower read)
    is untouched, and the one-request path keeps working through the fallback. Idempotent."""
    if attn.config._attn_implementation == PACKED_ATTENTION:
        return
    attn._adaptlink_fallback_attn = attn.config._attn_implementation or "sdpa"
    cfg = copy.copy(attn.config)
    cfg._attn_implementation = PACKED_ATTENTION
    attn.config = cfg
