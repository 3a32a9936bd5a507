"""Executable blocks: the HF model's own submodules, materialised only for the blocks asked for.

`LlavaBlocks.load(source, ["decoder.layer.3", ...])` builds the whole model on the meta
device (no memory), materialises just the submodules of those blocks, and fills them
from the checkpoint's safetensors (reading only their tensors) or, for a preset, with
random weights seeded per block so every process that builds a block gets the same one.

Every block has one call: `blocks.run(block_id, inputs, step) -> outputs`, where inputs
and outputs are dicts of named tensors (what crosses an edge of the graph) and `step`
carries what the request's position in the sequence implies (positions, 2D mask, cache).

Tensors between blocks (B requests in a batch, q tokens this step):
    pixel_values   [n_img, 3, H, W]                  -> vision.embed (NeXT: [n_tiles, 3, S, S] or
                                                     [n_img, max_tiles, 3, S, S], with image_sizes)
    image_sizes    [n_img, 2] (height, width)        NeXT only: carried along the vision chain
    vision_hidden  [n_img, (1+)patches, Dv]          running hidden state of the vision tower
                                                     (NeXT: one row per tile; SigLIP: no CLS)
    vision_feat.k  [n_img, (1+)patches, Dv]          hidden_states[k], kept when LLaVA picks it
    image_features [sum of image tokens, Dt]         projector output (NeXT: packed per image)
    input_ids      [B, q]                            -> text.embed (passed on to merge)
    inputs_embeds  [B, q, Dt]                        text.embed output
    hidden         [B, q, Dt]                        merge and decoder layer outputs
    logits         [B, V] float32, token [B]          head output (last position only)

`blocks.run_batch(block_ids, mb, x, kv)` runs a micro-batch of several requests instead
(adaptlink/model/microbatch.py has its tensors: packed `[1, T, ...]`, one logits row per
request), with the stage's per-request KV store (adaptlink/model/kv.py).

Length: ~560 lines, over the house style's ~500: one runner per block kind, for one
request (`run`) and for a micro-batch (`run_batch`), beside the weight loading they need;
the KV store and the packed attention are apart (kv.py, microbatch.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from adaptlink.model.config import PRESET_PREFIX, ModelInfo, load_config
from adaptlink.model.graph import (
    NEWLINE_MODULE,
    attach_newline,
    block_ids as all_block_ids,
    block_index,
    block_kind,
    meta_model,
    module_names,
)
from adaptlink.model.kv import GrowingKVStore, KVStore, SlotKVStore, kv_shape
from adaptlink.model.microbatch import BATCH_KWARG, MicroBatch, PackedBatch, use_packed_attention
from partitioner.errors import ModelSourceError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# On-disk names (save_pretrained / llava-hf hub layout) -> names in memory (transformers 5).
_DISK_TO_MEMORY = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^(model\.)?image_newline$"), f"{NEWLINE_MODULE}.weight"),  # LLaVA-NeXT (graph.attach_newline)
]


def memory_name(disk_name: str) -> str:
    for pattern, repl in _DISK_TO_MEMORY:
        if pattern.match(disk_name):
            return pattern.sub(repl, disk_name, count=1)
    return disk_name


@dataclass
class Step:
    """What the blocks of one batch of requests see at one step, besides the tensors flowing in."""

    position_ids: torch.Tensor                 # [B, q]
    attention_mask: torch.Tensor | None = None  # [B, past + q], None when all ones (generate drops it)
    cache: object | None = None                # this batch's KV cache on this holder (see new_cache)
    memo: dict = field(default_factory=dict)   # rope and mask, computed once per step per holder

    @classmethod
    def prefill(cls, attention_mask: torch.Tensor, cache=None) -> "Step":
        """Positions as generate computes them for a (left-padded) prompt."""
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return cls(pos, None if bool(attention_mask.all()) else attention_mask, cache)

    def next(self, attention_mask: torch.Tensor) -> "Step":
        """The following one-token decode step (attention_mask already grown by one column)."""
        pos = self.position_ids[:, -1:] + 1
        return Step(pos, None if bool(attention_mask.all()) else attention_mask, self.cache)


def _seed_for(seed: int, block_id: str) -> int:
    digest = hashlib.sha256(f"{seed}/{block_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LlavaBlocks:
    """The executable blocks of one LLaVA model held by one process (a subset of the graph)."""

    def __init__(self, config, model: nn.Module, block_ids: list[str], *, dtype: str, device: str | torch.device):
        self.config = config
        self.info = ModelInfo.from_config(config)
        self.model = model  # meta except for the held blocks' modules
        self.dtype = TORCH_DTYPES[dtype]
        self.device = torch.device(device)
        known = set(all_block_ids(self.info))
        unknown = [b for b in block_ids if b not in known]
        if unknown:
            raise ValueError(f"blocks {unknown} are not blocks of this model")
        self.block_ids = [b for b in all_block_ids(self.info) if b in set(block_ids)]
        lm = model.model.language_model
        self._rotary = None
        if any(block_kind(b) == "decoder_layer" for b in self.block_ids):
            self._rotary = type(lm.rotary_emb)(config=config.text_config).to(self.device)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, source: str, block_ids: list[str], *, dtype: str = "float32",
             device: str | torch.device = "cpu", seed: int = 0, config=None) -> "LlavaBlocks":
        """Materialise `block_ids` of `source`: from its safetensors, or seeded random for a preset."""
        config = config if config is not None else load_config(source)
        model = meta_model(config)
        _materialize(model, config, source, block_ids, TORCH_DTYPES[dtype], device, seed)
        return cls(config, model, block_ids, dtype=dtype, device=device)

    def add(self, source: str, block_ids: list[str], seed: int = 0) -> list[str]:
        """Materialise more blocks into this holder (cold recovery); returns the ones newly loaded."""
        new = [b for b in block_ids if b not in self.block_ids]
        _materialize(self.model, self.config, source, new, self.dtype, self.device, seed)
        self.__init__(self.config, self.model, self.block_ids + new,
                      dtype={v: k for k, v in TORCH_DTYPES.items()}[self.dtype], device=self.device)
        return new

    @classmethod
    def from_model(cls, model: nn.Module, block_ids: list[str] | None = None) -> "LlavaBlocks":
        """Blocks that share the modules of an in-memory HF model (all blocks by default)."""
        attach_newline(model)
        config = model.config
        p = next(model.parameters())
        dtype = {v: k for k, v in TORCH_DTYPES.items()}[p.dtype]
        ids = block_ids if block_ids is not None else all_block_ids(ModelInfo.from_config(config))
        return cls(config, model, ids, dtype=dtype, device=p.device)

    def param_bytes(self, block_ids: list[str] | None = None) -> int:
        """Bytes of the parameters of `block_ids` (default: all this holder materialised; a
        tied weight counted once)."""
        seen = {}
        for b in self.block_ids if block_ids is None else block_ids:
            for n in module_names(b, self.info):
                for p in self.model.get_submodule(n).parameters():
                    seen[id(p)] = p.numel() * p.element_size()
        return sum(seen.values())

    def new_cache(self):
        """A per-request (or per-batch) KV cache for the decoder layers this holder runs.

        A layer per decoder layer, so that each writes its own global slot; layers never
        used stay empty. Masks are built with `layer_idx`, never from slot 0 (docs/LLAVA.md).
        A sliding-window layer keeps only its window, as the cache of HF's `generate` does.
        """
        return Cache(layers=[DynamicLayer() if self.info.window(i) is None else
                             DynamicSlidingWindowLayer(sliding_window=self.info.window(i))
                             for i in range(self.info.text_layers)])

    # ---- execution ----------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, block_id: str, x: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        kind = block_kind(block_id)
        if block_id not in self.block_ids:
            raise KeyError(f"block {block_id} is not held by this process")
        return getattr(self, f"_run_{kind}")(block_index(block_id), x, step)

    def run_many(self, ids: list[str], x: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        """Run blocks in the order given, each reading what the earlier ones (or `x`) produced."""
        state = dict(x)
        for b in ids:
            state.update(self.run(b, state, step))
        return state

    def _vision(self):
        return self.model.model.vision_tower

    def tiles(self, image_sizes: torch.Tensor) -> list[int]:
        """LLaVA-NeXT: tiles per image (the base + its grid) for `image_sizes [n_img, 2]` (height, width)."""
        return [image_size_to_num_patches(image_size=[int(v) for v in hw], patch_size=self.info.tile_size,
                                          grid_pinpoints=[list(p) for p in self.info.grid_pinpoints])
                for hw in image_sizes]

    def _run_vision_embed(self, _, x, step):
        vt = self._vision()
        pv, carried = x["pixel_values"], {}
        if self.info.next:
            # every image's tiles in one batch: [n_img, max_tiles, 3, S, S] padded (the processor's
            # batch) or [sum tiles, 3, S, S] already flat; image_sizes travel on to the projector
            sizes = x.get("image_sizes")
            if sizes is None:
                raise ValueError("LLaVA-NeXT pixel_values need their image_sizes [n_img, 2]")
            if pv.dim() == 5:
                pv = torch.cat([p[:n] for p, n in zip(pv, self.tiles(sizes))])
            carried["image_sizes"] = sizes
        h = vt.embeddings(pv.to(self.device, self.dtype))
        if self.info.class_token:  # CLIP: hidden_states[0] is after pre_layrnorm; SigLIP has none
            h = vt.pre_layrnorm(h)
        return self._vision_out(0, h, carried)

    def _run_vision_layer(self, i, x, step):
        h = self._vision().encoder.layers[i](x["vision_hidden"], None)
        carried = {k: v for k, v in x.items() if k.startswith("vision_feat.") or k == "image_sizes"}
        return self._vision_out(i + 1, h, carried)

    def _vision_out(self, k: int, h, carried: dict) -> dict:
        """After hidden_states[k]: keep it if picked; drop the running state after the last used layer."""
        out = dict(carried)
        if k in self.info.feature_picks:
            out[f"vision_feat.{k}"] = h
        if k < self.info.vision_layers_used:
            out["vision_hidden"] = h
        return out

    def _run_projector(self, _, x, step):
        feats = [x[f"vision_feat.{k}"] for k in self.info.feature_picks]
        if self.info.strategy == "default":
            feats = [f[:, 1:] for f in feats]  # drop CLS
        image = self.model.model.multi_modal_projector(torch.cat(feats, dim=-1))
        if self.info.next:  # HF's own packing: per image the base tile, then the unpadded grid + newlines
            sizes = x["image_sizes"]
            per_image = list(torch.split(image, self.tiles(sizes), dim=0))
            packed, _ = self.model.model.pack_image_features(
                per_image, sizes, self.info.strategy,
                image_newline=self.model.get_submodule(NEWLINE_MODULE).weight)
            return {"image_features": torch.cat(packed, dim=0)}
        return {"image_features": image.reshape(-1, image.shape[-1])}

    def _run_text_embed(self, _, x, step):
        ids = x["input_ids"].to(self.device)
        return {"inputs_embeds": self.model.model.language_model.embed_tokens(ids), "input_ids": ids}

    def _run_merge(self, _, x, step):
        emb = x["inputs_embeds"]
        if "image_features" not in x:  # decode, or a text-only request: nothing to merge
            return {"hidden": emb}
        feats = x["image_features"].to(emb.device, emb.dtype)
        mask = x["input_ids"] == self.info.image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"image features and image tokens do not match: {int(mask.sum())} <image> tokens "
                f"in the prompt, {feats.shape[0]} image feature rows "
                f"({self.info.image_tokens} per image)")
        return {"hidden": emb.masked_scatter(mask[..., None], feats)}

    def _run_decoder_layer(self, i, x, step):
        h = x["hidden"]
        if "rope" not in step.memo:
            step.memo["rope"] = self._rotary(h, step.position_ids.to(self.device))
        window = self.info.window(i)
        key = ("mask", window)  # one mask per attention type (Qwen2 mixes full and sliding layers)
        if key not in step.memo:  # before this holder's layers update the cache
            make = create_causal_mask if window is None else create_sliding_window_causal_mask
            step.memo[key] = make(
                config=self.config.text_config, inputs_embeds=h, attention_mask=step.attention_mask,
                cache=step.cache, position_ids=step.position_ids, layer_idx=i)
        layer = self.model.model.language_model.layers[i]
        h = layer(h, attention_mask=step.memo[key], position_ids=step.position_ids,
                  cache=step.cache, use_cache=step.cache is not None, position_embeddings=step.memo["rope"])
        return {"hidden": h}

    def _run_head(self, _, x, step):
        lm = self.model.model.language_model
        logits = self.model.lm_head(lm.norm(x["hidden"][:, -1:])).float()[:, -1]  # [B, V]
        return {"logits": logits, "token": logits.argmax(-1)}


    # ---- micro-batches (docs/BATCHING.md) -----------------------------------------------

    @torch.inference_mode()
    def run_batch(self, block_ids: list[str], mb: MicroBatch, x: dict[str, torch.Tensor],
                  kv: KVStore | None = None, *, produced: bool = False) -> dict[str, torch.Tensor]:
        """Run blocks in the order given over the packed micro-batch `mb`; returns the state
        (`x` updated with every block's outputs, as `run_many` does), or with `produced` only
        what the last block put out (what a stage sends on to the next).

        `kv` holds the stage's KV (needed when a decoder layer is among `block_ids`): every
        row is checked (pos == the tokens held) and given room before anything runs, and the
        rows' new tokens are committed only when every block has run (rolled back on error),
        so a refused micro-batch leaves the store as it was. Vision blocks and the projector
        pass a micro-batch without images through untouched."""
        unheld = [b for b in block_ids if b not in self.block_ids]
        if unheld:
            raise KeyError(f"blocks {unheld} are not held by this process")
        layers = [block_index(b) for b in block_ids if block_kind(b) == "decoder_layer"]
        if layers:
            if kv is None:
                raise ValueError("a micro-batch through decoder layers needs the stage's KV store")
            missing = sorted(set(layers) - set(kv.layers))
            if missing:
                raise ValueError(f"decoder layers {missing} have no KV in this store (layers {list(kv.layers)})")
            kv.begin_batch(mb.rows)
        state, memo, out = dict(x), {}, {}
        try:
            for b in block_ids:
                out = getattr(self, f"_batch_{block_kind(b)}")(block_index(b), state, mb, kv, memo)
                state.update(out)
        except BaseException:
            if layers:
                kv.rollback_batch(mb.rows)
            raise
        if layers:
            kv.commit_batch(mb.rows)
        return out if produced else state

    def kv_shape(self) -> tuple[int, int]:
        """(kv heads, head dim) of the text model: a token's KV per layer is 2 x their product."""
        return kv_shape(self.config.text_config)

    def new_kv_store(self, budget_bytes: int | None = None, *, slots: int | None = None,
                     max_tokens: int | None = None, layers: list[int] | None = None) -> KVStore:
        """A KV store for the decoder layers this holder runs (global indices; `layers`: only
        those), in its dtype/device: growing per request under `budget_bytes`, or with `slots`
        (and `max_tokens` per slot) a preallocated slot cache."""
        if layers is None:
            layers = [block_index(b) for b in self.block_ids if block_kind(b) == "decoder_layer"]
        tc = self.config.text_config
        if slots is not None:
            if budget_bytes is not None or max_tokens is None:
                raise ValueError("a slot cache takes slots and max_tokens, not a byte budget")
            return SlotKVStore.for_config(tc, layers, slots=slots, max_tokens=max_tokens,
                                          dtype=self.dtype, device=self.device)
        return GrowingKVStore.for_config(tc, layers, dtype=self.dtype, device=self.device, budget_bytes=budget_bytes)

    def _batch_vision_embed(self, i, x, mb, kv, memo):
        n = len(mb.image_rows)
        if n == 0:
            return {}
        pv = x.get("pixel_values")
        images = x.get("image_sizes") if self.info.next else pv  # NeXT: a row's image is several tiles
        if pv is None or images is None or images.shape[0] != n:
            raise ValueError(f"micro-batch has {n} rows with an image but "
                             f"{'no' if images is None else images.shape[0]} "
                             f"{'image_sizes' if self.info.next else 'pixel_values'}")
        return self._run_vision_embed(i, x, None)

    def _batch_vision_layer(self, i, x, mb, kv, memo):
        return self._run_vision_layer(i, x, None) if mb.image_rows else {}

    def _batch_projector(self, i, x, mb, kv, memo):
        return self._run_projector(i, x, None) if mb.image_rows else {}

    def _batch_text_embed(self, i, x, mb, kv, memo):
        ids = x["input_ids"]
        if tuple(ids.shape) != (1, mb.T):
            raise ValueError(f"micro-batch of {len(mb)} rows packs {mb.T} tokens; input_ids is {tuple(ids.shape)}")
        return self._run_text_embed(i, x, None)

    def _batch_merge(self, i, x, mb, kv, memo):
        """Each image row's features into its image-token positions (features in row order).

        In a row without its image (a decode step, a text chunk) an image token id is text, as
        in `generate`'s decode steps: a model may generate that id."""
        emb = x["inputs_embeds"]
        is_image = x["input_ids"] == self.info.image_token_id  # [1, T]
        if len(mb.image_rows) < len(mb):
            keep = torch.cat([torch.full((r.q,), r.has_image, device=is_image.device) for r in mb.rows])
            is_image = is_image & keep[None]
        per_row = [int(m.sum()) for m in mb.split(is_image)]
        if not mb.image_rows:
            return {"hidden": emb}
        feats = x.get("image_features")
        want = sum(per_row)
        if feats is None or feats.shape[0] != want:
            got = "no" if feats is None else feats.shape[0]
            raise ValueError(f"image features and image tokens do not match: {want} <image> tokens in the "
                             f"micro-batch's rows with an image ({per_row}), {got} image feature rows "
                             f"({self.info.image_tokens} per image)")
        return {"hidden": emb.masked_scatter(is_image[..., None], feats.to(emb.device, emb.dtype))}

    def _batch_decoder_layer(self, i, x, mb, kv, memo):
        h = x["hidden"]
        if "rope" not in memo:
            memo["position_ids"] = mb.position_ids(self.device)
            memo["rope"] = self._rotary(h, memo["position_ids"])
            memo["batch"] = PackedBatch(kv, mb.spans)
        layer = self.model.model.language_model.layers[i]
        use_packed_attention(layer.self_attn)
        h = layer(h, attention_mask=None, position_ids=memo["position_ids"], cache=None, use_cache=False,
                  position_embeddings=memo["rope"], **{BATCH_KWARG: memo["batch"]})
        return {"hidden": h}

    def _batch_head(self, i, x, mb, kv, memo):
        lm = self.model.model.language_model
        last = x["hidden"][0, mb.last_index(x["hidden"].device)]  # [B, D]
        logits = self.model.lm_head(lm.norm(last)).float()        # [B, V]
        return {"logits": logits, "token": logits.argmax(-1)}


# ---- weights ------------------------------------------------------------------------------

def _materialize(model: nn.Module, config, source: str, block_ids: list[str], dtype: torch.dtype,
                 device, seed: int) -> None:
    info = ModelInfo.from_config(config)
    names = [n for b in block_ids for n in module_names(b, info)]
    for name in names:
        model.get_submodule(name).to_empty(device=device)
    if source.startswith(PRESET_PREFIX):
        _init_random(model, info, block_ids, seed)
    else:
        _load_safetensors(model, Path(source), names, config)
    _restore_buffers(model, names, device)
    for name in names:
        model.get_submodule(name).to(dtype).eval()


def param_names(model: nn.Module, module_names_: list[str]) -> list[str]:
    return [f"{m}.{n}" for m in module_names_ for n, _ in model.get_submodule(m).named_parameters()]


def _init_random(model: nn.Module, info: ModelInfo, block_ids: list[str], seed: int) -> None:
    """Seeded random weights per block: the same block gets the same weights in every process."""
    for b in block_ids:
        g = torch.Generator().manual_seed(_seed_for(seed, b))
        for m in module_names(b, info):
            for n, p in model.get_submodule(m).named_parameters():
                is_norm = p.dim() == 1 and "norm" in f"{m}.{n}".lower()
                if is_norm and n.endswith("weight"):
                    vals = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
                elif is_norm:
                    vals = torch.zeros(p.shape)
                else:
                    vals = 0.02 * torch.randn(p.shape, generator=g)
                with torch.no_grad():
                    p.copy_(vals.to(p.dtype))


def evict_page_cache(source: str) -> int:
    """Drop a checkpoint's files from the OS page cache (no root needed); bytes dropped.

    Makes the next load read from storage, as on a device whose RAM cannot keep the
    file cached: what a cold recovery really costs. No-op for presets."""
    if source.startswith(PRESET_PREFIX) or not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for f in _checkpoint_files(Path(source)):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


INDEX_FILE = "model.safetensors.index.json"


def _checkpoint_files(path: Path) -> list[Path]:
    """Every weight file of a checkpoint: the shards its index names, else its *.safetensors."""
    if (path / INDEX_FILE).is_file():
        return sorted({f for _, f in checkpoint_tensors(path).values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{path}: no *.safetensors weights in the checkpoint directory")
    return files


def read_index(path: Path) -> dict[str, str]:
    """The weight_map of `path/model.safetensors.index.json` (disk tensor name -> shard file),
    checked: a JSON object of names to plain file names in the checkpoint directory."""
    index = path / INDEX_FILE
    try:
        doc = json.loads(index.read_text())
    except OSError as e:
        raise ModelSourceError(f"{index}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{index}: not valid JSON: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelSourceError(f"{index}: weight_map: missing or not an object of tensor name -> shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ModelSourceError(f"{index}: weight_map: {name!r}: {shard!r} is not a shard file name "
                                   f"in the checkpoint directory")
    return weight_map


def read_safetensors_header(f: Path) -> dict[str, dict]:
    """The header of one safetensors file (disk name -> {dtype, shape, data_offsets}),
    checked against the file's size, without reading any tensor.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then
    the data; a truncated file (or one that is not safetensors at all) is refused here,
    where safe_open would fail in the middle of a load."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = fh.read(n) if n is not None and n <= size - 8 else None
    except OSError as e:
        raise ModelSourceError(f"{f}: cannot read: {e.strerror}") from None
    if raw is None:
        raise ModelSourceError(f"{f}: not a safetensors file or truncated: {size:,} bytes, header length "
                               f"{'missing' if n is None else f'{n:,} bytes'}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{f}: not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelSourceError(f"{f}: not a safetensors file: a header entry has no data_offsets") from None
    if 8 + n + end > size:
        raise ModelSourceError(f"{f}: truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}")
    return header


def checkpoint_tensors(path: Path) -> dict[str, tuple[str, Path]]:
    """name in memory -> (name on disk, file holding it), for every tensor of the checkpoint.

    From the index's weight_map when there is one (no shard is opened), else from the
    headers of the *.safetensors files. The one place that maps names across the three
    layouts (`memory_name`), so that the pre-flight and the load agree on what is where."""
    if (path / INDEX_FILE).is_file():
        pairs = [(disk, path / shard) for disk, shard in read_index(path).items()]
    else:
        pairs = [(disk, f) for f in _checkpoint_files(path) for disk in read_safetensors_header(f)]
    return {memory_name(disk): (disk, f) for disk, f in pairs}


def tensor_sources(model: nn.Module, path: Path, module_names_: list[str], config,
                   stored: dict[str, tuple[str, Path]] | None = None
                   ) -> tuple[dict[str, tuple[str, Path]], list[str]]:
    """Where each parameter of these modules is stored: (name in memory -> (name on disk,
    file), names the checkpoint lacks). A tied head that is not stored reads the input
    embedding. `stored`: `checkpoint_tensors(path)`, when the caller has it already."""
    stored = checkpoint_tensors(path) if stored is None else stored
    tied = config.tie_word_embeddings or config.text_config.tie_word_embeddings
    found, missing = {}, []
    for name in param_names(model, module_names_):
        if name not in stored and name == "lm_head.weight" and tied:
            embed = "model.language_model.embed_tokens.weight"
            if embed in stored:
                found[name] = stored[embed]
                continue
        if name in stored:
            found[name] = stored[name]
        else:
            missing.append(name)
    return found, missing


def _load_safetensors(model: nn.Module, path: Path, names: list[str], config) -> None:
    """Copy only the tensors of the given modules, opening only the shards that hold them."""

    sources, missing = tensor_sources(model, path, names, config)
    if missing:
        raise ModelSourceError(
            f"{path}: checkpoint lacks {len(missing)} tensors the blocks need, e.g. {sorted(missing)[:3]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (disk, f) in sources.items():
        by_file.setdefault(f, []).append((name, disk))
    for f in sorted(by_file):
        if not f.is_file():
            raise ModelSourceError(f"{path / INDEX_FILE}: weight_map: shard {f.name!r} does not exist")
        with safetensors.safe_open(str(f), framework="pt", device="cpu") as st:
            held = set(st.keys())
            for name, disk in by_file[f]:
                if disk not in held:
                    raise ModelSourceError(f"{f}: no tensor {disk!r} ({INDEX_FILE} places it in this shard)")
                try:
                    with torch.no_grad():
                        params[name].copy_(st.get_tensor(disk))
                except (safetensors.SafetensorError, RuntimeError) as e:
                    raise ModelSourceError(f"{f}: tensor {disk!r}: {e}") from None


def _restore_buffers(model: nn.Module, names: list[str], device) -> None:
    """Non-persistent buffers are not in checkpoints and `to_empty` leaves them garbage."""
    for name in names:
        mod = model.get_submodule(name)
        if hasattr(mod, "position_ids") and hasattr(mod, "num_positions"):  # CLIP embeddings
            mod.position_ids = torch.arange(mod.num_positions, device=device).expand((1, -1))
        for bname, _ in mod.named_buffers():
            if bname != "position_ids":
                raise NotImplementedError(f"buffer {name}.{bname}: no rule to restore it")
