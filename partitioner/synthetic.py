"""LLaVA-shaped block graphs and clusters from a few numbers, without torch.

For tests, benchmarks and planning before a checkpoint is at hand. The graphs have the
shape and attributes of `adaptlink.model.graph.build_graph` (same block ids, kinds, edges and
cost fields); the FLOP and byte formulas are the usual dense-transformer counts
(2 FLOPs per multiply-add, attention scores q x kv), close to but not exactly those of
the real graph. A source `synthetic:llava-1.5-7b` names one of `SHAPES`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

import networkx as nx

from partitioner.errors import PlanError
from partitioner.vocab import CLUSTER_SCHEMA, DTYPE_BYTES, llava_block_ids, llava_edges, mean_decode_context

PREFIX = "synthetic:"


@dataclass(frozen=True)
class Shape:
    vision_layers: int = 23          # layers run (LLaVA-1.5 stops at the second-to-last of 24)
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    patches: int = 576               # per image (336 px / 14 px) ** 2
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32064


SHAPES = {
    "llava-1.5-7b": Shape(),
    "llava-1.5-13b": Shape(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
    "tiny": Shape(vision_layers=2, vision_hidden=64, vision_intermediate=128, patches=16, hidden=64,
                  intermediate=256, layers=4, heads=4, kv_heads=2, vocab=512),
}


def synthetic_graph(source: str = "synthetic:llava-1.5-7b", *, prefill_tokens: int = 640,
                    decode_tokens: int = 64, images_per_request: int = 1, dtype: str = "float16",
                    shape: Shape | None = None, **overrides) -> nx.DiGraph:
    """A LLaVA-shaped block DAG (see module docstring); `overrides` change Shape fields."""
    name = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if shape is None:
        if name not in SHAPES:
            raise PlanError(f"--model {source}: unknown synthetic shape; known: "
                            + ", ".join(PREFIX + n for n in SHAPES))
        shape = SHAPES[name]
    s = replace(shape, **overrides)
    nb = DTYPE_BYTES[dtype]
    S, T, I = prefill_tokens, decode_tokens, images_per_request
    C = mean_decode_context(S, T)
    Dv, Dt = s.vision_hidden, s.hidden
    Nv = s.patches + 1
    hd = Dt // s.heads
    kvd = s.kv_heads * hd
    G = nx.DiGraph(model=PREFIX + name, dtype=dtype, prefill_tokens=S, decode_tokens=T,
                   images_per_request=I, decode_context=C)

    def add(bid, kind, index, params, fp, fd, obp, obd, kv=0):
        G.add_node(bid, kind=kind, index=index, params=int(params), param_bytes=int(params) * nb,
                   flops_prefill=float(fp), flops_decode=float(fd), out_bytes_prefill=int(obp),
                   out_bytes_decode=int(obd), kv_bytes_per_token=int(kv))

    add("vision.embed", "vision_embed", None, 3 * 14 * 14 * Dv + Nv * Dv + Dv,
        I * 2 * s.patches * 3 * 14 * 14 * Dv, 0, I * Nv * Dv * nb, 0)
    vparams = 4 * Dv * Dv + 2 * Dv * s.vision_intermediate
    vflops = I * (2 * Nv * vparams + 4 * Nv * Nv * Dv)
    for i in range(s.vision_layers):
        add(f"vision.layer.{i}", "vision_layer", i, vparams, vflops, 0, I * Nv * Dv * nb, 0)
    pparams = Dv * Dt + Dt * Dt
    add("projector", "projector", None, pparams, I * 2 * s.patches * pparams, 0, I * s.patches * Dt * nb, 0)
    add("text.embed", "text_embed", None, s.vocab * Dt, 0, 0, S * (Dt * nb + 8), Dt * nb + 8)
    add("merge", "merge", None, 0, 0, 0, S * Dt * nb, Dt * nb)
    dparams = 2 * Dt * Dt + 2 * Dt * kvd + 3 * Dt * s.intermediate
    for i in range(s.layers):
        add(f"decoder.layer.{i}", "decoder_layer", i, dparams, 2 * S * dparams + 4 * S * S * Dt,
            2 * dparams + 4 * C * Dt, S * Dt * nb, Dt * nb, kv=2 * kvd * nb)
    add("head", "head", None, s.vocab * Dt, 2 * s.vocab * Dt, 2 * s.vocab * Dt, 8, 8)
    assert list(G.nodes) == llava_block_ids(s.vision_layers, s.layers)
    _add_edges(G)
    return G


def _add_edges(G: nx.DiGraph) -> None:
    """The LLaVA edges among G's blocks (`partitioner.vocab.llava_edges`), each carrying its
    source block's output."""
    for u, v in llava_edges(G.nodes):
        G.add_edge(u, v, bytes_prefill=G.nodes[u]["out_bytes_prefill"],
                   bytes_decode=G.nodes[u]["out_bytes_decode"])


