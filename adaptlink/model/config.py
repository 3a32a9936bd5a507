"""Model sources: `preset:NAME` (a published config, no weights) or a local checkpoint directory.

`load_config(source)` returns a validated `LlavaConfig`; `ModelInfo` holds the derived
numbers every other part needs (which vision layers run, image tokens per image, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner.errors import ModelSourceError

PRESET_PREFIX = "preset:"

# What the blocks know how to run (HF's own modules; docs/LLAVA.md): the decoder-layer and
# tower classes are HF's, the block names and FLOP formulas are written for these.
TEXT_DECODERS = ("llama", "mistral", "qwen2")
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")

# Published configs of llava-hf/llava-1.5-{7b,13b}-hf (config.json on the hub), written out
# so that planning needs no download. Vision tower: CLIP ViT-L/14 at 336 px.
_CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, vocab_size=32000,
)
_LLAVA_15_COMMON = dict(
    image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", image_seq_length=576, pad_token_id=32001,
    tie_word_embeddings=False,
)
# llava-hf/bakLlava-v1-hf: Mistral-7B-v0.1 (sliding window 4096) behind the same CLIP-L/336.
_MISTRAL_7B = dict(
    model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, rms_norm_eps=1e-5,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# llava-hf/llava-interleave-qwen-7b-hf: Qwen2-7B behind SigLIP so400m/14 at 384 px (its pooling
# head is stored, never run), the last hidden state, all positions ("full": no class token to drop).
_SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6,
)
PRESETS: dict[str, dict[str, Any]] = {
    "bakllava-v1": dict(
        **_LLAVA_15_COMMON,
        vision_config=_CLIP_L_336,
        text_config=dict(**_MISTRAL_7B, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096),
    ),
    "llava-interleave-qwen-7b": dict(
        image_token_index=151646, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_seq_length=729, tie_word_embeddings=False,
        vision_config=_SIGLIP_SO400M_384,
        text_config=dict(
            model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=152000,
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
            bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        ),
    ),
    "llava-1.5-7b": dict(
        **_LLAVA_15_COMMON,
        vision_config=_CLIP_L_336,
        text_config=dict(
            model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
    ),
    "llava-1.5-13b": dict(
        **_LLAVA_15_COMMON,
        vision_config=_CLIP_L_336,
        text_config=dict(
            model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
            num_attention_heads=40, num_key_value_heads=40, vocab_size=32064,
            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_config(source: str):
    """The validated `LlavaConfig` of a model source (preset or checkpoint directory)."""
    from transformers import LlavaConfig  # ~0.7 s: not at the command line's start-up

    if source.startswith(PRESET_PREFIX):
        name = source[len(PRESET_PREFIX):]
        if name not in PRESETS:
            raise ModelSourceError(
                f"{source}: unknown preset {name!r}; known presets: {', '.join(preset_names())}"
            )
        config = LlavaConfig(**PRESETS[name])
    else:
        path = Path(source)
        if not path.is_dir():
            raise ModelSourceError(
                f"{source}: not a checkpoint directory (no such directory) and not "
                f"'preset:NAME' (presets: {', '.join(preset_names())})"
            )
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelSourceError(f"{source}: not a LLaVA checkpoint: no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelSourceError(f"{cfg_file}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ModelSourceError(f"{cfg_file}: not a LLaVA config: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != "llava":
            raise ModelSourceError(
                f"{cfg_file}: model_type: expected 'llava', got {raw.get('model_type')!r}"
            )
        try:
            config = LlavaConfig.from_pretrained(str(path))
        except Exception as e:  # transformers raises many kinds; say which file
            raise ModelSourceError(f"{cfg_file}: cannot be read as a LlavaConfig: {e}") from None
    # Attention as `generate` uses it on CPU; set explicitly because blocks are built
    # outside `from_pretrained`, which is what normally sets it.
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    ModelInfo.from_config(config, source=source)  # validates
    return config


@dataclass(frozen=True)
class ModelInfo:
    """Numbers derived from a LlavaConfig that the graph, blocks and runtime share."""

    source: str
    vision_layers_total: int        # L, as configured
    vision_layers_used: int         # encoder layers that must run: 0 .. used-1
    feature_picks: tuple[int, ...]  # indices into hidden_states (0..L), in config order
    strategy: str                   # "default" drops CLS, "full" keeps it
    patches_per_image: int          # (image_size // patch_size) ** 2
    image_tokens: int               # tokens per image in the prompt after the merge
    text_layers: int
    image_token_id: int
    vision_type: str = "clip_vision_model"  # a VISION_TOWERS entry
    text_type: str = "llama"                 # a TEXT_DECODERS entry
    windows: tuple[int | None, ...] = ()     # per decoder layer: its sliding window, None = full

    def window(self, layer: int) -> int | None:
        """Decoder layer `layer`'s sliding window (a key at j is seen from position i when
        i - window < j <= i), or None for full causal attention."""
        return self.windows[layer] if self.windows else None

    @property
    def class_token(self) -> bool:
        """CLIP prepends a class token to the patches; SigLIP has none."""
        return self.vision_type == "clip_vision_model"

    @property
    def vision_tokens(self) -> int:
        """Positions of the vision tower's hidden state per image (tile): patches (+ CLS)."""
        return self.patches_per_image + int(self.class_token)

    @classmethod
    def from_config(cls, config, source: str = "<config>") -> "ModelInfo":
        vc, tc = config.vision_config, config.text_config
        # Blocks name these towers' and decoders' submodules (docs/LLAVA.md) and the FLOP
        # formulas are theirs: refuse others here rather than fail deep inside the graph.
        for part, cfg, want in (("vision_config", vc, VISION_TOWERS), ("text_config", tc, TEXT_DECODERS)):
            if cfg.model_type not in want:
                raise ModelSourceError(
                    f"{source}: {part}.model_type: {cfg.model_type!r} is not supported "
                    f"(supported: {', '.join(repr(w) for w in want)})")
        L = vc.num_hidden_layers
        fl = config.vision_feature_layer
        layers = [fl] if isinstance(fl, int) else list(fl)
        if not layers:
            raise ModelSourceError(f"{source}: vision_feature_layer: empty list")
        picks = []
        for f in layers:
            if not isinstance(f, int) or not -(L + 1) <= f <= L:
                raise ModelSourceError(
                    f"{source}: vision_feature_layer: {fl!r} is out of range for a vision tower "
                    f"of {L} layers (valid: -{L + 1}..{L}, not 0)"
                )
            picks.append(f % (L + 1))
        if isinstance(fl, int) and picks[0] == 0:
            # transformers 5.24 `generate` treats 0 as unset (falsy) and crashes.
            raise ModelSourceError(
                f"{source}: vision_feature_layer: 0 (the embeddings) is not supported; "
                f"use a layer in 1..{L} or a negative index"
            )
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ModelSourceError(
                f"{source}: vision_feature_select_strategy: expected 'default' or 'full', got {strategy!r}"
            )
        if vc.patch_size > vc.image_size:
            raise ModelSourceError(
                f"{source}: vision_config: patch_size {vc.patch_size} is larger than image_size {vc.image_size}"
            )
        # A remainder is cut off by the patch convolution ('valid'), as in SigLIP so400m/14 at 384 px.
        patches = (vc.image_size // vc.patch_size) ** 2
        cls_token = vc.model_type == "clip_vision_model"
        if not 0 <= config.image_token_id < tc.vocab_size:
            raise ModelSourceError(
                f"{source}: image_token_index: {config.image_token_id} is outside the text vocab "
                f"(vocab_size {tc.vocab_size})"
            )
        return cls(
            source=source,
            windows=layer_windows(tc),
            vision_layers_total=L,
            vision_layers_used=max(picks),
            feature_picks=tuple(picks),
            strategy=strategy,
            patches_per_image=patches,
            # "default" drops the first position as HF does, CLS or not (SigLIP: a patch)
            image_tokens=patches + int(cls_token) - (1 if strategy == "default" else 0),
            text_layers=tc.num_hidden_layers,
            image_token_id=config.image_token_id,
            vision_type=vc.model_type,
            text_type=tc.model_type,
        )


def layer_windows(text_config) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window as HF's cache reads it from the config (Mistral:
    `sliding_window` on every layer; Qwen2: on the `layer_types` "sliding_attention" layers,
    set only with `use_sliding_window`; LLaMA: none)."""
    from transformers.cache_utils import get_layer_types_and_kwargs  # a config object: loaded already

    _, kwargs = get_layer_types_and_kwargs(text_config)
    return tuple(k.get("sliding_window") for k in kwargs)
