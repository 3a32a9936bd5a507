"""Tiny random-weight LLaVA checkpoints, built fully offline, and the HF reference run.

Tests and the demo need a real `LlavaForConditionalGeneration` checkpoint directory
(model + tokenizer + image processor) without touching the hub. `make_tiny` builds one
in well under a second:

    adaptlink make-tiny /tmp/tiny --seed 0 --requests 4
    HF_HUB_OFFLINE=1 python -c "from transformers import AutoProcessor, \\
        LlavaForConditionalGeneration as L; AutoProcessor.from_pretrained('/tmp/tiny'); \\
        L.from_pretrained('/tmp/tiny')"

Random tiny models at HF's default init give near-tied greedy steps and repetitive
tokens, so outputs flip under the ~1e-5 logit noise of another thread count or batch
make-up (LLAVA_FACTS.md, "How exact is exact"). Here every weight is drawn with a
larger std and the norm weights are randomised; `greedy_margin` measures the smallest
top-1/top-2 logit gap so tests can assert it stays comfortable.

`hf_reference` is the correctness oracle: whole-model `generate(do_sample=False)`, one
request at a time, through the checkpoint's own processor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from partitioner.errors import AdaptLinkError

if TYPE_CHECKING:  # heavy imports stay inside functions: `adaptlink --help` stays fast
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]  # ids 0..4 in this order
SPEC_FILE = "adaptlink_tiny.json"  # the TinySpec a directory was built from
REQUESTS_FILE = "prompts.jsonl"


class TinySpecError(AdaptLinkError):
    """A tiny-model spec whose sizes do not fit together."""


@dataclass(kw_only=True, slots=True)
class TinySpec:
    """Sizes and init of a tiny random LLaVA. Defaults: ~0.5M params, 16 image tokens."""

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
    def feature_layers(self) -> list[int]:
        fl = self.vision_feature_layer
        return list(fl) if isinstance(fl, (list, tuple)) else [fl]

    @property
    def image_tokens(self) -> int:
        """Tokens one image expands to, as the processor counts them."""
        patches = (self.image_size // self.patch_size) ** 2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

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
_CORPUS = """\
USER: What is shown in this image? ASSISTANT: The image shows a cat sitting on a red mat.
USER: Describe the picture in detail. ASSISTANT: There is a small dog next to a blue car.
USER: What colour is the sky? ASSISTANT: The sky is blue with a few white clouds.
USER: How many people are in the photo? ASSISTANT: There are three people standing together.
Caption: a bowl of fruit on a wooden table, with apples, oranges and a banana.
Question: what is the man holding? Answer: he is holding an umbrella in the rain.
A photo of a street at night with cars, lights and tall buildings.
The quick brown fox jumps over the lazy dog near the river bank.
Describe the colours, shapes and textures you can see, and anything unusual.
Is there any text in the image? If so, read it out loud. Answer briefly.
A green field under a grey sky; a train crosses a bridge in the distance.
Stripes, squares, circles and gradients: red, green, blue, yellow, black and white.
Write a short story about what happens next in this scene.
What is the object in the centre of the picture, and what is it used for?
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast`, trained in-process (no downloads).

    Ids 0..4 are `<unk> <s> </s> <pad> <image>`; encoding adds `<s>`; padding is left.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 2, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


# ----------------------------------------------------------------------------- model


def build_processor(spec: TinySpec) -> "LlavaProcessor":
    """Tokenizer + PIL CLIP image processor + LlavaProcessor consistent with `spec`."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # CLIPImageProcessor needs torchvision; the PIL backend computes the same thing.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.vocab_size),
        patch_size=spec.patch_size,
        num_additional_image_tokens=1,  # the CLS position
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        chat_template=_CHAT_TEMPLATE,
    )


# LLaVA-1.5 style: "USER: <image>\n{text} ASSISTANT:" (images first within a turn).
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_config(spec: TinySpec, tokenizer) -> Any:
    """A `LlavaConfig` whose ids and sizes agree with `tokenizer` and `spec`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_word_embeddings,
        **ids,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        initializer_range=spec.init_std,
    )
    fl = spec.vision_feature_layer
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=spec.image_tokens,  # informational; the processor decides
        projector_hidden_act=spec.projector_act,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        vision_feature_layer=list(fl) if isinstance(fl, (list, tuple)) else fl,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    for k, v in ids.items():  # top-level copies: generate() reads them from here too
        setattr(cfg, k, v)
    return cfg


def _is_norm(name: str) -> bool:
    # RMSNorm (input_layernorm, post_attention_layernorm, norm) and CLIP LayerNorms
    # (layer_norm1/2, pre_layrnorm, post_layernorm).
    leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
    return "norm" in leaf or "layrnorm" in leaf


def randomize_weights(model, spec: TinySpec) -> None:
    """Redraw every parameter from a generator seeded by `spec.seed` (buffers untouched).

    Matrices/embeddings ~ N(0, init_std), lm_head (tied or not) ~ N(0, head_std), norm weights
    ~ U(norm_weight_range), biases ~ N(0, init_std); then the rows of the output
    embedding (lm_head, or embed_tokens when tied) are scaled by exp(N(0,
    head_row_spread)). Independent of HF's init code, so the same spec gives the same
    weights across transformers versions.
    """
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    lo, hi = spec.norm_weight_range
    head = model.get_output_embeddings().weight
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if _is_norm(name) and name.endswith("weight"):
                new = torch.empty(p.shape).uniform_(lo, hi, generator=gen)
            elif p is head:  # also embed_tokens when tied
                new = torch.empty(p.shape).normal_(0.0, spec.head_std, generator=gen)
            else:
                new = torch.empty(p.shape).normal_(0.0, spec.init_std, generator=gen)
            p.copy_(new)
        if spec.head_row_spread:
            head.mul_(torch.randn(head.shape[0], 1, generator=gen).mul_(spec.head_row_spread).exp_())


def build_model(spec: TinySpec, config) -> "LlavaForConditionalGeneration":
    """The model in float32, eval mode, with `randomize_weights` applied."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # HF's own init draws from the global RNG
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    randomize_weights(model, spec)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.do_sample = False
    return model.float().eval()


def build_tiny(spec: TinySpec | None = None, **overrides: Any
               ) -> tuple["LlavaForConditionalGeneration", "LlavaProcessor"]:
    """The model (float32, eval) and processor of `spec`, in memory, nothing saved."""
    spec = (spec or TinySpec()).replace(**overrides)
    processor = build_processor(spec)
    model = build_model(spec, build_config(spec, processor.tokenizer))
    return model, processor


def make_tiny(out_dir: str | os.PathLike, spec: TinySpec | None = None, **overrides: Any) -> Path:
    """Build a tiny random LLaVA and save model + processor into `out_dir`.

    `overrides` replace fields of `spec` (default `TinySpec()`), e.g.
    `make_tiny(d, text_kv_heads=4, vision_feature_layer=[-2, -1])`. The directory also
    gets `adaptlink_tiny.json` (the spec). Returns the directory.
    """
    return _save_tiny(out_dir, (spec or TinySpec()).replace(**overrides))[0]


def _save_tiny(out_dir, spec: TinySpec):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(spec)
    model.save_pretrained(out)  # safetensors by default
    processor.save_pretrained(out)
    (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    log.info("tiny LLaVA in %s: %d params, vocab %d, %d image tokens per image",
             out, count_params(model), model.config.text_config.vocab_size, spec.image_tokens)
    return out, model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def read_spec(ckpt_dir: str | os.PathLike) -> TinySpec:
    """The TinySpec `make_tiny` recorded in `ckpt_dir`."""
    path = Path(ckpt_dir) / SPEC_FILE
    if not path.is_file():
        raise TinySpecError(f"{ckpt_dir}: no {SPEC_FILE} (not made by `adaptlink make-tiny`)")
    d = json.loads(path.read_text())
    d["norm_weight_range"] = tuple(d["norm_weight_range"])
    return TinySpec(**d)


# ----------------------------------------------------------------------------- inputs

# Prompts of clearly different lengths; each holds exactly one <image>.
_PROMPTS = [
    "USER: <image>\nWhat is this? ASSISTANT:",
    "<image>\nCaption:",
    "USER: <image>\nDescribe the picture in detail, including the colours, shapes and "
    "anything unusual. ASSISTANT:",
    "USER: Look at this: <image>\nHow many people are in the photo? ASSISTANT:",
    "Question: what is the object in the centre of <image> used for? Answer:",
    "USER: <image>\nWrite a short story about what happens next in this scene, and say "
    "whether it is day or night. ASSISTANT:",
]


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts, each with one `<image>`, lengths varying (cycles a fixed list)."""
    order = list(range(len(_PROMPTS)))
    random.Random(seed).shuffle(order)
    return [_PROMPTS[order[i % len(order)]] for i in range(n)]


def sample_images(n: int, size: int | tuple[int, int] = (48, 40), seed: int = 0) -> list["Image.Image"]:
    """`n` distinct RGB images (width, height = `size`): gradients, stripes, checks, noise."""
    import numpy as np
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for i in range(n):
        kind = i % 4
        c = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)  # two colours
        if kind == 0:    # diagonal gradient between the two colours
            t = ((xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2)[..., None]
        elif kind == 1:  # stripes at a random period and angle
            period, ang = rng.uniform(3, 12), rng.uniform(0, np.pi)
            t = (np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period) > 0)[..., None]
        elif kind == 2:  # checkerboard
            k = int(rng.integers(2, 9))
            t = (((xx // k) + (yy // k)) % 2)[..., None]
        else:            # noise
            t = rng.uniform(0, 1, size=(h, w, 1))
        arr = c[0] * (1 - t) + c[1] * t + rng.normal(0, 8, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return images


def sample_requests(n: int = 4, seed: int = 0, max_new_tokens: int = 16) -> list[dict]:
    """In-memory requests `{"id", "prompt", "image": PIL.Image, "max_new_tokens"}`."""
    return [
        {"id": f"r{i}", "prompt": p, "image": img, "max_new_tokens": max_new_tokens}
        for i, (p, img) in enumerate(zip(sample_prompts(n, seed), sample_images(n, seed=seed)))
    ]


def write_sample_requests(out_dir: str | os.PathLike, n: int = 4, seed: int = 0,
                          max_new_tokens: int = 16) -> Path:
    """Write `n` PNGs and `prompts.jsonl` (DESIGN.md format) into `out_dir`; return the jsonl.

    `image` fields are absolute paths; `read_requests` also accepts paths relative to
    the jsonl's directory.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for req in sample_requests(n, seed, max_new_tokens):
        png = out / f"{req['id']}.png"
        req["image"].save(png)
        lines.append(json.dumps({"id": req["id"], "prompt": req["prompt"], "image": str(png),
                                 "max_new_tokens": req["max_new_tokens"]}))
    path = out / REQUESTS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def read_requests(path: str | os.PathLike) -> list[dict]:
    """Requests from a `prompts.jsonl`; relative image paths are resolved against its dir."""
    path = Path(path)
    reqs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            missing = [k for k in ("id", "prompt", "image") if k not in req]
        except json.JSONDecodeError as e:
            raise AdaptLinkError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if missing:
            raise AdaptLinkError(f"{path}:{lineno}: missing field(s) {missing}")
        img = Path(req["image"])
        req["image"] = str(img if img.is_absolute() else path.parent / img)
        reqs.append(req)
    return reqs


# ----------------------------------------------------------------------------- reference


def load_reference(ckpt_dir: str | os.PathLike) -> tuple["LlavaForConditionalGeneration", "LlavaProcessor"]:
    """Model (float32, eval) and processor from a local checkpoint directory, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        ckpt_dir, dtype="float32", local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(ckpt_dir, local_files_only=True)
    return model, processor


def _open_image(image) -> "Image.Image":
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def hf_reference(
    ckpt: str | os.PathLike | tuple,
    requests: str | os.PathLike | Sequence[dict],
    max_new_tokens: int | None = None,
    *,
    output_logits: bool = False,
):
    """Whole-model greedy `generate`, one request at a time: the correctness oracle.

    `ckpt`: a checkpoint dir or a `(model, processor)` pair from `load_reference`.
    `requests`: a `prompts.jsonl` path or dicts with "prompt", "image" (path or PIL
    image) and optionally "max_new_tokens" (used when `max_new_tokens` is None; else 16).
    Returns the generated token ids per request (prompt excluded; stops at eos), or
    `(tokens, logits)` with `output_logits=True`, logits a float32 tensor
    `[steps, vocab]` per request (raw, before any logits processor).
    """
    import torch

    model, processor = load_reference(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    if isinstance(requests, (str, os.PathLike)):
        requests = read_requests(requests)
    tokens, logits = [], []
    for req in requests:
        n_new = max_new_tokens if max_new_tokens is not None else req.get("max_new_tokens", 16)
        inputs = processor(images=[_open_image(req["image"])], text=[req["prompt"]],
                           return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=n_new,
                                 return_dict_in_generate=True, output_logits=output_logits)
        tokens.append(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        if output_logits:
            logits.append(torch.cat(out.logits, dim=0).float())
    return (tokens, logits) if output_logits else tokens


@dataclass(frozen=True)
class GreedyMargin:
    """How safe greedy decoding of a model is against small logit noise."""

    min_gap: float
    """Smallest top-1 minus top-2 logit over all greedy steps of all requests."""
    median_gap: float
    logit_std: float
    """Typical logit spread, to compare `min_gap` with (noise scales with it)."""
    tokens: list[list[int]] = field(repr=False)
    distinct_tokens: int
    """Distinct token ids generated over all requests (1 means a degenerate model)."""
    steps: int


def greedy_margin(
    ckpt: str | os.PathLike | tuple,
    requests: str | os.PathLike | Sequence[dict] | None = None,
    max_new_tokens: int = 16,
) -> GreedyMargin:
    """Measure the greedy top-1/top-2 logit gaps of `hf_reference` over `requests`.

    Default requests: `sample_requests(4)`.
    """
    import torch

    if requests is None:
        requests = sample_requests(4, max_new_tokens=max_new_tokens)
    tokens, logits = hf_reference(ckpt, requests, max_new_tokens, output_logits=True)
    all_logits = torch.cat(logits, dim=0)  # [steps, vocab]
    top2 = all_logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    return GreedyMargin(
        min_gap=gaps.min().item(),
        median_gap=gaps.median().item(),
        logit_std=all_logits.std(dim=-1).mean().item(),
        tokens=tokens,
        distinct_tokens=len({t for seq in tokens for t in seq}),
        steps=int(gaps.numel()),
    )


# ----------------------------------------------------------------------------- CLI


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
    p.add_argument("--requests", type=int, default=0, metavar="N",
                   help="also write N sample requests to DIR/requests/prompts.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=16, help="for the sample requests")
    p.set_defaults(func=_cmd_make_tiny)


def _cmd_make_tiny(args) -> int:
    from rich.console import Console
    from rich.table import Table

    spec = TinySpec(
        seed=args.seed, text_layers=args.text_layers, text_hidden=args.text_hidden,
        text_heads=args.text_heads, text_kv_heads=args.kv_heads,
        vision_layers=args.vision_layers, vision_feature_layer=args.feature_layer,
        vision_feature_select_strategy=args.strategy, tie_word_embeddings=args.tie,
    )
    out, model = _save_tiny(args.dir, spec)
    n_params = count_params(model)
    cfg = model.config
    t = Table(title=f"tiny LLaVA -> {out}", show_header=False)
    t.add_row("parameters", f"{n_params:,}" + (" (lm_head tied)" if spec.tie_word_embeddings else ""))
    t.add_row("vocab", str(cfg.text_config.vocab_size))
    t.add_row("image token id", str(cfg.image_token_index))
    t.add_row("image tokens per image", str(spec.image_tokens))
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

