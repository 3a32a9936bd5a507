"""Reference executor: every block in one process, in topological order; prefill then greedy decode.

It mirrors `LlavaForConditionalGeneration.generate(do_sample=False)` step for step
(positions, mask dropping, finished rows fed pad), so its tokens equal generate's and
its logits match bitwise for the same batch and threads. The distributed runtime is
tested against it and against generate itself.

Stop and pad ids come from the checkpoint's generation config, read as `from_pretrained`
reads it for `generate`: `generation_config.json` when the directory has one (every
Llama-3-based checkpoint lists two eos ids there, `[128001, 128009]`, while its
`config.json` names only the first), else derived from the model config
(`GenerationConfig.from_model_config`, which falls back to `text_config`). A
`generation_config.json` that names no eos id means no stop token, as in `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.model.config import PRESET_PREFIX
from partitioner.errors import ModelSourceError
from adaptlink.model.graph import block_ids

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
             generation_config: GenerationConfig | None = None) -> Generation:
    """Greedy generation over the block graph, as HF generate does it.

    Stop and pad ids: given, else `generation_config`'s (`load_generation_config`), else
    those derived from the model config."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos_ids(blocks.config, generation_config) if eos_token_ids is None else eos_token_ids
    pad = pad_id(blocks.config, generation_config) if pad_token_id is None else pad_token_id
    vision_ids, text_ids = split_blocks(blocks)

    x: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if pixel_values is not None:
        vis = blocks.run_many(vision_ids, {"pixel_values": pixel_values}, Step(position_ids=input_ids))
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
