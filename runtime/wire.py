"""The wire format of one transport message: a fixed prefix, a msgpack body, raw tensors.

No pickle anywhere: the header is msgpack (only nil, bool, int, float, str, bytes, list,
dict), and tensors travel as their raw bytes with name, dtype and shape in the header.

One message from `src` to `dst` is two or more gloo point-to-point sends:

    1. prefix  int64[4] = [MAGIC, envelope_len, inline_len, n_bulk] tag TAG_PREFIX,
       received any-source (the receiver learns `src` from it)
    2. body    uint8[align(envelope_len) + inline_len + MAC_LEN]    tag TAG_BODY, from src
               = msgpack envelope, zero-padded to ALIGN, then small tensors packed,
               then the message's tag (32 bytes)
    3. bulk    uint8[nbytes] for each large tensor, in header order  tag TAG_BODY, from src

The tag is an HMAC-SHA256 with the run secret (`runtime.auth`) over the run id, (src,
dst, seq), the prefix words, the body before the tag and every bulk tensor's bytes
(hashed from the tensors' memory, no copy): a frame from outside the run, altered, sent
to another rank or replayed is refused. It travels inside the body so a message still
costs the same number of gloo sends (each one is a rendezvous). Without a secret (unit
tests only) the tag is zeros and is not checked.

Decoding trusts nothing before the tag is checked: the prefix's lengths and every tensor
spec are bounded by `max_bytes` (what one message of this run can carry) before anything
is allocated, and every malformed field raises WireError, never another exception.

The envelope is `{"v": 1, "seq": int, "h": <user header>, "t": [[name, dtype, shape,
nbytes, offset], ...]}`; `offset` is the tensor's byte offset inside the body's inline
area, or -1 for a bulk tensor. Small tensors are packed into the body because every gloo
send is a rendezvous (~0.1-0.2 ms on loopback): a decode step's hidden state then costs
two sends, not 2 + one per tensor.
"""

from __future__ import annotations

import hmac
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack
import torch

from runtime.auth import MAC_LEN

if TYPE_CHECKING:
    from runtime.auth import RunSecret

MAGIC = 0xAD2_2C0DE  # "AdaptLink" wire v2 (tagged); a prefix without it is not ours
WIRE_VERSION = 2
MAC_PURPOSE = "adaptlink/wire/v2"
NO_TAG = bytes(MAC_LEN)  # the tag of a message sent without a secret
TAG_PREFIX = 0xAD01  # any-source receives of prefixes
TAG_BODY = 0xAD02  # body and bulk tensors, received from the prefix's sender only
PREFIX_LEN = 4  # int64 words
ALIGN = 16  # byte alignment of every inline tensor (complex128 is 16 bytes)
INLINE_MAX = 256 * 1024  # tensors are packed into the body while the packed total stays <= this
DEFAULT_MAX_BYTES = 256 << 20  # one message's cap when the run gives none (runtime.messages.message_cap)
MAX_ENVELOPE = 1 << 20  # msgpack envelope bytes: headers are small (a route table is ~20 B per block)
MAX_TENSORS = 4096  # tensors in one message
MAX_DIMS = 16

# torch dtypes that may cross the wire, by name. Decoding looks names up here only.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.complex64, torch.complex128,
    )
}


class WireError(ValueError):
    """A message that cannot be encoded (header not msgpack) or decoded (corrupt)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # byte offset in the body's inline area, -1 for a bulk tensor


@dataclass(slots=True)
class Frame:
    """One encoded message, ready for gloo: prefix, body and bulk are uint8/int64 CPU tensors."""

    prefix: torch.Tensor  # int64[PREFIX_LEN]
    body: torch.Tensor  # uint8[header_len + inline_len + MAC_LEN], the tag last
    bulk: list[torch.Tensor]  # uint8[nbytes] each, views of the caller's tensors where possible
    payload_bytes: int  # body + bulk bytes: what the link carries (the prefix is 32 B more)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _first_bad_field(obj: Any, path: str = "header") -> str | None:
    """Path and type of the first value msgpack cannot carry (for the error message)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray)):
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if (bad := _first_bad_field(v, f"{path}[{i}]")) is not None:
                return bad
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (bad := _first_bad_field(k, f"{path} key {k!r}")) is not None:
                return bad
            if (bad := _first_bad_field(v, f"{path}[{k!r}]")) is not None:
                return bad
        return None
    return f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}"