# Device classes for synthetic clusters: roofline numbers of the datasheet kind (dense fp16).
DEVICE_CLASSES = {
    "a100": dict(flops_per_s=1.5e14, memory_bytes_per_s=1.6e12, memory_bytes=76_000_000_000, torch_device="cuda:0"),
    "rtx4090": dict(flops_per_s=8.0e13, memory_bytes_per_s=9.0e11, memory_bytes=22_000_000_000, torch_device="cuda:0"),
    "t4": dict(flops_per_s=2.5e13, memory_bytes_per_s=2.8e11, memory_bytes=14_000_000_000, torch_device="cuda:0"),
    "orin": dict(flops_per_s=1.5e13, memory_bytes_per_s=1.7e11, memory_bytes=28_000_000_000, torch_device="cuda:0"),
    "xeon": dict(flops_per_s=2.0e12, memory_bytes_per_s=1.0e11, memory_bytes=120_000_000_000, torch_device="cpu"),
    "laptop": dict(flops_per_s=6.0e11, memory_bytes_per_s=4.0e10, memory_bytes=12_000_000_000, torch_device="cpu"),
}


def synthetic_cluster(n: int, seed: int = 0, *, jitter: float = 0.15, name: str | None = None,
                      classes: tuple[str, ...] = ("a100", "rtx4090", "t4", "orin", "xeon", "laptop")) -> dict:
    """A cluster.json dict of `n` devices cycling through `classes`, each jittered by up to
    +-`jitter` (so no two are identical), with links of unequal bandwidth."""
    rng = random.Random(seed)
    devices = []
    for i in range(n):
        cls = classes[i % len(classes)]
        c = DEVICE_CLASSES[cls]
        j = lambda: 1 + rng.uniform(-jitter, jitter)  # noqa: E731
        devices.append({
            "name": f"{cls}-{i}", "host": f"10.0.0.{i + 1}", "torch_device": c["torch_device"],
            "dtype": "float16", "threads": 8, "memory_bytes": int(c["memory_bytes"] * j()),
            "compute": {"roofline": {"flops_per_s": c["flops_per_s"] * j(),
                                     "memory_bytes_per_s": c["memory_bytes_per_s"] * j()}}})
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            if rng.random() < 0.3:
                pairs.append({"src": devices[a]["name"], "dst": devices[b]["name"],
                              "bandwidth_bytes_per_s": rng.choice([1.25e8, 3.0e8, 1.25e9]) * j(),
                              "latency_s": rng.choice([0.0002, 0.001, 0.003])})
    return {"schema": CLUSTER_SCHEMA, "name": name or f"synthetic{n}-{seed}", "devices": devices,
            "links": {"default": {"bandwidth_bytes_per_s": 1.25e9, "latency_s": 0.0005}, "pairs": pairs}}


