"""The wire format of one transport message: a fixed prefix, a msgpack body, raw tensors.

No pickle anywhere: the header is msgpack (only nil, bool, int, float, str, bytes, list,
dict), and tensors travel as their raw bytes with name, dtype and shape in the header.

One message from `src` to `dst` is two or more gloo point-to-point sends:

    1. prefix  int64[4] = [MAGIC, envelope_len, inline_len, n_bulk] tag TAG_PREFIX,
       received any-source (the receiver learns `src` from it)
    2. body    uint8[align(envelope_len) + inline_len]              tag TAG_BODY, from src
               = msgpack envelope, zero-padded to ALIGN, then small tensors packed
    3. bulk    uint8[nbytes] for each large tensor, in header order  tag TAG_BODY, from src

The envelope is `{"v": 1, "seq": int, "h": <user header>, "t": [[name, dtype, shape,
nbytes, offset], ...]}`; `offset` is the tensor's byte offset inside the body's inline
area, or -1 for a bulk tensor. Small tensors are packed into the body because every gloo
send is a rendezvous (~0.1-0.2 ms on loopback): a decode step's hidden state then costs
two sends, not 2 + one per tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

MAGIC = 0xAD1_1C0DE  # "AdaptLink" wire v1; a prefix without it is not ours
WIRE_VERSION = 1
TAG_PREFIX = 0xAD01  # any-source receives of prefixes
TAG_BODY = 0xAD02  # body and bulk tensors, received from the prefix's sender only
PREFIX_LEN = 4  # int64 words
ALIGN = 16  # byte alignment of every inline tensor (complex128 is 16 bytes)
INLINE_MAX = 256 * 1024  # tensors are packed into the body while the packed total stays <= this

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
    body: torch.Tensor  # uint8[header_len + inline_len]
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


def encode(seq: int, header: dict, tensors: dict[str, torch.Tensor] | None) -> Frame:
    """Encode one message. Small tensors are copied into the body now (a snapshot); bulk
    tensors are views of the caller's memory and must not change until the send is done."""
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
    buf = bytearray(header_len + inline_len)
    buf[: len(env)] = env
    view = memoryview(buf)
    for off, raw in inline:
        if raw.numel():
            view[header_len + off : header_len + off + raw.numel()] = raw.numpy()
    body = torch.frombuffer(buf, dtype=torch.uint8)
    prefix = torch.frombuffer(bytearray(struct.pack("=4q", MAGIC, len(env), inline_len, len(bulk))),
                              dtype=torch.int64)
    return Frame(prefix, body, bulk, body.numel() + sum(b.numel() for b in bulk))


def decode_prefix(prefix: torch.Tensor) -> tuple[int, int, int]:
    """(envelope_len, body_len, n_bulk) of a received prefix."""
    magic, env_len, inline_len, n_bulk = (int(x) for x in prefix.tolist())
    if magic != MAGIC or env_len <= 0 or inline_len < 0 or n_bulk < 0:
        raise WireError(f"not an AdaptLink prefix: {[magic, env_len, inline_len, n_bulk]}")
    return env_len, _align(env_len) + inline_len, n_bulk


def decode_envelope(body: torch.Tensor, env_len: int) -> tuple[int, dict, list[TensorSpec]]:
    """(seq, user header, tensor specs) from a received body."""
    env = unpack_header(body[:env_len].numpy().tobytes())
    if not isinstance(env, dict) or env.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported envelope: {str(env)[:200]}")
    specs = []
    for name, dt, shape, nbytes, offset in env["t"]:
        if dt not in DTYPES:
            raise WireError(f"tensor {name!r} has unknown dtype {dt!r}")
        specs.append(TensorSpec(name, DTYPES[dt], tuple(shape), nbytes, offset))
    return env["seq"], env["h"], specs


def bulk_buffers(specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Empty receive buffers for the bulk tensors, in wire order."""
    return [torch.empty(s.nbytes, dtype=torch.uint8) for s in specs if s.offset < 0]


def materialize(specs: list[TensorSpec], body: torch.Tensor, env_len: int,
                bulk: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors of a received message (inline ones are views of the body)."""
    header_len = _align(env_len)
    out: dict[str, torch.Tensor] = {}
    it = iter(bulk)
    for s in specs:
        if s.offset >= 0:
            raw = body[header_len + s.offset : header_len + s.offset + s.nbytes]
        else:
            raw = next(it)
        out[s.name] = raw.view(s.dtype).reshape(s.shape)
    return out
