"""`adaptlink graph --model SRC [--json]`: the block graph of a model and its costs.

`--image-size WxH` is the workload's representative image: LLaVA-NeXT tiles it (the base
image plus a grid picked from `image_grid_pinpoints`), so its vision cost and image tokens
depend on it (default: a square of the vision tower's size). LLaVA resizes every image to
one square: the flag changes nothing there.
"""

from __future__ import annotations

import argparse
import json
import re

from rich.console import Console
from rich.table import Table

from adaptlink.model.config import ModelInfo, load_config
from adaptlink.model.graph import build_graph, graph_to_dict
from partitioner.errors import AdaptLinkError


def add_parser(sub) -> None:
    p = sub.add_parser("graph", help="show the block graph of a model and its per-block costs")
    p.add_argument("--model", required=True, help="preset:NAME or a LLaVA checkpoint directory")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="prompt tokens per request, image tokens included (default: 640, or the "
                        "image tokens + 64 when they are more)")
    p.add_argument("--decode-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--image-size", type=parse_image_size, default=None, metavar="WxH",
                   help="a representative image, width x height pixels (LLaVA-NeXT's token count "
                        "depends on it; default: the vision tower's own square)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print JSON (blocks list, total_params) instead of a table")
    p.set_defaults(func=_cmd_graph)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def parse_image_size(text: str) -> tuple[int, int]:
    """`WxH` (e.g. `1024x768`) -> (width, height), both >= 1."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1024x768, got {text!r}")
    return int(m[1]), int(m[2])


def image_tokens(source: str, image_size: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
    """(tokens one image takes, the size they are for) for a model source and workload image."""
    info = ModelInfo.from_config(load_config(source), source=source)
    if image_size is not None:
        info = info.for_image(*image_size)
    return info.image_tokens, info.image_size


def workload_prefill(source: str, prefill_tokens: int | None, images: int,
                     image_size: tuple[int, int] | None) -> int:
    """The prompt tokens a workload is costed for: `prefill_tokens`, checked to hold the
    images' tokens, or by default 640 (LLaVA-1.5: 576 image tokens + 64), or the images'
    tokens + 64 when they are more (LLaVA-NeXT: 1,176 at 336x336, 2,928 at 672x672)."""
    per_image, size = image_tokens(source, image_size)
    need = images * per_image
    if prefill_tokens is None:
        return max(640, need + 64)
    if prefill_tokens < need:
        at = f" at {size[0]}x{size[1]}" if size else ""
        raise AdaptLinkError(f"--prefill-tokens: {prefill_tokens} cannot hold {images} image(s) of "
                             f"{per_image} tokens{at}; use at least {need}")
    return prefill_tokens


def _cmd_graph(args) -> int:
    for flag, value, least in (("--prefill-tokens", args.prefill_tokens, 1),
                               ("--decode-tokens", args.decode_tokens, 0), ("--images", args.images, 0)):
        if value is not None and value < least:
            raise AdaptLinkError(f"{flag}: must be >= {least}, got {value}")
    args.prefill_tokens = workload_prefill(args.model, args.prefill_tokens, args.images, args.image_size)
    size = image_tokens(args.model, args.image_size)[1]
    G = build_graph(args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                    images_per_request=args.images, dtype=args.dtype, image_size=args.image_size)
    doc = graph_to_dict(G)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0

    t = Table(title=f"{args.model}: {len(doc['blocks'])} blocks, {doc['total_params']:,} parameters "
                    f"({doc['unused_params']:,} never run), {args.dtype}, "
                    f"prefill {args.prefill_tokens} tok ({doc['image_tokens']} per image"
                    + (f" at {size[0]}x{size[1]}" if size else "") + f"), decode {args.decode_tokens} tok")
    for col in ("block", "params", "weights", "GFLOP prefill", "MFLOP decode step", "out prefill",
                "out decode", "KV / token"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for b in doc["blocks"]:
        t.add_row(b["id"], f"{b['params']:,}", _fmt_bytes(b["param_bytes"]), f"{b['flops_prefill'] / 1e9:.2f}",
                  f"{b['flops_decode'] / 1e6:.1f}", _fmt_bytes(b["out_bytes_prefill"]),
                  _fmt_bytes(b["out_bytes_decode"]), _fmt_bytes(b["kv_bytes_per_token"]))
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table to 80 columns
        console.width = 150
    console.print(t)
    return 0
