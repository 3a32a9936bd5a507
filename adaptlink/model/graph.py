"""The block graph of a HuggingFace LLaVA model: the units the planner may place, with their costs.

Nodes are block ids (docs/DESIGN.md): `vision.embed`, `vision.layer.<i>`, `projector`,
`text.embed`, `merge`, `decoder.layer.<i>`, `head`. The image branch and the text branch
meet at `merge`, so the graph is a DAG, not a chain:

    vision.embed -> vision.layer.0 -> ... -> vision.layer.{U-1} -> projector --.
                                                                   text.embed -> merge -> decoder.layer.0 -> ... -> head

U is the number of vision layers LLaVA actually uses (up to its feature layer); later
layers are never run and are not in the graph. Costs are for one request of the given
workload. FLOP formulas count matrix products (2*m*n*k), as `torch.utils.flop_counter`
does; attention counts the full q x kv score matrix (sdpa's count, causal or not).
"""

from __future__ import annotations

import logging

import networkx as nx

from adaptlink.model.config import ModelInfo, load_config
from partitioner.types import Workload
from partitioner.vocab import (TOKEN_ID_BYTES, block_index, block_kind, dtype_bytes,
                               llava_block_ids, llava_edges)

log = logging.getLogger(__name__)


def block_ids(info: ModelInfo) -> list[str]:
    """All blocks of a model, in a topological order (vision branch first)."""
    return llava_block_ids(info.vision_layers_used, info.text_layers)


def module_names(block_id: str, info: ModelInfo) -> list[str]:
    """The submodules of `LlavaForConditionalGeneration` (names in memory) that make a block
    of the model `info` describes (CLIP's embeddings are followed by a `pre_layrnorm` that
    SigLIP does not have)."""
    kind, i = block_kind(block_id), block_index(block_id)
    clip = info.class_token
    return {
        "vision_embed": ["model.vision_tower.embeddings"] + (["model.vision_tower.pre_layrnorm"] if clip else []),
        "vision_layer": [f"model.vision_tower.encoder.layers.{i}"],
        "projector": ["model.multi_modal_projector"] + ([NEWLINE_MODULE] if info.next else []),
        "text_embed": ["model.language_model.embed_tokens"],
        "merge": [],
        "decoder_layer": [f"model.language_model.layers.{i}"],
        "head": ["model.language_model.norm", "lm_head"],
    }[kind]


NEWLINE_MODULE = "model.adaptlink_image_newline"
"""LLaVA-NeXT's `image_newline` is a bare parameter of `LlavaNextModel`; blocks are made of
modules, so `attach_newline` hangs the same Parameter on a module of this name (`.weight`)."""


def attach_newline(model) -> None:
    """Give a LlavaNextForConditionalGeneration the NEWLINE_MODULE (sharing `image_newline`,
    so the parameter count is unchanged); a no-op for other models or when attached already."""
    from torch import nn  # only with a model at hand (this module loads without torch)

    inner = model.model
    if hasattr(inner, "image_newline") and not hasattr(inner, NEWLINE_MODULE.split(".")[-1]):
        holder = nn.Module()
        holder.weight = inner.image_newline
        inner.add_module(NEWLINE_MODULE.split(".")[-1], holder)


def unused_module_names(info: ModelInfo, model=None) -> list[str]:
    """Modules in the checkpoint that LLaVA never runs (they are in no block): the layers past
    the feature layer, the tower's final norm, and SigLIP's pooling head when it has one."""
    names = [f"model.vision_tower.encoder.layers.{i}"
             for i in range(info.vision_layers_used, info.vision_layers_total)] + [
        "model.vision_tower.post_layernorm"]
    if model is not None and hasattr(model.model.vision_tower, "head"):
        names.append("model.vision_tower.head")
    return names


def block_dag(info: ModelInfo) -> nx.DiGraph:
    """The edges alone: the vision chain and the text chain meeting at `merge`."""
    G = nx.DiGraph()
    G.add_nodes_from(block_ids(info))
    G.add_edges_from(llava_edges(G.nodes))
    return G


