"""The block vocabulary: the one place that names LLaVA's blocks, their kinds and file schemas.

Every layer (partitioner, the model layer, the runtime, the commands) imports these names from
here; nothing else defines a block kind, tells vision from text, or builds the LLaVA edges.
Plain Python, no torch and no networkx: the planner must import on a machine without torch.
See docs/DESIGN.md ("Blocks").

Block ids: `vision.embed`, `vision.layer.I`, `projector`, `text.embed`, `merge`,
`decoder.layer.I`, `head`. The vision chain (`vision.embed` .. `projector`) and the text
chain (`text.embed`, then `merge` .. `head`) meet at `merge`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CLUSTER_SCHEMA = "adaptlink.cluster/2"
CLUSTER_SCHEMAS = ("adaptlink.cluster/1", CLUSTER_SCHEMA)
"""Schemas cluster.json is read in: /2 adds per-block cost tables by rows and by prompt tokens
(`decode_s_by_rows`, `prefill_s_by_tokens`); a /1 file is read as before (docs/DESIGN.md)."""
PLAN_SCHEMA = "adaptlink.plan/1"

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TOKEN_ID_BYTES = 8
"""int64 ids travel with the text embeddings to the merge."""

PROFILE_ROWS = (1, 2, 4, 8, 16, 32)
"""Decode rows per micro-batch the profiler measures each block kind at (`decode_s_by_rows`)."""

# Every kind of block, in a topological order of the LLaVA graph (the profiler measures one
# block of each).
BLOCK_KINDS = ("vision_embed", "vision_layer", "projector", "text_embed", "merge", "decoder_layer", "head")
# Blocks that run once per image at prefill and never at decode.
VISION_KINDS = ("vision_embed", "vision_layer", "projector")
# Blocks that must sit on the coordinator: tokens enter at text.embed and leave at head.
COORDINATOR_KINDS = ("text_embed", "head")
# Kinds that end a request's path: edges into them may return to the coordinator.
SINK_KINDS = ("head",)
# Kinds a model has many of, run back to back: one chain a runtime stage cuts into ranges.
LAYER_KINDS = ("vision_layer", "decoder_layer")
# Order of kinds in listings.
KIND_ORDER = {k: i for i, k in enumerate(BLOCK_KINDS)}

_SINGLE = {"vision.embed": "vision_embed", "projector": "projector", "text.embed": "text_embed",
           "merge": "merge", "head": "head"}
_LAYER = re.compile(r"^(vision|decoder)\.layer\.(\d+)$")


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of `dtype` (`float32`, `float16`, `bfloat16`)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPE_BYTES)}") from None


def block_kind(block_id: str, default: str | None = None) -> str:
    """`decoder.layer.7` -> `decoder_layer`. An id that is not a block raises ValueError,
    unless `default` is given (validation reports it as a field error instead)."""
    m = _LAYER.match(block_id)
    if m:
        return f"{m.group(1)}_layer"
    kind = _SINGLE.get(block_id, default)
    if kind is None:
        raise ValueError(f"not a block id: {block_id!r}")
    return kind


def block_index(block_id: str) -> int | None:
    """`decoder.layer.7` -> 7; None for a block that is not a layer."""
    m = _LAYER.match(block_id)
    return int(m.group(2)) if m else None


def is_vision(block_id: str) -> bool:
    """True for the vision chain (`vision.embed`, `vision.layer.I`, `projector`): blocks that
    run once per image at prefill and hold no KV cache."""
    return block_kind(block_id, "unknown") in VISION_KINDS


def llava_block_ids(vision_layers: int, text_layers: int) -> list[str]:
    """All blocks of a LLaVA with these layer counts, in a topological order (vision first)."""
    return (["vision.embed"] + [f"vision.layer.{i}" for i in range(vision_layers)]
            + ["projector", "text.embed", "merge"]
            + [f"decoder.layer.{i}" for i in range(text_layers)] + ["head"])


def llava_edges(blocks: Iterable[str]) -> list[tuple[str, str]]:
    """The edges of the LLaVA block graph among these block ids: the vision chain into
    `merge`, `text.embed` into `merge`, and `merge` through the decoder layers to `head`."""
    blocks = set(blocks)

    def layers(prefix: str) -> list[str]:
        idx = sorted(int(b.rsplit(".", 1)[1]) for b in blocks if _LAYER.match(b) and b.startswith(prefix))
        return [f"{prefix}{i}" for i in idx]

    vision = [b for b in ["vision.embed", *layers("vision.layer."), "projector", "merge"] if b in blocks]
    text = [b for b in ["merge", *layers("decoder.layer."), "head"] if b in blocks]
    edges = list(zip(vision, vision[1:])) + list(zip(text, text[1:]))
    if "text.embed" in blocks and "merge" in blocks:
        edges.append(("text.embed", "merge"))
    return edges


def mean_decode_context(prefill_tokens: int, decode_tokens: int) -> int:
    """The context at which one decode step is costed: its mean over a request, S + T // 2."""
    return prefill_tokens + decode_tokens // 2
