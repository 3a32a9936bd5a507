"""Reference executor: every block in one process, in topological order; prefill then greedy decode.

It mirrors `LlavaForConditionalGeneration.generate(do_sample=False)` step for step
(positions, mask dropping, finished rows fed pad), so its tokens equal generate's and
its logits match bitwise for the same batch and threads. The distributed runtime is
tested against it and against generate itself, which `hf_reference` runs: the
correctness oracle, whole-model `generate(do_sample=False)` one request at a time through
the checkpoint's own processor; `greedy_margin` measures how far its greedy choices are
from a tie.

Stop and pad ids come from the checkpoint's generation config, read as `from_pretrained`
reads it for `generate`: `generation_config.json` when the directory has one (every
Llama-3-based checkpoint lists two eos ids there, `[128001, 128009]`, while its
`config.json` names only the first), else derived from the model config
(`GenerationConfig.from_model_config`, which falls back to `text_config`). A
`generation_config.json` that names no eos id means no stop token, as in `generate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import (AutoConfig, AutoProcessor, GenerationConfig, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, ProcessorMixin)

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.model.config import PRESET_PREFIX
from adaptlink.model.graph import block_ids
from adaptlink.model.samples import open_image, read_requests, sample_requests
from partitioner.errors import ModelSourceError

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class Generation:
    tokens: torch.Tensor        # [B, n] generated ids only; rows that finished early hold pad
    logits: list[torch.Tensor]  # n tensors [B, V] float32, one per generated position


def load_generation_config(source: str | Path | None, config) -> GenerationConfig:
    """The generation config `generate` uses for `source` (a checkpoint directory or a preset).

    A preset (or None) has no file: the config derived from `config` is used."""
    path = None if source is None or str(source).startswith(PRESET_PREFIX) else Path(source) / GENERATION_CONFIG_FILE
    if path is not None and path.is_file():
        try:
            return GenerationConfig.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelSourceError(f"{path}: cannot be read as a generation config: {first}") from None
    return GenerationConfig.from_model_config(config)


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def eos_ids(config, generation_config: GenerationConfig | None = None) -> set[int]:
    """Every stop id of the generation config (an int or a list); default: derived from `config`."""
    gc = generation_config if generation_config is not None else GenerationConfig.from_model_config(config)
    return set(_id_list(gc.eos_token_id))


def pad_id(config, generation_config: GenerationConfig | None = None) -> int:
    """The pad id generate feeds finished rows: the generation config's, else its first eos id."""
    gc = generation_config if generation_config is not None else GenerationConfig.from_model_config(config)
    pad = gc.pad_token_id
    return int(pad) if pad is not None else (_id_list(gc.eos_token_id) or [0])[0]


def split_blocks(blocks: LlavaBlocks) -> tuple[list[str], list[str]]:
    """(vision side: vision.embed .. projector, text side: text.embed .. head)."""
    ids = block_ids(blocks.info)
    cut = ids.index("text.embed")
    return ids[:cut], ids[cut:]


@torch.inference_mode()
def generate(blocks: LlavaBlocks, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 16,
             eos_token_ids: set[int] | None = None, pad_token_id: int | None = None,
             generation_config: GenerationConfig | None = None,
             image_sizes: torch.Tensor | None = None) -> Generation:
    """Greedy generation over the block graph, as HF generate does it (`image_sizes`: LLaVA-NeXT's,
    as its processor returns them).

    Stop and pad ids: given, else `generation_config`'s (`load_generation_config`), else
    those derived from the model config."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos_ids(blocks.config, generation_config) if eos_token_ids is None else eos_token_ids
    pad = pad_id(blocks.config, generation_config) if pad_token_id is None else pad_token_id
    vision_ids, text_ids = split_blocks(blocks)

    x: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if pixel_values is not None:
        pix = {"pixel_values": pixel_values}
        if image_sizes is not None:
            pix["image_sizes"] = image_sizes
        vis = blocks.run_many(vision_ids, pix, Step(position_ids=input_ids))
        x["image_features"] = vis["image_features"]
    step = Step.prefill(attention_mask, cache=blocks.new_cache())
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        out = blocks.run_many(text_ids, x, step)
        tok = torch.where(unfinished, out["token"], torch.full_like(out["token"], pad))
        tokens.append(tok)
        logits.append(out["logits"])
        unfinished &= ~torch.isin(tok, torch.tensor(sorted(eos), dtype=tok.dtype)) if eos else unfinished
        if not unfinished.any():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        step = step.next(attention_mask)
        x = {"input_ids": tok[:, None]}
    return Generation(torch.stack(tokens, dim=1), logits)


# ----------------------------------------------------------------------------- HF's own generate

def load_reference(ckpt_dir: str | os.PathLike) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """Model (float32, eval) and processor from a local checkpoint directory, offline."""
    kind = AutoConfig.from_pretrained(ckpt_dir, local_files_only=True).model_type
    cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    model = cls.from_pretrained(ckpt_dir, dtype="float32", local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(ckpt_dir, local_files_only=True)
    return model, processor


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
    model, processor = load_reference(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    if isinstance(requests, (str, os.PathLike)):
        requests = read_requests(requests)
    tokens, logits = [], []
    for req in requests:
        n_new = max_new_tokens if max_new_tokens is not None else req.get("max_new_tokens", 16)
        inputs = processor(images=[open_image(req["image"])], text=[req["prompt"]],
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