def _vision_flops(vc, tokens: int) -> dict[str, float]:
    d, inter = vc.hidden_size, vc.intermediate_size
    return {
        "proj": 4 * 2 * tokens * d * d,          # q, k, v, o
        "attn": 2 * 2 * tokens * tokens * d,     # scores and weighted sum
        "mlp": 2 * 2 * tokens * d * inter,       # fc1, fc2
    }


def _decoder_flops(tc, q: int, kv: int) -> float:
    d = tc.hidden_size
    hd = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    qd, kvd = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    proj = 2 * q * d * (qd + 2 * kvd) + 2 * q * qd * d   # q, k, v, o
    attn = 2 * 2 * q * kv * qd
    mlp = 3 * 2 * q * d * tc.intermediate_size           # gate, up, down
    return float(proj + attn + mlp)


def block_costs(config, info: ModelInfo, workload: Workload, dtype: str) -> dict[str, dict]:
    """Per-block FLOPs, output bytes and KV bytes for one request (params are added by the caller)."""
    vc, tc = config.vision_config, config.text_config
    nb = dtype_bytes(dtype)
    S, C, n_img = workload.prefill_tokens, workload.decode_context, workload.images_per_request
    Dv, Dt = vc.hidden_size, tc.hidden_size
    N = info.vision_tokens  # patches (+ CLS)
    tiles = n_img * info.tiles_per_image  # NeXT: every image's base + grid tiles go through the tower
    hd = getattr(tc, "head_dim", None) or Dt // tc.num_attention_heads

    # Bytes the vision chain carries after each point: the running hidden state plus every
    # selected hidden state already produced (a list of feature layers is concatenated at the
    # projector; a layer listed twice is carried once).
    def vision_out(after_hs: int) -> int:
        picked = len({p for p in info.feature_picks if p <= after_hs})
        last = after_hs >= info.vision_layers_used
        sizes = n_img * 2 * TOKEN_ID_BYTES if info.next else 0  # NeXT: image_sizes travel to the projector
        return tiles * N * Dv * nb * ((0 if last else 1) + picked) + sizes

    costs: dict[str, dict] = {}
    zero = dict(flops_prefill=0.0, flops_decode=0.0, out_bytes_prefill=0, out_bytes_decode=0,
                kv_bytes_per_token=0)
    costs["vision.embed"] = dict(
        zero, flops_prefill=float(tiles * 2 * info.patches_per_image * 3 * vc.patch_size**2 * Dv),
        out_bytes_prefill=vision_out(0))
    per_layer = float(tiles * sum(_vision_flops(vc, N).values()))
    for i in range(info.vision_layers_used):
        costs[f"vision.layer.{i}"] = dict(zero, flops_prefill=per_layer, out_bytes_prefill=vision_out(i + 1))
    T = info.image_tokens
    # the projector runs on every tile's selected positions (NeXT unpads and adds newlines after)
    sel = info.vision_tokens - (1 if info.strategy == "default" else 0)
    costs["projector"] = dict(
        zero,
        flops_prefill=float(tiles * (2 * sel * Dv * len(info.feature_picks) * Dt + 2 * sel * Dt * Dt)),
        out_bytes_prefill=n_img * T * Dt * nb)
    embed_out = dict(out_bytes_prefill=S * (Dt * nb + TOKEN_ID_BYTES), out_bytes_decode=Dt * nb + TOKEN_ID_BYTES)
    costs["text.embed"] = dict(zero, **embed_out)
    costs["merge"] = dict(zero, out_bytes_prefill=S * Dt * nb, out_bytes_decode=Dt * nb)
    for i in range(info.text_layers):
        costs[f"decoder.layer.{i}"] = dict(
            # a sliding-window layer's decode attends to the last `window` keys only (HF's
            # sliding cache holds no more; the KV store's attention reads no more)
            flops_prefill=_decoder_flops(tc, S, S), flops_decode=_decoder_flops(tc, 1, min(C, info.window(i) or C)),
            out_bytes_prefill=S * Dt * nb, out_bytes_decode=Dt * nb,
            kv_bytes_per_token=2 * tc.num_key_value_heads * hd * nb)
    # generate computes logits for the last position only (logits_to_keep=1).
    head = float(2 * Dt * tc.vocab_size)
    costs["head"] = dict(zero, flops_prefill=head, flops_decode=head,
                         out_bytes_prefill=TOKEN_ID_BYTES, out_bytes_decode=TOKEN_ID_BYTES)
    return costs


