"""`adaptlink make-tiny`: write a tiny random-weight LLaVA checkpoint, offline
(`adaptlink.model.tiny` builds it)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from adaptlink.model.tiny_spec import MODEL_CLASSES, TEXT_MODELS, VISION_MODELS, TinySpec


def _feature_layer(text: str) -> int | list[int]:
    parts = [int(x) for x in text.split(",") if x.strip()]
    return parts[0] if len(parts) == 1 and "," not in text else parts


def add_parser(subparsers) -> None:
    """Register `adaptlink make-tiny`."""
    d = TinySpec()
    p = subparsers.add_parser(
        "make-tiny",
        help="write a tiny random-weight LLaVA checkpoint (offline)",
        description="Write a tiny random-weight LLaVA (model, tokenizer, image processor) "
                    "that loads with HF_HUB_OFFLINE=1, and optionally sample requests.",
    )
    p.add_argument("dir", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=d.seed, help="weight seed (default %(default)s)")
    p.add_argument("--text-layers", type=int, default=d.text_layers)
    p.add_argument("--text-hidden", type=int, default=d.text_hidden)
    p.add_argument("--text-heads", type=int, default=d.text_heads)
    p.add_argument("--kv-heads", type=int, default=d.text_kv_heads, help="== heads: MHA")
    p.add_argument("--vision-layers", type=int, default=d.vision_layers)
    p.add_argument("--feature-layer", type=_feature_layer, default=d.vision_feature_layer,
                   metavar="N[,N...]", help="vision_feature_layer, e.g. -2 or -2,-1")
    p.add_argument("--strategy", choices=["default", "full"],
                   default=d.vision_feature_select_strategy)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embeddings")
    p.add_argument("--model-class", choices=list(MODEL_CLASSES), default=d.model_class,
                   help="llava, or llava_next (anyres tiling; images of other sizes take other token counts)")
    p.add_argument("--decoder", choices=list(TEXT_MODELS), default=d.text_model)
    p.add_argument("--tower", choices=list(VISION_MODELS), default=d.vision_model,
                   help="vision tower (siglip: no class token; use --strategy full)")
    p.add_argument("--sliding-window", type=int, default=d.sliding_window,
                   help="mistral: every layer's window; qwen2: the window of every layer")
    p.add_argument("--requests", type=int, default=0, metavar="N",
                   help="also write N sample requests to DIR/requests/prompts.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=16, help="for the sample requests")
    p.set_defaults(func=_cmd_make_tiny)


def _cmd_make_tiny(args) -> int:
    # torch and transformers (~1.9 s to import) load only when the command runs, so that
    # `adaptlink --help` and the other commands start fast
    from adaptlink.model.samples import write_sample_requests
    from adaptlink.model.tiny import _save_tiny, count_params

    spec = TinySpec(
        seed=args.seed, text_layers=args.text_layers, text_hidden=args.text_hidden,
        text_heads=args.text_heads, text_kv_heads=args.kv_heads,
        vision_layers=args.vision_layers, vision_feature_layer=args.feature_layer,
        vision_feature_select_strategy=args.strategy, tie_word_embeddings=args.tie,
        model_class=args.model_class, text_model=args.decoder, vision_model=args.tower,
        sliding_window=args.sliding_window,
    )
    out, model = _save_tiny(args.dir, spec)
    n_params = count_params(model)
    cfg = model.config
    t = Table(title=f"tiny LLaVA -> {out}", show_header=False)
    t.add_row("parameters", f"{n_params:,}" + (" (lm_head tied)" if spec.tie_word_embeddings else ""))
    t.add_row("vocab", str(cfg.text_config.vocab_size))
    t.add_row("image token id", str(cfg.image_token_index))
    t.add_row("image tokens per image", str(spec.image_tokens) + (
        " + the grid's (NeXT: depends on the image)" if spec.model_class == "llava_next" else ""))
    t.add_row("model", f"{spec.model_class}, {spec.text_model} decoder, {spec.vision_model} tower"
                       + (f", sliding window {spec.sliding_window}" if spec.sliding_window else ""))
    t.add_row("decoder", f"{spec.text_layers} layers, hidden {spec.text_hidden}, "
                         f"{spec.text_heads} heads / {spec.text_kv_heads} kv")
    t.add_row("vision", f"{spec.vision_layers} layers, hidden {spec.vision_hidden}, "
                        f"{spec.image_size}px / patch {spec.patch_size}, feature layer "
                        f"{spec.vision_feature_layer}, strategy {spec.vision_feature_select_strategy}")
    t.add_row("seed", str(spec.seed))
    if args.requests:
        jsonl = write_sample_requests(out / "requests", args.requests, seed=args.seed,
                                      max_new_tokens=args.max_new_tokens)
        t.add_row("requests", f"{args.requests} -> {jsonl}")
    Console().print(t)
    return 0
