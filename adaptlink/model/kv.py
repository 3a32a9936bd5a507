"""The KV store of one stage: every request's keys and values for the decoder layers it holds.

A stage that runs micro-batches (docs/BATCHING.md) keeps, per request and per decoder layer
it holds (global layer index: a middle stage's layers keep their model-wide `layer_idx`),
the keys and values of every token it has seen. One micro-batch step is a transaction:

    kv.begin_batch(rows)            # each row: pos == tokens the stage holds, room for q more
    for layer in held layers:       # inside the registered attention function
        k_all, v_all = kv.append(req, layer, k_new, v_new)   # [1, Hkv, pos + q, Dh]
    kv.commit_batch(rows)           # now tokens(req) == pos + q

so that a refusal (budget) or a position mismatch is raised before anything is computed and
leaves the store as it was, and a step that fails half-way (a layer raising) can be rolled
back and rerun: nothing is counted until `commit`.

`KVStore` is the interface. `GrowingKVStore` (CPU stages) holds one buffer per request,
`[layers, 2, Hkv, capacity, Dh]`, that grows by doubling: appending a token is a slice
write, not the `torch.cat` of the whole history that HF's `DynamicLayer.update` does per
token per layer (docs/BATCHING.md, pitfall 6). Buffers are allocated zeroed: a masked-out
slot still enters P·V as 0 x value, and an uninitialised one holding NaN would poison the
row (pitfall 7). A preallocated slot cache (gpt-fast style `[slots, Hkv, Lmax, Dh]`, one
SDPA call per layer over a contiguous slot range) is the better fit for GPU stages:
`SlotKVStore` implements the same interface, overriding `attend` (one SDPA call per layer
for a micro-batch of decode rows).

Memory: a byte budget per stage (from the plan); growing past it raises `KVBudgetError`,
which the scheduler catches (and should have avoided: `bytes_for(tokens)` and `bytes_free`
let it plan admission). The budget counts the buffers' allocated capacity, i.e. what the
process really holds, doubling slack included; a growth that would pass the budget is
clipped to what the request needs before it is refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_CAPACITY = 16  # tokens: the first buffer of a request (a decode-only request grows 16, 32, 64, ...)


def kv_shape(text_config) -> tuple[int, int]:
    """(kv heads, head dim) of a HF text config: one token's KV per layer is 2 x their product."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_key_value_heads, head_dim


class KVError(Exception):
    """A KV-store operation that cannot be done (the scheduler or the stage catches these)."""


class KVBudgetError(KVError):
    """Holding more tokens would pass the stage's KV byte budget."""

    def __init__(self, message: str, *, req: Hashable, need_bytes: int, free_bytes: int):
        super().__init__(message)
        self.req, self.need_bytes, self.free_bytes = req, need_bytes, free_bytes


class KVPositionError(KVError):
    """A row's `pos` is not the number of tokens the stage holds for its request."""


@dataclass(frozen=True, slots=True)
class Span:
    """Where one row's tokens sit in a packed micro-batch: tokens `start .. start + q` of `[1, T]`."""

    req: Hashable
    start: int
    q: int