def random_instance(rng: random.Random, *, max_blocks: int = 8, devices: tuple[int, int] = (2, 3),
                    measured_p: float = 0.3, identical_layers: bool = False,
                    identical_devices: bool = False, bandwidth_scale: float = 1.0) -> tuple[nx.DiGraph, dict]:
    """A small random LLaVA-shaped graph (at most `max_blocks` blocks) and cluster dict.

    Sizes are drawn so that many instances (about two in five) do not fit in memory.
    `identical_layers`: 2 or more decoder layers, all alike (as in a real model), and
    vision layers alike, so that the ILP places them as runs (`ilp.find_runs`).
    `identical_devices`: the last two devices are copies of each other with default links
    (needs 3 or more devices), so that the ILP breaks their symmetry (`ilp.identical_pairs`).
    `bandwidth_scale`: every link's bandwidth times this (below 1: links that bind).
    Left at their defaults, the draws are those of earlier versions (same instances for the same seed)."""
    has_vision = rng.random() < 0.8
    fixed = 5 if has_vision else 3          # vision.embed, projector | text.embed, merge, head
    room = max_blocks - fixed
    n_dec = rng.randint(2, room) if identical_layers else rng.randint(1, min(3, room))
    n_vis = rng.randint(0, min(2, room - n_dec)) if has_vision else 0
    S, T = rng.choice([16, 64, 256]), rng.choice([0, 1, 8, 32])
    rng.randint(1, 4)  # once K, unused: still drawn, so that a seed draws the instances it did
    G = nx.DiGraph(model="synthetic:random", dtype="float32", prefill_tokens=S, decode_tokens=T,
                   images_per_request=1, decode_context=mean_decode_context(S, T))

    template: dict[str, dict] = {}

    def add(bid, kind, index, decode=True):
        if identical_layers and kind in template:
            G.add_node(bid, **{**template[kind], "index": index})
            return
        params = rng.choice([0, rng.randint(1, 100)]) * 1_000_000 if kind == "merge" else rng.randint(1, 100) * 1_000_000
        G.add_node(bid, kind=kind, index=index, params=params, param_bytes=4 * params,
                   flops_prefill=rng.uniform(0, 1e11), flops_decode=rng.uniform(0, 1e9) if decode else 0.0,
                   out_bytes_prefill=rng.randint(1, 50) * 100_000,
                   out_bytes_decode=rng.randint(1, 50) * 1_000 if decode else 0,
                   kv_bytes_per_token=rng.randint(1, 20) * 1000 if kind == "decoder_layer" else 0)
        if identical_layers and kind in ("vision_layer", "decoder_layer"):
            template[kind] = dict(G.nodes[bid])

    if has_vision:
        add("vision.embed", "vision_embed", None, decode=False)
        for i in range(n_vis):
            add(f"vision.layer.{i}", "vision_layer", i, decode=False)
        add("projector", "projector", None, decode=False)
    add("text.embed", "text_embed", None)
    add("merge", "merge", None)
    for i in range(n_dec):
        add(f"decoder.layer.{i}", "decoder_layer", i)
    add("head", "head", None)
    _add_edges(G)
    total = sum(a["param_bytes"] for _, a in G.nodes(data=True))
    n = rng.randint(*devices)
    devs = []
    for i in range(n):
        compute = {}
        if rng.random() < 0.8:
            compute["roofline"] = {"flops_per_s": rng.uniform(1e10, 1e12),
                                   "memory_bytes_per_s": rng.uniform(1e9, 1e11)}
        if rng.random() < measured_p or not compute:
            kinds = sorted({a["kind"] for _, a in G.nodes(data=True)})
            pick = kinds if "roofline" not in compute else rng.sample(kinds, rng.randint(1, len(kinds)))
            compute["measured"] = {"model": "synthetic:random", "prefill_tokens": rng.choice([S, 2 * S]),
                                   "decode_context": S,
                                   "blocks": {k: {"prefill_s": rng.uniform(0, 0.2), "decode_s": rng.uniform(0, 0.01)}
                                              for k in pick}}
        dev = {"name": f"d{i}", "memory_bytes": int(total * rng.uniform(0.3, 1.6)) + 1, "compute": compute,
               "dtype": "float32"}
        if rng.random() < 0.3:
            dev["emulation"] = {"slowdown": rng.choice([1.0, 2.0, 3.5]), "memory_cap_bytes": None}
        devs.append(dev)
    pairs = []
    for a in range(n):
        for b in range(n):
            if a != b and rng.random() < 0.5:
                pairs.append({"src": f"d{a}", "dst": f"d{b}", "bandwidth_bytes_per_s": rng.uniform(1e7, 1e9) * bandwidth_scale,
                              "latency_s": rng.choice([0.0, 0.0001, 0.002])})
    if identical_devices and n >= 3:
        devs[-1] = {**json.loads(json.dumps(devs[-2])), "name": devs[-1]["name"]}
        twins = {devs[-2]["name"], devs[-1]["name"]}
        pairs = [p for p in pairs if not ({p["src"], p["dst"]} & twins)]
    cluster = {"schema": CLUSTER_SCHEMA, "name": "random", "devices": devs,
               "links": {"default": {"bandwidth_bytes_per_s": rng.uniform(1e7, 1e9) * bandwidth_scale, "latency_s": 0.0005},
                         "pairs": pairs}}
    return G, cluster
