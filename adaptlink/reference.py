"""Reference executor: every block in one process, in topological order; prefill then greedy decode.

It mirrors `LlavaForConditionalGeneration.generate(do_sample=False)` step for step
(positions, mask dropping, finished rows fed pad), so its tokens equal generate's and
its logits match bitwise for the same batch and threads. The distributed runtime is
tested against it and against generate itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptlink.blocks import LlavaBlocks, Step
from adaptlink.graph import block_ids


@dataclass
class Generation:
    tokens: torch.Tensor        # [B, n] generated ids only; rows that finished early hold pad
    logits: list[torch.Tensor]  # n tensors [B, V] float32, one per generated position


def eos_ids(config, generation_config=None) -> set[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = config.text_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def pad_id(config, generation_config=None) -> int:
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = config.pad_token_id if config.pad_token_id is not None else config.text_config.pad_token_id
    if pad is None:
        pad = min(eos_ids(config, generation_config) or {0})
    return int(pad)


def split_blocks(blocks: LlavaBlocks) -> tuple[list[str], list[str]]:
    """(vision side: vision.embed .. projector, text side: text.embed .. head)."""
    ids = block_ids(blocks.info)
    cut = ids.index("text.embed")
    return ids[:cut], ids[cut:]


@torch.inference_mode()
def generate(blocks: LlavaBlocks, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 16,
             eos_token_ids: set[int] | None = None, pad_token_id: int | None = None) -> Generation:
    """Greedy generation over the block graph, as HF generate does it."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos_ids(blocks.config) if eos_token_ids is None else eos_token_ids
    pad = pad_id(blocks.config) if pad_token_id is None else pad_token_id
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