class KVStore(ABC):
    """Per-request keys and values of the decoder layers `layers` (global indices) of one stage."""

    def __init__(self, layers: Iterable[int], kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 budget_bytes: int | None = None):
        self.layers = tuple(sorted(set(int(i) for i in layers)))
        if not self.layers:
            raise ValueError("a KV store needs at least one decoder layer")
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self._local = {g: i for i, g in enumerate(self.layers)}  # global layer index -> buffer row

    @classmethod
    def for_config(cls, text_config, layers: Iterable[int], **kw) -> "KVStore":
        """A store sized from a HF text config (LlamaConfig): its kv heads and head dim."""
        return cls(layers, *kv_shape(text_config), **kw)

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over every held layer."""
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def bytes_for(self, tokens: int) -> int:
        """Bytes that `tokens` tokens of one request need (exact, no growth slack): for admission."""
        return int(tokens) * self.bytes_per_token

    @property
    @abstractmethod
    def bytes_used(self) -> int:
        """Bytes the store's buffers hold now (allocated capacity, not just filled tokens)."""

    @property
    def bytes_free(self) -> int | None:
        """Bytes left under the budget (None: no budget)."""
        return None if self.budget_bytes is None else self.budget_bytes - self.bytes_used

    # ---- per request ----------------------------------------------------------------------

    @abstractmethod
    def requests(self) -> list[Hashable]:
        """Requests that hold KV here."""

    @abstractmethod
    def tokens(self, req: Hashable) -> int:
        """Tokens committed for `req` (0 for a request the store does not know)."""

    def check(self, req: Hashable, pos: int) -> None:
        """Raise `KVPositionError` unless a row of `req` at `pos` continues what the stage holds."""
        held = self.tokens(req)
        if pos != held:
            raise KVPositionError(
                f"request {req!r}: row at pos {pos} but this stage holds {held} tokens of it "
                f"(layers {self.layers[0]}..{self.layers[-1]}); "
                + ("it was freed or never started here" if held == 0 else
                   "a step was lost or sent twice, or the request was replayed without free()"))

    @abstractmethod
    def begin(self, req: Hashable, pos: int, q: int) -> None:
        """Start a step of `q` tokens at `pos` for `req`: check `pos`, make room (may raise)."""

    @abstractmethod
    def append(self, req: Hashable, layer: int, key: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values `[1, Hkv, q, Dh]` of `layer`; return the history
        `[1, Hkv, pos + q, Dh]` (views, valid until the next `begin`)."""

    @abstractmethod
    def view(self, req: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed history of `req` at `layer`: `[1, Hkv, tokens, Dh]` views."""

    @abstractmethod
    def commit(self, req: Hashable) -> None:
        """End the step: the `q` tokens of `begin` are now held."""

    @abstractmethod
    def rollback(self, req: Hashable) -> None:
        """Drop the step begun for `req` (what was written is ignored and overwritten later)."""

    @abstractmethod
    def free(self, req: Hashable) -> int:
        """Forget `req` (completion, cancellation, replay); returns the bytes released."""

    # ---- a micro-batch --------------------------------------------------------------------

    def begin_batch(self, rows: Sequence) -> None:
        """`begin` every row (objects with .req, .pos, .q); all or none (rolled back on error)."""
        seen = set()
        for r in rows:
            if r.req in seen:
                raise KVError(f"request {r.req!r} has two rows in one micro-batch")
            seen.add(r.req)
        done = []
        try:
            for r in rows:
                self.begin(r.req, r.pos, r.q)
                done.append(r)
        except BaseException:
            for r in done:
                self.rollback(r.req)
            raise

    def commit_batch(self, rows: Sequence) -> None:
        for r in rows:
            self.commit(r.req)

    def rollback_batch(self, rows: Sequence) -> None:
        for r in rows:
            self.rollback(r.req)

    def attend(self, layer: int, spans: Sequence[Span], query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, scaling: float | None, window: int | None = None) -> torch.Tensor:
        """Attention of a packed micro-batch at `layer`, each row against its own history.

        query `[1, H, T, Dh]`, key/value `[1, Hkv, T, Dh]` (this step's tokens, rope applied);
        returns `[1, T, H, Dh]` (what HF's attention functions return). `window`: the layer's
        sliding window (Mistral, Qwen2), None for full causal attention. One SDPA call per
        row; a backend that can do one call per layer overrides this."""
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        for s in spans:
            sl = slice(s.start, s.start + s.q)
            k_all, v_all = self.append(s.req, layer, key[:, :, sl], value[:, :, sl])
            out[:, sl] = sdpa_bottom_right(query[:, :, sl], k_all, v_all, scaling, window).transpose(1, 2)
        return out


def sdpa_bottom_right(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scaling: float | None, window: int | None = None) -> torch.Tensor:
    """Causal attention of the last q positions of a sequence: query `[1, H, q, Dh]` against
    key/value `[1, Hkv, L, Dh]` (L >= q, GQA when Hkv < H); returns `[1, H, q, Dh]`.

    The mask is bottom-right aligned: query i (position L - q + i) sees keys 0 .. L - q + i,
    and with a sliding `window` only the last `window` of those (keys j > L - q + i - window,
    HF's `sliding_window_overlay`). SDPA's `is_causal` is top-left aligned, right only when
    q == L (pitfall 3); q == 1 needs no mask at all. Keys no query can see are cut off first,
    so a windowed decode reads `window` keys, not the whole history."""
    q, L = query.shape[-2], key.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if window is not None and L - q - window + 1 > 0:
        start = L - q - window + 1  # the first query's first visible key
        key, value, L = key[:, :, start:], value[:, :, start:], L - start
    windowed = window is not None and window < L
    if q == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    if q == L and not windowed:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    ones = torch.ones(q, L, dtype=torch.bool, device=query.device)
    mask = ones.tril(L - q)
    if windowed:
        mask &= ~ones.tril(L - q - window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)


class _Entry:
    __slots__ = ("buf", "length", "pending")

    def __init__(self, buf: torch.Tensor):
        self.buf = buf        # [layers, 2, Hkv, capacity, Dh], zeroed beyond what was written
        self.length = 0       # committed tokens
        self.pending = None   # q of the step begun, or None


class GrowingKVStore(KVStore):
    """One buffer per request that doubles when full (amortised O(1) per token, no per-token cat)."""

    def __init__(self, layers: Iterable[int], kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 budget_bytes: int | None = None, min_capacity: int = MIN_CAPACITY):
        super().__init__(layers, kv_heads, head_dim, dtype=dtype, device=device, budget_bytes=budget_bytes)
        self.min_capacity = int(min_capacity)
        self._entries: dict[Hashable, _Entry] = {}
        self._used = 0
        self.grows = 0  # buffer (re)allocations, for tests and metrics

    @property
    def bytes_used(self) -> int:
        return self._used

    def capacity(self, req: Hashable) -> int:
        e = self._entries.get(req)
        return 0 if e is None else e.buf.shape[3]

    def requests(self) -> list[Hashable]:
        return list(self._entries)

    def tokens(self, req: Hashable) -> int:
        e = self._entries.get(req)
        return 0 if e is None else e.length

    def _alloc(self, req: Hashable, need: int, old: _Entry | None) -> torch.Tensor:
        have = 0 if old is None else old.buf.shape[3]
        cap = max(self.min_capacity, have)
        while cap < need:
            cap *= 2
        if self.budget_bytes is not None:
            free = self.budget_bytes - self._used + have * self.bytes_per_token
            if cap * self.bytes_per_token > free:  # clip the doubling to what is needed, else refuse
                cap = need
                if cap * self.bytes_per_token > free:
                    raise KVBudgetError(
                        f"KV budget: request {req!r} needs {need} tokens x {self.bytes_per_token:,} B "
                        f"= {need * self.bytes_per_token:,} B on layers {self.layers[0]}..{self.layers[-1]}, "
                        f"but only {free:,} of the stage's {self.budget_bytes:,} B are free "
                        f"({len(self._entries)} requests hold {self._used:,} B)",
                        req=req, need_bytes=(need - have) * self.bytes_per_token,
                        free_bytes=self.budget_bytes - self._used)
        buf = torch.zeros(len(self.layers), 2, self.kv_heads, cap, self.head_dim, dtype=self.dtype, device=self.device)
        if old is not None and old.length:
            buf[:, :, :, :old.length] = old.buf[:, :, :, :old.length]
        self._used += (cap - have) * self.bytes_per_token
        self.grows += 1
        return buf

    def begin(self, req: Hashable, pos: int, q: int) -> None:
        if q < 1:
            raise ValueError(f"request {req!r}: a step needs q >= 1 tokens, got {q}")
        self.check(req, pos)
        e = self._entries.get(req)
        need = pos + q
        if e is None:
            e = _Entry(self._alloc(req, need, None))
            self._entries[req] = e
        elif need > e.buf.shape[3]:
            e.buf = self._alloc(req, need, e)
        e.pending = q

    def _entry(self, req: Hashable) -> _Entry:
        e = self._entries.get(req)
        if e is None:
            raise KVError(f"request {req!r} holds no KV on this stage (layers {self.layers[0]}..{self.layers[-1]})")
        return e

    def _row(self, layer: int) -> int:
        i = self._local.get(layer)
        if i is None:
            raise KVError(f"decoder layer {layer} is not one of this store's layers {list(self.layers)}")
        return i

    def append(self, req, layer, key, value):
        e, i = self._entry(req), self._row(layer)
        q = key.shape[-2]
        if e.pending != q:
            raise KVError(f"request {req!r}: append of {q} tokens at layer {layer}, but the step begun "
                          f"has {e.pending} (call begin(req, pos, q) first)")
        end = e.length + q
        e.buf[i, 0, :, e.length:end] = key[0]
        e.buf[i, 1, :, e.length:end] = value[0]
        return e.buf[i, 0, :, :end][None], e.buf[i, 1, :, :end][None]

    def view(self, req, layer):
        e, i = self._entry(req), self._row(layer)
        return e.buf[i, 0, :, :e.length][None], e.buf[i, 1, :, :e.length][None]

    def commit(self, req):
        e = self._entry(req)
        if e.pending is None:
            raise KVError(f"request {req!r}: commit without a step begun")
        e.length += e.pending
        e.pending = None

    def rollback(self, req):
        e = self._entries.get(req)
        if e is None:
            return
        e.pending = None
        if e.length == 0:  # a request whose first step failed holds nothing
            self.free(req)

    def free(self, req) -> int:
        e = self._entries.pop(req, None)
        if e is None:
            return 0
        released = e.buf.shape[3] * self.bytes_per_token
        self._used -= released
        return released


class SlotKVStore(KVStore):
    """A preallocated slot cache (gpt-fast style): `slots` requests of up to `max_tokens` each.

    One buffer `[layers, 2, slots, Hkv, max_tokens, Dh]`, zeroed, allocated once; a request
    takes a free slot at its first step and gives it back on `free` (the slot is zeroed
    again). A micro-batch of decode rows attends in one SDPA call per layer over its slots
    (a key-length mask per row), the shape a GPU stage wants (one kernel per layer); rows
    with q > 1 fall back to one call per row. The budget is the whole buffer; a request
    "uses" a full slot (`max_tokens` tokens) from its first step, so `bytes_free` counts
    free slots, which is what admission needs."""

    def __init__(self, layers: Iterable[int], kv_heads: int, head_dim: int, *, slots: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__(layers, kv_heads, head_dim, dtype=dtype, device=device)
        self.slots, self.max_tokens = int(slots), int(max_tokens)
        self.budget_bytes = self.slots * self.max_tokens * self.bytes_per_token
        self.buf = torch.zeros(len(self.layers), 2, self.slots, self.kv_heads, self.max_tokens, self.head_dim,
                               dtype=dtype, device=self.device)
        self._slot: dict[Hashable, int] = {}
        self._length = torch.zeros(self.slots, dtype=torch.long)
        self._pending: dict[Hashable, int] = {}
        self._free = list(range(self.slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def bytes_used(self) -> int:
        return len(self._slot) * self.max_tokens * self.bytes_per_token

    def requests(self) -> list[Hashable]:
        return list(self._slot)

    def tokens(self, req: Hashable) -> int:
        s = self._slot.get(req)
        return 0 if s is None else int(self._length[s])

    def slot(self, req: Hashable) -> int | None:
        return self._slot.get(req)

    def begin(self, req: Hashable, pos: int, q: int) -> None:
        if q < 1:
            raise ValueError(f"request {req!r}: a step needs q >= 1 tokens, got {q}")
        self.check(req, pos)
        if pos + q > self.max_tokens:
            raise KVBudgetError(
                f"KV slots: request {req!r} needs {pos + q} tokens, a slot holds {self.max_tokens}",
                req=req, need_bytes=self.bytes_for(pos + q - self.max_tokens), free_bytes=self.bytes_free)
        if req not in self._slot:
            if not self._free:
                raise KVBudgetError(
                    f"KV slots: request {req!r} needs a slot, all {self.slots} are taken",
                    req=req, need_bytes=self.max_tokens * self.bytes_per_token, free_bytes=0)
            self._slot[req] = self._free.pop()
        self._pending[req] = q

    def _where(self, req: Hashable, layer: int) -> tuple[int, int]:
        s = self._slot.get(req)
        if s is None:
            raise KVError(f"request {req!r} holds no KV slot on this stage")
        i = self._local.get(layer)
        if i is None:
            raise KVError(f"decoder layer {layer} is not one of this store's layers {list(self.layers)}")
        return i, s

    def append(self, req, layer, key, value):
        i, s = self._where(req, layer)
        q = key.shape[-2]
        if self._pending.get(req) != q:
            raise KVError(f"request {req!r}: append of {q} tokens at layer {layer}, but the step begun "
                          f"has {self._pending.get(req)} (call begin(req, pos, q) first)")
        start = int(self._length[s])
        self.buf[i, 0, s, :, start:start + q] = key[0]
        self.buf[i, 1, s, :, start:start + q] = value[0]
        return self.buf[i, 0, s, :, :start + q][None], self.buf[i, 1, s, :, :start + q][None]

    def view(self, req, layer):
        i, s = self._where(req, layer)
        n = int(self._length[s])
        return self.buf[i, 0, s, :, :n][None], self.buf[i, 1, s, :, :n][None]

    def commit(self, req):
        q = self._pending.pop(req, None)
        if q is None:
            raise KVError(f"request {req!r}: commit without a step begun")
        self._length[self._slot[req]] += q

    def rollback(self, req):
        if self._pending.pop(req, None) is not None and self.tokens(req) == 0:
            self.free(req)

    def free(self, req) -> int:
        s = self._slot.pop(req, None)
        if s is None:
            return 0
        self._pending.pop(req, None)
        self.buf[:, :, s].zero_()
        self._length[s] = 0
        self._free.append(s)
        return self.max_tokens * self.bytes_per_token

    def attend(self, layer, spans, query, key, value, scaling, window=None):
        if any(sp.q != 1 for sp in spans):
            return super().attend(layer, spans, query, key, value, scaling, window)
        i = self._local[layer]
        slots = torch.tensor([self._slot[sp.req] for sp in spans], device=self.device)
        lengths = self._length[slots.cpu()] + 1                 # [B] history after this token
        n = int(lengths.max())
        k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [B, Hkv, Dh]
        start = self._length[slots.cpu()].to(self.device)
        self.buf[i, 0, slots, :, start] = k_new
        self.buf[i, 1, slots, :, start] = v_new
        first = int(slots[0])
        if torch.equal(slots.cpu(), torch.arange(first, first + len(spans))):   # a contiguous range: views
            k_all, v_all = self.buf[i, 0, first:first + len(spans), :, :n], self.buf[i, 1, first:first + len(spans), :, :n]
        else:
            k_all, v_all = self.buf[i, 0, slots, :, :n], self.buf[i, 1, slots, :, :n]  # [B, Hkv, n, Dh]
        mask = torch.arange(n)[None] < lengths[:, None]                   # [B, n]
        if window is not None:  # a sliding layer: the last `window` keys of each row
            mask &= torch.arange(n)[None] >= lengths[:, None] - window
        mask = mask.to(self.device)[:, None, None]              # [B, 1, 1, n]
        q = query[0].transpose(0, 1)[:, :, None]                # [B, H, 1, Dh]
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scaling,
                                             enable_gqa=q.shape[1] != k_all.shape[1])
        return out.transpose(1, 2).transpose(0, 1)              # [1, B, H, Dh]
