"""`adaptlink graph --model SRC [--json]`: the block graph of a model and its costs."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from adaptlink.model.graph import build_graph, graph_to_dict
from partitioner.errors import AdaptLinkError


def add_parser(sub) -> None:
    p = sub.add_parser("graph", help="show the block graph of a model and its per-block costs")
    p.add_argument("--model", required=True, help="preset:NAME or a LLaVA checkpoint directory")
    p.add_argument("--prefill-tokens", type=int, default=640, help="prompt tokens per request, image tokens included")
    p.add_argument("--decode-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print JSON (blocks list, total_params) instead of a table")
    p.set_defaults(func=_cmd_graph)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _cmd_graph(args) -> int:
    for flag, value, least in (("--prefill-tokens", args.prefill_tokens, 1),
                               ("--decode-tokens", args.decode_tokens, 0), ("--images", args.images, 0)):
        if value < least:
            raise AdaptLinkError(f"{flag}: must be >= {least}, got {value}")
    G = build_graph(args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                    images_per_request=args.images, dtype=args.dtype)
    doc = graph_to_dict(G)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0

    t = Table(title=f"{args.model}: {len(doc['blocks'])} blocks, {doc['total_params']:,} parameters "
                    f"({doc['unused_params']:,} never run), {args.dtype}, "
                    f"prefill {args.prefill_tokens} tok, decode {args.decode_tokens} tok")
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
