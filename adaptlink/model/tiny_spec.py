"""The sizes of a tiny random LLaVA (`TinySpec`), apart from the builder in
`adaptlink.model.tiny` so that reading them needs no torch (the `make-tiny` parser's
defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from partitioner.errors import AdaptLinkError

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]  # ids 0..4 in this order
MODEL_CLASSES = ("llava", "llava_next")
TEXT_MODELS = ("llama", "mistral", "qwen2")
VISION_MODELS = ("clip", "siglip")
SPEC_FILE = "adaptlink_tiny.json"  # the TinySpec a directory was built from


class TinySpecError(AdaptLinkError):
    """A tiny-model spec whose sizes do not fit together."""


@dataclass(kw_only=True, slots=True)
class TinySpec:
    """Sizes and init of a tiny random LLaVA. Defaults: ~0.5M params, 16 image tokens."""

    model_class: str = "llava"
    """"llava" (LlavaForConditionalGeneration) or "llava_next" (anyres tiling, image_newline)."""
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    """LLaVA-NeXT: the (height, width) tilings, multiples of image_size (default: LLaVA-1.6's
    five, scaled to image_size)."""
    text_model: str = "llama"
    """Decoder: "llama", "mistral" (sliding_window on every layer) or "qwen2" (biased q/k/v)."""
    vision_model: str = "clip"
    """Vision tower: "clip" (a class token, pre_layrnorm) or "siglip" (no class token)."""
    sliding_window: int | None = None
    """Mistral: every layer's window; Qwen2: the window of layers >= max_window_layers."""
    max_window_layers: int = 0
    """Qwen2: the first layer with the sliding window (with sliding_window set)."""
    text_hidden: int = 64
    """Decoder hidden size."""
    text_layers: int = 4
    """Number of decoder layers."""
    text_heads: int = 4
    """Query heads per decoder layer."""
    text_kv_heads: int = 2
    """Key/value heads: == text_heads is MHA, fewer is GQA, 1 is MQA."""
    text_intermediate: int = 256
    """Decoder MLP width."""
    vocab_size: int = 512
    """BPE target vocabulary; the model's vocab is len(tokenizer), which may be less."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + image tokens + generated)."""
    vision_hidden: int = 64
    """CLIP vision hidden size."""
    vision_layers: int = 3
    """CLIP vision encoder layers."""
    vision_heads: int = 4
    """CLIP vision attention heads."""
    vision_intermediate: int = 128
    """CLIP vision MLP width."""
    image_size: int = 32
    """Square crop the vision tower sees (pixels)."""
    patch_size: int = 8
    """Vision patch size (pixels)."""
    vision_feature_layer: int | list[int] = -2
    """Hidden state(s) of the vision tower fed to the projector (index into L+1 states)."""
    vision_feature_select_strategy: str = "default"
    """"default" drops the CLS position, "full" keeps it."""
    projector_act: str = "gelu"
    """Activation between the projector's two linears."""
    tie_word_embeddings: bool = False
    """Share lm_head with embed_tokens (then the head is not stored on disk)."""
    seed: int = 0
    """Seed for every random weight (the tokenizer does not depend on it)."""
    init_std: float = 0.1
    """Std of every weight matrix and embedding (HF default is 0.02)."""
    head_std: float = 0.5
    """Std of the output embedding (lm_head, or the shared embed_tokens when tied):
    logits of a few units, like a real LLM's."""
    head_row_spread: float = 1.0
    """Each output-embedding row is scaled by exp(N(0, spread)): a few tokens get
    large logits, which widens greedy top-1/top-2 gaps (at 0, a min gap over 64 steps
    of < 1e-2 is common; at 1.0 none was seen over 60 seed x variant pairs)."""
    norm_weight_range: tuple[float, float] = (0.5, 1.5)
    """Norm weights are uniform in this range, so a skipped norm changes the output."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise TinySpecError(f"tiny spec: {what}")

        for name in ("text_hidden", "text_layers", "text_heads", "text_kv_heads",
                     "text_intermediate", "vision_hidden", "vision_layers", "vision_heads",
                     "vision_intermediate", "image_size", "patch_size"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        need(self.text_hidden % self.text_heads == 0,
             f"text_hidden={self.text_hidden} is not divisible by text_heads={self.text_heads}")
        need(self.text_heads % self.text_kv_heads == 0,
             f"text_heads={self.text_heads} is not divisible by text_kv_heads={self.text_kv_heads}")
        need((self.text_hidden // self.text_heads) % 2 == 0,
             f"head dim {self.text_hidden // self.text_heads} must be even (rotary)")
        need(self.vision_hidden % self.vision_heads == 0,
             f"vision_hidden={self.vision_hidden} is not divisible by vision_heads={self.vision_heads}")
        need(self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        need(self.vision_feature_select_strategy in ("default", "full"),
             f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} "
             "must be 'default' or 'full'")
        need(self.model_class in MODEL_CLASSES, f"model_class={self.model_class!r} must be one of {MODEL_CLASSES}")
        need(self.model_class != "llava_next" or
             all(h % self.image_size == 0 and w % self.image_size == 0 for h, w in self.pinpoints),
             f"grid_pinpoints={self.grid_pinpoints} must be multiples of image_size={self.image_size}")
        need(self.text_model in TEXT_MODELS, f"text_model={self.text_model!r} must be one of {TEXT_MODELS}")
        need(self.vision_model in VISION_MODELS,
             f"vision_model={self.vision_model!r} must be one of {VISION_MODELS}")
        need(self.sliding_window is None or (self.text_model != "llama" and self.sliding_window > 0),
             f"sliding_window={self.sliding_window} needs text_model 'mistral' or 'qwen2' and > 0")
        need(self.vocab_size >= 256 + len(SPECIAL_TOKENS),
             f"vocab_size={self.vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet)")
        layers = self.feature_layers
        need(len(layers) > 0, "vision_feature_layer is an empty list")
        n_states = self.vision_layers + 1  # hidden_states: embeddings + one per layer
        for fl in layers:
            need(-n_states <= fl < n_states,
                 f"vision_feature_layer {fl} is out of range for {self.vision_layers} vision "
                 f"layers (valid: {-n_states}..{n_states - 1}, not 0)")
            # generate() in transformers 5.24 treats 0 as "no feature layer" and crashes.
            need(fl != 0, "vision_feature_layer 0 is not supported (HF generate crashes on it)")

    @property
    def pinpoints(self) -> list[list[int]]:
        """LLaVA-NeXT's image_grid_pinpoints: the given ones, or LLaVA-1.6's scaled to image_size."""
        S = self.image_size
        grid = self.grid_pinpoints or ((S, 2 * S), (2 * S, S), (2 * S, 2 * S), (3 * S, S), (S, 3 * S))
        return [list(p) for p in grid]

    @property
    def feature_layers(self) -> list[int]:
        fl = self.vision_feature_layer
        return list(fl) if isinstance(fl, (list, tuple)) else [fl]

    @property
    def image_tokens(self) -> int:
        """Tokens one image expands to, as the processor counts them (LLaVA-NeXT: the base
        tile's; the grid's depend on the image)."""
        patches = (self.image_size // self.patch_size) ** 2
        cls = 1 if self.vision_model == "clip" else 0  # "default" drops the first position, CLS or not
        return patches + cls - (1 if self.vision_feature_select_strategy == "default" else 0)

    def replace(self, **overrides: Any) -> "TinySpec":
        """A copy with some fields changed; unknown names raise TinySpecError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TinySpecError(f"tiny spec: unknown field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- tokenizer

# Small built-in corpus for BPE training: enough merges for a few hundred tokens that
# cover the sample prompts, so prompts are a handful of tokens, not bytes.