def pack_header(obj: Any) -> bytes:
    """msgpack bytes of `obj`; raises WireError naming the field that msgpack cannot carry."""
    try:
        return msgpack.packb(obj, use_bin_type=True)  # no `default=`: unknown types raise
    except (TypeError, ValueError, OverflowError) as e:
        where = _first_bad_field(obj) or "header"
        raise WireError(f"cannot send {where}: headers are msgpack-only ({e})") from None


def unpack_header(data: bytes) -> Any:
    # strict_map_key=False: dicts keyed by rank (int) are allowed.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) is not dtype:
        raise WireError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    return name


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU copy-or-view of `t` (CUDA is staged through CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tag(secret: "RunSecret | None", src: int, dst: int, seq: int, prefix_words: tuple[int, ...],
         signed: memoryview, bulk: list[torch.Tensor]) -> bytes:
    """HMAC-SHA256 of one message: run id, (src, dst, seq), prefix, body before the tag, and
    each bulk tensor length-prefixed. Bulk bytes are fed from the tensors' own memory."""
    if secret is None:
        return NO_TAG
    h = secret.hasher(MAC_PURPOSE)
    h.update(secret.run_id.encode())
    h.update(struct.pack("<3q4q", src, dst, seq, *prefix_words))
    h.update(signed)
    for b in bulk:
        h.update(struct.pack("<q", b.numel()))
        if b.numel():
            h.update(memoryview(b.numpy()))
    return h.digest()


def encode(seq: int, header: dict, tensors: dict[str, torch.Tensor] | None, *,
           secret: "RunSecret | None" = None, src: int = 0, dst: int = 0) -> Frame:
    """Encode one message from `src` to `dst`, tagged with `secret` (None: untagged).

    Small tensors are copied into the body now (a snapshot); bulk tensors are views of the
    caller's memory and must not change until the send is done."""
    if not isinstance(header, dict):
        raise WireError(f"header must be a dict, got {type(header).__name__}")
    specs: list[list] = []
    inline: list[tuple[int, torch.Tensor]] = []
    bulk: list[torch.Tensor] = []
    inline_len = 0
    for name, t in (tensors or {}).items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WireError(f"tensors must map str to torch.Tensor, got {name!r}: {type(t).__name__}")
        raw = _as_bytes(t)
        n = raw.numel()
        entry = [name, dtype_name(t.dtype), list(t.shape), n]
        if inline_len + n <= INLINE_MAX:
            entry.append(inline_len)
            inline.append((inline_len, raw))
            inline_len = _align(inline_len + n)
        else:
            entry.append(-1)
            bulk.append(raw)
        specs.append(entry)
    try:
        env = pack_header({"v": WIRE_VERSION, "seq": seq, "h": header, "t": specs})
    except WireError:
        pack_header(header)  # raises again, naming the field as the caller wrote it
        raise
    header_len = _align(len(env))
    # assembled in a bytearray: a few times cheaper than torch slice assignments
    buf = bytearray(header_len + inline_len + MAC_LEN)
    buf[: len(env)] = env
    view = memoryview(buf)
    for off, raw in inline:
        if raw.numel():
            view[header_len + off : header_len + off + raw.numel()] = raw.numpy()
    words = (MAGIC, len(env), inline_len, len(bulk))
    view[len(buf) - MAC_LEN :] = _tag(secret, src, dst, seq, words, view[: len(buf) - MAC_LEN], bulk)
    body = torch.frombuffer(buf, dtype=torch.uint8)
    prefix = torch.frombuffer(bytearray(struct.pack("=4q", *words)), dtype=torch.int64)
    return Frame(prefix, body, bulk, body.numel() + sum(b.numel() for b in bulk))


class Prefix(NamedTuple):
    """A received prefix's lengths (unpacks as `env_len, body_len, n_bulk`)."""

    env_len: int
    body_len: int  # align(env_len) + inline_len + MAC_LEN
    n_bulk: int

    @property
    def inline_len(self) -> int:
        return self.body_len - _align(self.env_len) - MAC_LEN

    @property
    def words(self) -> tuple[int, int, int, int]:
        return (MAGIC, self.env_len, self.inline_len, self.n_bulk)


def decode_prefix(prefix: torch.Tensor, max_bytes: int = DEFAULT_MAX_BYTES) -> Prefix:
    """A received prefix, its lengths bounded by `max_bytes` before anything is allocated."""
    magic, env_len, inline_len, n_bulk = (int(x) for x in prefix.tolist())
    if magic != MAGIC:
        raise WireError(f"not an AdaptLink v{WIRE_VERSION} prefix: {[magic, env_len, inline_len, n_bulk]}")
    if not (0 < env_len <= MAX_ENVELOPE and 0 <= inline_len <= INLINE_MAX + ALIGN
            and 0 <= n_bulk <= MAX_TENSORS):
        raise WireError(f"prefix out of bounds: envelope {env_len} B (max {MAX_ENVELOPE}), inline "
                        f"{inline_len} B (max {INLINE_MAX}), {n_bulk} bulk tensors (max {MAX_TENSORS})")
    p = Prefix(env_len, _align(env_len) + inline_len + MAC_LEN, n_bulk)
    if p.body_len > max_bytes:
        raise WireError(f"prefix announces a {p.body_len} B body, over this run's {max_bytes} B cap")
    return p


def _spec(entry: Any, inline_len: int) -> TensorSpec:
    if not (isinstance(entry, list) and len(entry) == 5):
        raise WireError("tensor spec is not [name, dtype, shape, nbytes, offset]")
    name, dt, shape, nbytes, offset = entry
    if not isinstance(name, str) or not isinstance(dt, str) or dt not in DTYPES:
        raise WireError(f"tensor spec with a bad name or dtype: {str(name)[:40]!r}, {str(dt)[:20]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise WireError(f"tensor {name[:40]!r}: shape is not a list of at most {MAX_DIMS} sizes >= 0")
    dtype = DTYPES[dt]
    if type(nbytes) is not int or nbytes != math.prod(shape) * dtype.itemsize:
        raise WireError(f"tensor {name[:40]!r}: {str(nbytes)[:20]} bytes do not fit {dt}{shape}")
    if type(offset) is not int or not (offset == -1 or (0 <= offset and offset % ALIGN == 0
                                                        and offset + nbytes <= inline_len)):
        raise WireError(f"tensor {name[:40]!r}: offset {str(offset)[:20]} outside the inline area")
    return TensorSpec(name, dtype, tuple(shape), nbytes, offset)


def decode_envelope(body: torch.Tensor, prefix: Prefix, max_bytes: int = DEFAULT_MAX_BYTES
                    ) -> tuple[int, dict, list[TensorSpec]]:
    """(seq, user header, tensor specs) from a received body, NOT yet authenticated (see
    `verify`). Every field is type- and bounds-checked; anything else raises WireError."""
    try:
        env = unpack_header(body[: prefix.env_len].numpy().tobytes())
    except Exception as e:  # msgpack raises several types (ExtraData, ValueError, ...)
        raise WireError(f"envelope is not msgpack ({type(e).__name__})") from None
    if not isinstance(env, dict) or env.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported envelope: {str(env)[:200]}")
    seq, header, entries = env.get("seq"), env.get("h"), env.get("t")
    if type(seq) is not int or seq < 0 or not isinstance(header, dict) or not isinstance(entries, list):
        raise WireError("envelope fields seq/h/t missing or of the wrong type")
    if len(entries) > MAX_TENSORS:
        raise WireError(f"{len(entries)} tensors in one message (max {MAX_TENSORS})")
    specs = [_spec(e, prefix.inline_len) for e in entries]
    bulk = [s.nbytes for s in specs if s.offset < 0]
    if len(bulk) != prefix.n_bulk:
        raise WireError(f"prefix announced {prefix.n_bulk} bulk tensors, envelope {len(bulk)}")
    total = prefix.body_len + sum(bulk)
    if total > max_bytes:
        raise WireError(f"message of {total} B, over this run's {max_bytes} B cap")
    return seq, header, specs


def verify(secret: "RunSecret | None", src: int, dst: int, seq: int, prefix: Prefix,
           body: torch.Tensor, bulk: list[torch.Tensor]) -> bool:
    """Whether the body's tag is the one `secret` gives this message (always, without one)."""
    if secret is None:
        return True
    view = memoryview(body.numpy())
    n = view.nbytes - MAC_LEN
    want = _tag(secret, src, dst, seq, prefix.words, view[:n], bulk)
    return hmac.compare_digest(want, bytes(view[n:]))


def bulk_buffers(specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Empty receive buffers for the bulk tensors, in wire order (sizes already bounded)."""
    return [torch.empty(s.nbytes, dtype=torch.uint8) for s in specs if s.offset < 0]


def materialize(specs: list[TensorSpec], body: torch.Tensor, prefix: Prefix,
                bulk: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors of a received message (inline ones are views of the body)."""
    header_len = _align(prefix.env_len)
    out: dict[str, torch.Tensor] = {}
    it = iter(bulk)
    for s in specs:
        if s.offset >= 0:
            raw = body[header_len + s.offset : header_len + s.offset + s.nbytes]
        else:
            raw = next(it)
        out[s.name] = raw.view(s.dtype).reshape(s.shape)
    return out
