"""Model sources: `preset:NAME` (a published config, no weights) or a local checkpoint directory.

`load_config(source)` returns a validated `LlavaConfig`; `ModelInfo` holds the derived
numbers every other part needs (which vision layers run, image tokens per image, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
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
# llava-hf/llava-v1.6-*-hf (LlavaNextForConditionalGeneration): the 1.5 tower and projector, anyres
# tiling over five 336-multiples, an image_newline; Mistral-7B-Instruct-v0.2 (no window) or Vicuna.
_LLAVA_16_COMMON = dict(
    model_type="llava_next", image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", image_seq_length=576, tie_word_embeddings=False,
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    vision_config=_CLIP_L_336,
)
_VICUNA = dict(
    model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
PRESETS: dict[str, dict[str, Any]] = {
    "bakllava-v1": dict(
        **_LLAVA_15_COMMON,
        vision_config=_CLIP_L_336,
        text_config=dict(**_MISTRAL_7B, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096),
    ),
    "llava-v1.6-mistral-7b": dict(
        **_LLAVA_16_COMMON, pad_token_id=32001,
        text_config=dict(**_MISTRAL_7B, max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None),
    ),
    "llava-v1.6-vicuna-7b": dict(
        **_LLAVA_16_COMMON, pad_token_id=32001,
        text_config=dict(**_VICUNA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32),
    ),
    "llava-v1.6-vicuna-13b": dict(
        **_LLAVA_16_COMMON, pad_token_id=32001,
        text_config=dict(**_VICUNA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                         num_attention_heads=40, num_key_value_heads=40),
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
    # ~0.7 s: not at the command line's start-up
    from transformers import LlavaConfig, LlavaNextConfig

    classes = {"llava": LlavaConfig, "llava_next": LlavaNextConfig}
    if source.startswith(PRESET_PREFIX):
        name = source[len(PRESET_PREFIX):]
        if name not in PRESETS:
            raise ModelSourceError(
                f"{source}: unknown preset {name!r}; known presets: {', '.join(preset_names())}"
            )
        preset = dict(PRESETS[name])
        config = classes[preset.pop("model_type", "llava")](**preset)
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
        kind = raw.get("model_type")
        if kind not in classes:  # llava_onevision, llava_next_video, ...: other models
            raise ModelSourceError(
                f"{cfg_file}: model_type: {kind!r} is not supported (supported: 'llava' "
                f"(LlavaForConditionalGeneration), 'llava_next' (LlavaNextForConditionalGeneration))"
            )
        try:
            config = classes[kind].from_pretrained(str(path))
        except Exception as e:  # transformers raises many kinds; say which file
            raise ModelSourceError(f"{cfg_file}: cannot be read as a {classes[kind].__name__}: {e}") from None
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
    model_type: str = "llava"               # "llava" or "llava_next" (anyres tiling)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # NeXT: the (height, width) tilings
    tile_size: int = 0                      # the vision tower's image size (a tile's side)
    tiles_per_image: int = 1                # tiles the vision tower runs per image (NeXT: base + grid)
    image_size: tuple[int, int] | None = None  # NeXT: the (width, height) the counts are for

    @property
    def next(self) -> bool:
        return self.model_type == "llava_next"

    @property
    def max_tiles(self) -> int:
        """The most tiles one image can take (NeXT: the base + the largest grid)."""
        if not self.next:
            return 1
        return 1 + max(-(-h // self.tile_size) * -(-w // self.tile_size) for h, w in self.grid_pinpoints)

    def tiles_for(self, height: int, width: int) -> tuple[int, int]:
        """NeXT: the tile grid (rows, columns) for an image of this size, as HF picks it
        (`select_best_resolution` over `image_grid_pinpoints`)."""
        from transformers.image_processing_utils import select_best_resolution  # loaded with the config

        h, w = select_best_resolution((height, width), [list(p) for p in self.grid_pinpoints])
        return h // self.tile_size, w // self.tile_size

    def image_tokens_for(self, width: int, height: int) -> int:
        """Tokens one image of `width` x `height` pixels takes in the prompt. LLaVA: fixed (the
        processor resizes and crops). NeXT: the base tile, then the grid's feature map unpadded
        to the image's aspect ratio with one `image_newline` per row, as HF packs it
        (`LlavaNextModel.pack_image_features`, `unpad_image`)."""
        if not self.next:
            return self.image_tokens
        side = math.isqrt(self.patches_per_image)  # patches per tile side
        rows_t, cols_t = self.tiles_for(height, width)
        cur_h, cur_w = rows_t * side, cols_t * side
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        return self.patches_per_image + cur_h * (cur_w + 1)

    def for_image(self, width: int, height: int) -> "ModelInfo":
        """The same model with its per-image counts (image tokens, tiles) for this image size:
        what the graph and the planner use for a workload's representative image."""
        if not self.next:
            return self
        rows_t, cols_t = self.tiles_for(height, width)
        return replace(self, image_tokens=self.image_tokens_for(width, height),
                       tiles_per_image=1 + rows_t * cols_t, image_size=(width, height))

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
        is_next = getattr(config, "model_type", "llava") == "llava_next"
        pinpoints = ()
        if is_next:
            try:
                pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
            except (TypeError, ValueError):
                pinpoints = ()
            if not pinpoints or any(h % vc.image_size or w % vc.image_size or h <= 0 or w <= 0
                                    for h, w in pinpoints):
                raise ModelSourceError(
                    f"{source}: image_grid_pinpoints: {config.image_grid_pinpoints!r} must be a non-empty "
                    f"list of [height, width], each a multiple of vision_config.image_size {vc.image_size}")
            # HF reshapes each tile's features into a (side x side) grid: no class token may be left
            if int(cls_token) - (1 if strategy == "default" else 0) != 0:
                raise ModelSourceError(
                    f"{source}: vision_feature_select_strategy: {strategy!r} with {vc.model_type!r} leaves "
                    f"{'a class token' if cls_token else 'one patch short'} per tile, which LLaVA-NeXT's "
                    f"packing cannot lay out (supported: 'default' with CLIP, 'full' with SigLIP)")
        info = cls(
            source=source,
            model_type="llava_next" if is_next else "llava",
            grid_pinpoints=pinpoints,
            tile_size=vc.image_size,
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
        # NeXT's counts depend on the image: by default those of a square image of the tower's size
        return info.for_image(vc.image_size, vc.image_size)


def layer_windows(text_config) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window as HF's cache reads it from the config (Mistral:
    `sliding_window` on every layer; Qwen2: on the `layer_types` "sliding_attention" layers,
    set only with `use_sliding_window`; LLaMA: none)."""
    from transformers.cache_utils import get_layer_types_and_kwargs  # a config object: loaded already

    _, kwargs = get_layer_types_and_kwargs(text_config)
    return tuple(k.get("sliding_window") for k in kwargs)
