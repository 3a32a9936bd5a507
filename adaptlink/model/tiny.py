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
make-up (docs/LLAVA.md, "How exact is exact"). Here every weight is drawn with a
larger std and the norm weights are randomised; `greedy_margin` measures the smallest
top-1/top-2 logit gap so tests can assert it stays comfortable.

Sample requests are in `adaptlink.model.samples`; the correctness oracle `hf_reference`
(whole-model `generate`, one request at a time) and `greedy_margin` in
`adaptlink.model.reference`; the `make-tiny` command in `adaptlink.tiny_cli`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from adaptlink.model.tiny_spec import IMAGE_TOKEN, SPEC_FILE, SPECIAL_TOKENS, TinySpec, TinySpecError

log = logging.getLogger(__name__)

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

    # CLIPImageProcessor needs torchvision; the PIL backend computes the same thing.
    # SigLIP's (llava-interleave) resizes to the square, no crop.
    if spec.model_class == "llava_next":  # anyres: the base image plus the tiles of the best grid
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
            image_grid_pinpoints=spec.pinpoints,
        )
    elif spec.vision_model == "siglip":
        image_processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
        )
    processor_cls = LlavaNextProcessor if spec.model_class == "llava_next" else LlavaProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.vocab_size),
        patch_size=spec.patch_size,
        num_additional_image_tokens=1 if spec.vision_model == "clip" else 0,  # the CLS position
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

    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_cls, extra = {"llama": (LlamaConfig, {}), "mistral": (MistralConfig, {}),
                       "qwen2": (Qwen2Config, {})}[spec.text_model]
    if spec.text_model == "mistral":
        extra = dict(sliding_window=spec.sliding_window)
    elif spec.text_model == "qwen2" and spec.sliding_window is not None:
        extra = dict(use_sliding_window=True, sliding_window=spec.sliding_window,
                     max_window_layers=spec.max_window_layers)
    text = text_cls(
        **extra,
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
    vision_sizes = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if spec.vision_model == "siglip":  # llava-interleave's tower: no pooling head
        vision = SiglipVisionConfig(**vision_sizes, vision_use_head=False)
    else:
        vision = CLIPVisionConfig(**vision_sizes, projection_dim=spec.vision_hidden,
                                  initializer_range=spec.init_std)
    fl = spec.vision_feature_layer
    extra = {}
    if spec.model_class == "llava_next":
        extra = dict(image_grid_pinpoints=spec.pinpoints)
    cfg = (LlavaNextConfig if spec.model_class == "llava_next" else LlavaConfig)(
        **extra,
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

    with torch.random.fork_rng(devices=[]):  # HF's own init draws from the global RNG
        torch.manual_seed(spec.seed)
        cls = LlavaNextForConditionalGeneration if spec.model_class == "llava_next" else LlavaForConditionalGeneration
        model = cls(config)
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
    if d.get("grid_pinpoints") is not None:
        d["grid_pinpoints"] = tuple(tuple(p) for p in d["grid_pinpoints"])
    return TinySpec(**d)