def meta_model(config):
    """The whole HF model on the meta device: shapes and parameter counts, no memory, no weights."""
    # torch and transformers (~1.9 s) only here: planning from a config (`adaptlink plan`,
    # `adaptlink graph`) and the command line's start-up import this module without them
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    attach_newline(model)
    return model


def block_params(model, info: ModelInfo, dtype: str) -> dict[str, tuple[int, int]]:
    """block id -> (unique parameter count, bytes the block's holder must store at dtype).

    Unique counts add up, with the unused modules, to `sum(p.numel() for p in model.parameters())`.
    Bytes include a tied lm_head weight, since a head placed away from text.embed needs its own copy.
    """
    nb = dtype_bytes(dtype)
    seen: set[int] = set()
    out = {}
    for bid in block_ids(info):
        unique = held = 0
        for name in module_names(bid, info):
            for p in model.get_submodule(name).parameters():
                held += p.numel()
                if id(p) not in seen:
                    seen.add(id(p))
                    unique += p.numel()
        out[bid] = (unique, held * nb)
    return out


def build_graph(source: str, *, prefill_tokens: int = 640, decode_tokens: int = 64,
                images_per_request: int = 1, dtype: str = "float32", config=None,
                image_size: tuple[int, int] | None = None) -> nx.DiGraph:
    """The block DAG of a model source for one workload (see module docstring for attributes).

    `image_size` (width, height): the workload's representative image, for LLaVA-NeXT whose
    tiles and image tokens depend on it (default: a square of the vision tower's size)."""
    config = config if config is not None else load_config(source)
    info = ModelInfo.from_config(config, source=source)
    if image_size is not None:
        info = info.for_image(*image_size)
    workload = Workload(prefill_tokens, decode_tokens, images_per_request)
    model = meta_model(config)
    params = block_params(model, info, dtype)
    costs = block_costs(config, info, workload, dtype)
    unused = sum(p.numel() for n in unused_module_names(info, model) for p in model.get_submodule(n).parameters())

    G = nx.DiGraph(model=source, dtype=dtype, decode_context=workload.decode_context,
                   total_params=sum(p.numel() for p in model.parameters()), unused_params=unused,
                   prefill_tokens=workload.prefill_tokens, decode_tokens=workload.decode_tokens,
                   images_per_request=workload.images_per_request, image_tokens=info.image_tokens,
                   tiles_per_image=info.tiles_per_image, image_size=list(info.image_size or ()) or None)
    ids = block_ids(info)
    for bid in ids:
        n, nbytes = params[bid]
        G.add_node(bid, kind=block_kind(bid), index=block_index(bid), params=n, param_bytes=nbytes,
                   **costs[bid])
    for u, v in block_dag(info).edges:
        G.add_edge(u, v, bytes_prefill=G.nodes[u]["out_bytes_prefill"],
                   bytes_decode=G.nodes[u]["out_bytes_decode"])
    assert nx.is_directed_acyclic_graph(G)
    assert G.graph["total_params"] == sum(G.nodes[b]["params"] for b in ids) + unused
    log.debug("graph of %s: %d blocks, %d params", source, len(ids), G.graph["total_params"])
    return G


def graph_to_dict(G: nx.DiGraph) -> dict:
    """JSON form: graph attributes, a `blocks` list in topological order, and `edges`."""
    return {
        **G.graph,
        "blocks": [{"id": b, **G.nodes[b]} for b in G.nodes],  # inserted in topological order
        "edges": [{"src": u, "dst": v, **d} for u, v, d in G.edges(data=True)],
    }
