"""`adaptlink profile`: measure each device's compute and memory and each link into cluster.json.

One process (rank) per device. Every rank measures itself; rank 0 gathers the results over
the run's c10d store and writes cluster.json (DESIGN.md, `schema: adaptlink.cluster/1`).

    # this machine alone, one process, no torch.distributed:
    adaptlink profile --model preset:llava-1.5-7b --out cluster.json
    # N local ranks started here (runtime.launcher), with emulation knobs, one value per rank:
    adaptlink profile --model preset:llava-1.5-7b --local 2 --slowdown 1,2 \\
        --memory-cap none,8GiB --link-bandwidth 100Mbit --out cluster.json
    # several machines, one device each: on machine i of N (machine 0 at HOST0)
    torchrun --nnodes N --node-rank i --nproc-per-node 1 --max-restarts 0 \\
        --master-addr HOST0 --master-port 29500 -m adaptlink.cli profile --model SRC --out cluster.json
    # check a hand-written (e.g. datasheet) cluster.json, or add its devices to a profile:
    adaptlink profile --check jetson.json
    adaptlink profile --model SRC --local 2 --merge jetson.json --out cluster.json

What is measured:
- compute: one representative block of each kind (`REPRESENTATIVE`), built at the model's
  real size with seeded random weights (so a 7B layer needs no 7B of weights and no
  download; of a checkpoint directory only config.json is read), on the rank's torch
  device, dtype and thread count. A layer kind (vision and decoder layers) is timed run
  back to back over several distinct layers (up to `--cycle-bytes` of weights, at most as
  many as the model has), as a stage runs them: one layer timed alone again and again
  would run from cache and read too fast. Its time is per layer. Prefill at S tokens (and the request's images for vision
  kinds) and one decode step at context C (a KV cache of
  C-1 random positions). Each: warm-up, then repetitions (at least `min_repeats`, at most
  `repeats`, stopping once `budget_s` is spent); the median is kept and the spread
  `(max - min) / median` recorded. Ranks on one host take turns run by run, so that no
  measurement competes with another rank's and all see the same background load.
- memory: free memory (`psutil` available RAM, or `torch.cuda.mem_get_info`) minus a
  reserve (default `max(1 GiB, 10% of total)`), divided among the ranks of this host that
  use the same torch device. Measured before any block is built.
- links: every ordered pair (a, b), one at a time on a quiet network: a sends messages of
  several sizes to b over `runtime.transport` (gloo point-to-point, and the transport's
  link emulation if any) and b answers each with an empty one. A least-squares fit of
  round trip = intercept + size / bandwidth over the fastest sample per size gives the
  a -> b bandwidth; latency is half the intercept (the answer travels back over b -> a,
  assumed to have the same latency). It is the latency the runtime's transport pays,
  thread hand-offs included, not the wire's alone.

Emulation (one machine standing in for a heterogeneous cluster) is labelled in the output:
`emulation: {"slowdown", "memory_cap_bytes"}` on a device, `emulated: true` on a link.
Under a slowdown the blocks run padded (`adaptlink.model.emulation.DeadlinePadder`):
`prefill_s`/`decode_s` stay the device's own times, which the planner multiplies by
`slowdown`, and `emulated_prefill_s`/`emulated_decode_s` are the padded times observed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from adaptlink.model.emulation import DeadlinePadder, fmt_bytes, fmt_rate, parse_bytes
from partitioner.errors import AdaptLinkError
from runtime.transport import link_emulation

log = logging.getLogger(__name__)

CLUSTER_SCHEMA = "adaptlink.cluster/1"
KINDS = ("vision_embed", "vision_layer", "projector", "text_embed", "merge", "decoder_layer", "head")
VISION_KINDS = ("vision_embed", "vision_layer", "projector")  # prefill only, once per image
REPRESENTATIVE = {"vision_embed": "vision.embed", "vision_layer": "vision.layer.0",
                  "projector": "projector", "text_embed": "text.embed", "merge": "merge",
                  "decoder_layer": "decoder.layer.0", "head": "head"}
LAYER_KINDS = ("vision_layer", "decoder_layer")  # the kinds a model has many of, run back to back
CYCLE_BYTES = 1 << 30
LINK_SIZES = (0, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
MIN_RESERVE = 1 << 30
KEY = "adaptlink/profile/"  # store keys of one profiling run


class ProfileError(AdaptLinkError):
    """Profiling options that cannot work, or a rank of the run that failed."""


# ---------------------------------------------------------------------------- options


@dataclass(kw_only=True, slots=True)
class ProfileOptions:
    """What to measure; the same on every rank."""

    model: str
    """preset:NAME or a LLaVA checkpoint directory."""
    prefill_tokens: int = 640
    """S: prompt tokens of the measured prefill, image tokens included."""
    decode_tokens: int = 64
    """T: only sets the default decode context and the per-request figure of the summary."""
    decode_context: int | None = None
    """C: context of the measured decode step; default S + T // 2 (the mean over a request)."""
    images: int = 1
    """Images per request (vision kinds run once per image)."""
    dtype: str = "float32"
    kinds: tuple[str, ...] = KINDS
    warmup: int = 1
    repeats: int = 7
    min_repeats: int = 3
    budget_s: float = 10.0
    """Stop repeating one measurement after this many seconds (once min_repeats are done)."""
    seed: int = 0
    cycle_bytes: int = CYCLE_BYTES
    """Layer kinds are timed run back to back over this many bytes of distinct copies (at most
    the model's count of that kind), so their weights come from memory as in a stage."""
    memory_reserve: str | None = None
    """Bytes (`2GiB`) or a share of the total (`10%`); default max(1 GiB, 10%)."""
    link_sizes: tuple[int, ...] = LINK_SIZES
    link_repeats: int = 3
    timeout_s: float = 3600.0

    def __post_init__(self):
        if self.decode_context is None:
            self.decode_context = self.prefill_tokens + self.decode_tokens // 2
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ProfileError(f"--kinds: unknown kinds {unknown}; kinds are {', '.join(KINDS)}")
        for name in ("prefill_tokens", "decode_context", "repeats", "min_repeats"):
            if getattr(self, name) < 1:
                raise ProfileError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.images < 0 or self.warmup < 0:
            raise ProfileError(f"--images and --warmup must be >= 0, got {self.images}, {self.warmup}")
        if len(set(self.link_sizes)) < 2:
            raise ProfileError(f"--link-sizes: need two different sizes at least, got {list(self.link_sizes)}")


@dataclass(kw_only=True, slots=True)
class RankSetup:
    """This rank's device and knobs."""

    name: str
    torch_device: str = "cpu"
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    slowdown: float = 1.0
    memory_cap_bytes: int | None = None

    @property
    def emulation(self) -> dict | None:
        if self.slowdown == 1.0 and self.memory_cap_bytes is None:
            return None
        return {"slowdown": self.slowdown, "memory_cap_bytes": self.memory_cap_bytes}


# ---------------------------------------------------------------------------- compute


@dataclass
class Timing:
    """Repeated timings of one call: the device's own time, and the padded time."""

    compute_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)

    @staticmethod
    def _spread(xs: list[float]) -> float:
        m = statistics.median(xs)
        return (max(xs) - min(xs)) / m if m > 0 else 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.compute_s)

    @property
    def padded_median_s(self) -> float:
        return statistics.median(self.total_s)

    @property
    def spread(self) -> float:
        return self._spread(self.compute_s)


class SoloTurns:
    """Turn-taking for a rank alone on its machine: nothing to wait for."""

    def __call__(self):
        return contextlib.nullcontext()

    def agree(self, name: str, value):
        return value


def _cases(blocks, opts: ProfileOptions, device, copies: dict[str, list[str]]):
    """(kind, phase, setup) for every measurement; setup() -> (block ids, inputs, step): the
    block ids (`copies[kind]`) run one after another, each on what the one before produced."""
    import torch

    from adaptlink.model.blocks import Step
    from adaptlink.model.graph import block_index

    cfg, info = blocks.config, blocks.info
    vc, tc = cfg.vision_config, cfg.text_config
    dt = blocks.dtype
    S, C, n_img = opts.prefill_tokens, opts.decode_context, opts.images
    n_vis = info.patches_per_image + 1
    g = torch.Generator().manual_seed(opts.seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dt)

    def ids(n):
        x = torch.randint(0, tc.vocab_size, (1, n), generator=g)
        x[x == info.image_token_id] = 0
        return x.to(device)

    def prefill_step():
        return Step.prefill(torch.ones(1, S, dtype=torch.long, device=device), cache=blocks.new_cache())

    def decode_step(k, v, layers):
        cache = blocks.new_cache()
        for i in layers:  # each decoder layer's slot: C-1 positions already cached
            cache.update(k, v, i)
        return Step(position_ids=torch.tensor([[C - 1]], device=device), cache=cache)

    no_step = Step(position_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    image_rows = n_img * info.image_tokens
    for kind in opts.kinds:
        b = copies[kind]
        if kind in VISION_KINDS and n_img == 0:
            continue
        if kind == "vision_embed":
            x = {"pixel_values": rnd(n_img, 3, vc.image_size, vc.image_size)}
        elif kind == "vision_layer":
            x = {"vision_hidden": rnd(n_img, n_vis, vc.hidden_size)}
        elif kind == "projector":
            x = {f"vision_feat.{k}": rnd(n_img, n_vis, vc.hidden_size) for k in info.feature_picks}
        if kind in VISION_KINDS:
            yield kind, "prefill", lambda b=b, x=x: (b, x, no_step)
            continue
        if kind == "text_embed":
            pre, dec = {"input_ids": ids(S)}, {"input_ids": ids(1)}
        elif kind == "merge":
            tok = ids(S)
            tok[0, :image_rows] = info.image_token_id
            pre = {"inputs_embeds": rnd(1, S, tc.hidden_size), "input_ids": tok}
            if image_rows:
                pre["image_features"] = rnd(image_rows, tc.hidden_size)
            dec = {"inputs_embeds": rnd(1, 1, tc.hidden_size), "input_ids": ids(1)}
        else:  # decoder_layer, head
            pre, dec = {"hidden": rnd(1, S, tc.hidden_size)}, {"hidden": rnd(1, 1, tc.hidden_size)}
        yield kind, "prefill", lambda b=b, x=pre: (b, x, prefill_step())
        if kind == "decoder_layer":
            hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            k, v = rnd(1, tc.num_key_value_heads, C - 1, hd), rnd(1, tc.num_key_value_heads, C - 1, hd)
            layers = [block_index(c) for c in b]
            yield kind, "decode", lambda b=b, x=dec, k=k, v=v, n=layers: (b, x, decode_step(k, v, n))
        else:
            yield kind, "decode", lambda b=b, x=dec: (b, x, no_step)


def measure_compute(opts: ProfileOptions, *, device: str = "cpu", slowdown: float = 1.0, config=None,
                    on_progress: Callable[[int, int, str], None] | None = None, turns=None) -> dict:
    """The `compute.measured` object of one device: one representative block per kind.

    Every step (building the blocks, each case's warm-up, each timed run) happens inside
    `with turns():`. Ranks that share a machine pass turns that make them take those steps
    one rank after the other (`_Board.turns`), so that each runs alone and all of them see
    the same background load: the ratios between devices stay right on a busy machine.
    `turns.agree(name, value)` returns the first rank's value, so all do as many runs.
    """
    import torch

    from adaptlink.model.blocks import LlavaBlocks
    from adaptlink.model.config import PRESET_PREFIX, ModelInfo, load_config

    config = config if config is not None else load_config(opts.model)
    info = ModelInfo.from_config(config, source=opts.model)
    if opts.images and opts.prefill_tokens < opts.images * info.image_tokens:
        raise ProfileError(
            f"--prefill-tokens: {opts.prefill_tokens} cannot hold {opts.images} image(s) of "
            f"{info.image_tokens} tokens each; use at least {opts.images * info.image_tokens}")
    progress = on_progress or (lambda done, total, what: None)
    turns = turns or SoloTurns()
    with turns():
        progress(0, 1, "building blocks")
        # Seeded random weights from the config, whatever the source: a checkpoint directory
        # needs only its config.json here, and no weight is read (a preset-style source makes
        # LlavaBlocks initialise the blocks at random instead of reading safetensors).
        source = PRESET_PREFIX + "profile"
        blocks = LlavaBlocks.load(source, [REPRESENTATIVE[k] for k in opts.kinds],
                                  dtype=opts.dtype, device=device, seed=opts.seed, config=config)
        copies = _layer_copies(blocks, opts)
        blocks.add(source, [b for ids in copies.values() for b in ids], seed=opts.seed)
        cases = list(_cases(blocks, opts, device, copies))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    padder = DeadlinePadder(slowdown, sync=sync)
    out: dict[str, dict] = {}
    for i, (kind, phase, setup) in enumerate(cases):
        progress(i, len(cases), f"{kind} {phase}")
        n = len(copies[kind])
        runs = opts.repeats
        if opts.warmup:
            with turns():
                t0 = time.perf_counter()
                for _ in range(opts.warmup):
                    blocks.run_many(*setup())
                    if sync:
                        sync()
                one = (time.perf_counter() - t0) / opts.warmup
            runs = max(opts.min_repeats, min(opts.repeats, int(opts.budget_s / max(one, 1e-9))))
        timing = Timing()
        for _ in range(turns.agree(f"runs/{i}", runs)):
            with turns():  # padded to `slowdown` x the fastest run, as the runtime pads (runtime.stage)
                padder.run(blocks.run_many, *setup(), key=(kind, phase))
            timing.compute_s.append(padder.stats.last_compute_s / n)
            timing.total_s.append(padder.stats.last_total_s / n)
        entry = out.setdefault(kind, {"block": copies[kind][0], "prefill_s": 0.0, "decode_s": 0.0})
        if n > 1:
            entry["copies"] = n
        entry[f"{phase}_s"] = timing.median_s
        entry[f"{phase}_spread"] = round(timing.spread, 4)
        entry[f"{phase}_repeats"] = len(timing.compute_s)
        if padder.active:
            entry[f"emulated_{phase}_s"] = timing.padded_median_s
    for entry in out.values():
        entry["spread"] = max(entry.get("prefill_spread", 0.0), entry.get("decode_spread", 0.0))
    progress(len(cases), len(cases), "done")
    return {"model": opts.model, "dtype": opts.dtype, "prefill_tokens": opts.prefill_tokens,
            "decode_context": opts.decode_context, "images_per_request": opts.images,
            "method": (f"median of {opts.min_repeats}-{opts.repeats} runs (as many as fit "
                       f"{opts.budget_s:g} s) after {opts.warmup} warm-up, random-weight blocks at full "
                       f"size: one per kind; a layer kind run back to back over `copies` distinct "
                       f"layers (up to {fmt_bytes(opts.cycle_bytes)} of weights), time per layer; "
                       f"spread = (max - min) / median"),
            "blocks": out}


def _layer_copies(blocks, opts: ProfileOptions) -> dict[str, list[str]]:
    """The block ids each kind is timed over: its representative alone, or for a layer kind
    the model's first layers of that kind, as many as fit `cycle_bytes` (one at least).

    A block timed alone, again and again, runs from cache if its weights fit there, while a
    stage runs its layers back to back and reads each one's weights from memory: a 30M-
    parameter model's decoder layer measured 1.01 ms per decode step repeated alone and
    1.55 ms run in turn with the 7 others (experiments/profile_predict.py). Run back to back,
    the copies also share one step's rope and mask, as the layers of a stage do."""
    from adaptlink.model.graph import block_ids, block_kind

    out = {k: [REPRESENTATIVE[k]] for k in opts.kinds}
    for kind in set(opts.kinds) & set(LAYER_KINDS):
        nbytes = blocks.param_bytes([REPRESENTATIVE[kind]])
        ids = [b for b in block_ids(blocks.info) if block_kind(b) == kind]
        out[kind] = ids[:max(1, min(len(ids), opts.cycle_bytes // max(nbytes, 1)))]
    return out


def warm_up(blocks, block_ids: list[str] | None = None, *, prefill_tokens: int = 8) -> float:
    """Run each held block once on synthetic inputs (a short prefill, one decode step; vision
    blocks on one image), so that the first request served does not pay first-call costs
    (allocator, kernel set-up). Returns the seconds it took; outputs are discarded."""
    from adaptlink.model.graph import block_kind

    ids = blocks.block_ids if block_ids is None else block_ids
    t0 = time.perf_counter()
    by_kind: dict[str, list[str]] = {}
    for b in ids:
        by_kind.setdefault(block_kind(b), []).append(b)
    vision = tuple(k for k in VISION_KINDS if k in by_kind)
    text = tuple(k for k in KINDS if k in by_kind and k not in VISION_KINDS)
    for kinds, images in ((vision, 1), (text, 0)):
        if not kinds:
            continue
        opts = ProfileOptions(model="warm-up", prefill_tokens=prefill_tokens, decode_tokens=2,
                              images=images, kinds=kinds)
        for _kind, _phase, setup in _cases(blocks, opts, blocks.device, by_kind):
            blocks.run_many(*setup())
    if blocks.device.type == "cuda":
        import torch

        torch.cuda.synchronize(blocks.device)
    return time.perf_counter() - t0


def usable_memory(torch_device: str, reserve: str | None = None, shared_by: int = 1) -> dict:
    """Usable bytes of a device now: free minus the reserve, split among `shared_by` ranks."""
    import torch

    dev = torch.device(torch_device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        source = "torch.cuda.mem_get_info"
    else:
        import psutil

        vm = psutil.virtual_memory()
        free, total, source = vm.available, vm.total, "psutil.virtual_memory().available"
    if reserve is None:
        reserve_b, rule = max(MIN_RESERVE, total // 10), "max(1 GiB, 10% of total)"
    elif str(reserve).strip().endswith("%"):
        reserve_b, rule = int(total * float(str(reserve).strip()[:-1]) / 100), f"{reserve} of total"
    else:
        reserve_b, rule = parse_bytes(reserve, "--memory-reserve"), str(reserve)
    usable = (free - reserve_b) // max(1, shared_by)
    if usable <= 0:
        raise ProfileError(f"{torch_device}: --memory-reserve: {fmt_bytes(reserve_b)} reserved leaves "
                           f"nothing of {fmt_bytes(free)} free")
    return {"memory_bytes": int(usable),
            "memory": {"source": source, "free_bytes": int(free), "total_bytes": int(total),
                       "reserve_bytes": int(reserve_b), "reserve_rule": rule, "shared_by": shared_by}}


def predict_request_s(measured: dict, graph, decode_tokens: int | None = None, slowdown: float = 1.0) -> float:
    """Seconds one request takes with every block of `graph` run one after another on the
    measured device: sum over blocks of prefill + T * decode (per-kind times; prefill scaled
    from the measured to the graph's prompt length, vision kinds by images)."""
    g = graph.graph
    T = g["decode_tokens"] if decode_tokens is None else decode_tokens
    total = 0.0
    for b in graph.nodes:
        kind = graph.nodes[b]["kind"]
        t = measured["blocks"].get(kind)
        if t is None:
            raise ProfileError(f"no measured time for {kind} blocks (profile with that kind)")
        if kind in VISION_KINDS:
            total += t["prefill_s"] * g["images_per_request"] / max(1, measured.get("images_per_request", 1))
        else:
            total += t["prefill_s"] * g["prefill_tokens"] / measured["prefill_tokens"] + T * t["decode_s"]
    return total * slowdown


# ---------------------------------------------------------------------------- links


def probe_link(transport, peer: int, sizes, repeats: int, timeout: float) -> list[tuple[int, float]]:
    """Initiator side: (size, round-trip seconds) of `size`-byte messages to `peer`, each
    answered by an empty message. A first round over all sizes is a warm-up."""
    import torch

    samples = []
    for rnd in range(repeats + 1):
        for size in sizes:
            x = {"x": torch.zeros(size, dtype=torch.uint8)}
            t0 = time.perf_counter()
            transport.send(peer, {"_probe": size}, x, timeout=timeout)
            msg = transport.recv(timeout=timeout)
            dt = time.perf_counter() - t0
            if msg is None or msg.src != peer or "_ack" not in msg.header:
                raise ProfileError(f"link probe to rank {peer}: no answer within {timeout:.0f} s")
            if rnd:
                samples.append((size, dt))
    return samples


def answer_probes(transport, peer: int, count: int, timeout: float) -> None:
    """Responder side of `probe_link`: answer `count` messages from `peer`."""
    for _ in range(count):
        msg = transport.recv(timeout=timeout)
        if msg is None or msg.src != peer:
            raise ProfileError(f"link probe from rank {peer}: nothing received within {timeout:.0f} s")
        transport.send(peer, {"_ack": msg.header["_probe"]}, timeout=timeout)


def fit_probe(samples: list[tuple[int, float]]) -> dict:
    """Bandwidth and one-way latency from (size, round trip) samples: a least-squares fit of
    round trip = intercept + size / bandwidth over the fastest sample of each size (noise on
    a busy machine only ever adds time), latency = intercept / 2 (the answer is empty)."""
    from runtime.transport import fit_link

    by_size: dict[int, list[float]] = {}
    for s, t in samples:
        by_size.setdefault(s, []).append(t)
    best = sorted((s, min(ts)) for s, ts in by_size.items())
    out: dict[str, Any] = {}
    try:
        link = fit_link(best, per_size="min")
        bw, intercept = link.bandwidth_bytes_per_s, link.latency_s
    except ValueError:
        # Time did not grow with size: the link is faster than these sizes can tell.
        # The largest message over its whole round trip is a bandwidth it at least has.
        (_, t0), (s1, t1) = best[0], best[-1]
        bw, intercept = s1 / t1, t0
        out["bandwidth_lower_bound"] = True
        log.warning("link fit: round trip did not grow with size (%s); bandwidth %s is a lower bound, "
                    "use larger --link-sizes", best, fmt_rate(bw))
    out.update({"bandwidth_bytes_per_s": float(bw), "latency_s": float(max(0.0, intercept / 2)),
                "samples": len(samples), "sizes": [s for s, _ in best],
                "round_trip_s": [round(t, 6) for _, t in best],
                "round_trip_median_s": [round(statistics.median(by_size[s]), 6) for s, _ in best]})
    return out


# ---------------------------------------------------------------------------- one rank of a run


class _Board:
    """Store-backed exchange between the ranks of one profiling run."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s

    def put(self, key: str, value) -> None:
        self.store.set(KEY + key, json.dumps(value))

    def has(self, key: str) -> bool:
        return self.store.check([KEY + key])

    def get(self, key: str):
        """Wait for `key`; raise if another rank reported an error or died meanwhile.

        Polls with `check` (a blocking `wait` cannot also watch for failures, and each of
        its timeouts logs a c10d warning), every 1 ms at first, backing off to 5 ms.
        """
        deadline = time.monotonic() + self.timeout_s
        pause, next_check = 0.001, time.monotonic() + 0.5
        while not self.store.check([KEY + key]):
            if time.monotonic() > next_check:
                next_check = time.monotonic() + 0.5
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise ProfileError(f"rank {self.rank}: waited {self.timeout_s:.0f} s for {key}")
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        return json.loads(self.store.get(KEY + key))

    def _raise_if_failed(self) -> None:
        if self.store.check([KEY + "error"]):
            raise ProfileError(f"profiling failed on another rank: {json.loads(self.store.get(KEY + 'error'))}")
        if self.store.add("dead_count", 0) > 0:  # written by runtime.launcher when a rank dies
            from runtime.heartbeat import read_dead

            for r in range(self.world):
                if (d := read_dead(self.store, r)) is not None:
                    raise ProfileError(f"rank {r} died while profiling: {d.get('reason', d)}")

    def turns(self, ranks: list[int]) -> "_HostTurns":
        return _HostTurns(self, ranks)


class _HostTurns:
    """Ranks of one machine take steps in turn: r0 step 0, r1 step 0, ..., r0 step 1, ...
    Every rank must take the same number of steps (see measure_compute)."""

    def __init__(self, board: _Board, ranks: list[int]):
        self.board, self.ranks, self.me, self.step = board, ranks, ranks.index(board.rank), 0

    @contextlib.contextmanager
    def __call__(self):
        b, r, k = self.board, self.ranks, self.step
        self.step += 1
        if self.me > 0:
            b.get(f"turn/{r[self.me - 1]}/{k}")
        elif k > 0 and len(r) > 1:
            b.get(f"turn/{r[-1]}/{k - 1}")
        yield
        b.put(f"turn/{b.rank}/{k}", 1)

    def agree(self, name: str, value):
        key = f"agree/{self.ranks[0]}/{name}"
        if self.me == 0:
            self.board.put(key, value)
            return value
        return self.board.get(key)


def _this_host() -> str:
    """The address other devices reach this one at: the local end of the route to the
    rendezvous host (MASTER_ADDR), so 127.0.0.1 when the run is local to this machine, and
    each namespace's or machine's own address otherwise."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP: picks a route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def profile_rank(opts: ProfileOptions, setup: RankSetup, *, board: _Board | None = None,
                 links=None, display=None, config=None) -> tuple[list[dict], list[dict]] | None:
    """Profile this rank's device (and, with a board, the links). Rank 0 (or a lone rank)
    returns (devices, link pairs) of the whole run, as cluster.json entries; others None."""
    import torch

    rank, world = (board.rank, board.world) if board else (0, 1)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    hostname = socket.gethostname()

    def progress(done, total, what):
        if board:
            board.put(f"progress/{rank}", [done, total, what])
        elif display:
            display.device(0, done, total, what)

    progress(0, 1, "starting")
    if board:
        board.put(f"hello/{rank}", {"hostname": hostname, "torch_device": setup.torch_device})
        hello = [board.get(f"hello/{r}") for r in range(world)]
    else:
        hello = [{"hostname": hostname, "torch_device": setup.torch_device}]
    same_host = [r for r in range(world) if hello[r]["hostname"] == hostname]
    shared_by = sum(1 for r in same_host if hello[r]["torch_device"] == setup.torch_device)
    device = {"name": setup.name, "host": _this_host(),
              "torch_device": setup.torch_device, "dtype": opts.dtype, "threads": torch.get_num_threads(),
              **usable_memory(setup.torch_device, opts.memory_reserve, shared_by)}
    turns = None
    if board:  # ranks of one host take turns, after all measured their free memory
        board.put(f"memory/{rank}", device["memory_bytes"])
        for r in same_host:
            board.get(f"memory/{r}")
        turns = board.turns(same_host)
    device["compute"] = {"measured": measure_compute(opts, device=setup.torch_device, slowdown=setup.slowdown,
                                                     config=config, on_progress=progress, turns=turns)}
    device["emulation"] = setup.emulation
    log.info("%s: compute measured (%s)", setup.name, ", ".join(
        f"{k} {v['prefill_s'] * 1e3:.3g}/{v['decode_s'] * 1e3:.3g} ms"
        for k, v in device["compute"]["measured"]["blocks"].items()))
    if board:
        board.put(f"compute/{rank}", device)
        devices = [board.get(f"compute/{r}") for r in range(world)]
    else:
        devices = [device]
    pairs = _measure_links(opts, board, links, display) if board and world > 1 else []
    if rank != 0:
        board.put(f"bye/{rank}", 1)
        return None
    if board:
        for r in range(1, world):
            board.get(f"bye/{r}")
    return devices, pairs


def _measure_links(opts: ProfileOptions, board: _Board, links, display) -> list[dict]:
    """Every ordered pair, one at a time; every rank returns the list of measured pairs."""
    from runtime.transport import Transport

    rank, world = board.rank, board.world
    order = [(a, b) for a in range(world) for b in range(world) if a != b]
    count = (opts.link_repeats + 1) * len(opts.link_sizes)
    names = [board.get(f"compute/{r}")["name"] for r in range(world)]
    out = []
    transport = Transport(rank, world, links=links, stall_timeout_s=max(60.0, opts.timeout_s / 10))
    try:
        for k, (a, b) in enumerate(order):
            if display:
                display.links(k, len(order), f"{names[a]} -> {names[b]}")
            if rank == a:
                fit = fit_probe(probe_link(transport, b, opts.link_sizes, opts.link_repeats, opts.timeout_s))
                emu = links.link(a, b) if links is not None else None
                fit = {"src": names[a], "dst": names[b], **fit, "emulated": emu is not None}
                if emu is not None:
                    fit["emulated_as"] = {"bandwidth_bytes_per_s": emu.bandwidth_bytes_per_s,
                                          "latency_s": emu.latency_s}
                board.put(f"link/{a}/{b}", fit)
            elif rank == b:
                answer_probes(transport, a, count, opts.timeout_s)
            out.append(board.get(f"link/{a}/{b}"))
        if display:
            display.links(len(order), len(order), "done")
        log.info("rank %d: %d links measured", rank, len(order))
    finally:
        transport.close()
    return out


def cluster_dict(devices: list[dict], pairs: list[dict], *, name: str = "profiled",
                 links_emulated: bool = False, merge=None) -> dict:
    """cluster.json from measured devices and pairs (and a validated `Cluster` to merge in)."""
    if pairs:  # the default link (for devices added later) is the slowest one measured
        default = {"bandwidth_bytes_per_s": min(p["bandwidth_bytes_per_s"] for p in pairs),
                   "latency_s": max(p["latency_s"] for p in pairs), "note": "slowest measured pair"}
        if links_emulated:
            default["emulated"] = True
    else:
        default = {"bandwidth_bytes_per_s": 1.25e9, "latency_s": 1e-4,
                   "note": "assumed (10 Gbit/s): one device, no link measured"}
    d = {"schema": CLUSTER_SCHEMA, "name": name, "devices": list(devices),
         "links": {"default": default, "pairs": list(pairs)}}
    if merge is not None:
        clash = {x["name"] for x in devices} & {x.name for x in merge.devices}
        if clash:
            raise ProfileError(f"{merge.source}: devices: names {sorted(clash)} are also profiled devices; "
                               "rename one (--names)")
        d["devices"] += [x.to_dict() for x in merge.devices]
        merged = merge.links_dict()
        d["links"]["default"] = merged["default"]
        d["links"]["pairs"] += merged["pairs"]
    return d


# ---------------------------------------------------------------------------- display


class Display:
    """Rich progress on rank 0: one bar per device, one for the links."""

    def __init__(self, names: list[str], with_links: bool):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.fields[who]:>12}"), BarColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=self.console)
        self.tasks = [self.progress.add_task("waiting", who=n, total=1) for n in names]
        self.link_task = self.progress.add_task("after compute", who="links", total=1) if with_links else None

    def device(self, rank: int, done: int, total: int, what: str) -> None:
        self.progress.update(self.tasks[rank], completed=done, total=total, description=what)

    def links(self, done: int, total: int, what: str) -> None:
        if self.link_task is not None:
            self.progress.update(self.link_task, completed=done, total=total, description=what)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


def _watch_progress(store, world: int, display: Display, stop: threading.Event) -> None:
    """Rank 0's thread: copy every rank's progress key from the store to the display."""
    while not stop.wait(0.2):
        for r in range(world):
            try:
                if store.check([f"{KEY}progress/{r}"]):
                    display.device(r, *json.loads(store.get(f"{KEY}progress/{r}")))
            except Exception:  # the display must never take the run down
                return


def summary_tables(cluster: dict, graph=None):
    """Rich tables of a cluster dict: devices, per-kind times (kinds as rows, devices as
    columns), links. With the model's block `graph`, also each device's predicted seconds
    for one whole request run alone on it (`predict_request_s`, slowdown included)."""
    from rich.table import Table

    devices = cluster["devices"]
    counts = {}
    if graph is not None:
        for b in graph.nodes:
            k = graph.nodes[b]["kind"]
            counts[k] = counts.get(k, 0) + 1
    dt = Table(title=f"cluster {cluster.get('name', '')}: devices")
    for col in ("device", "host", "torch", "dtype", "threads", "memory", "emulation", "1 request alone"):
        dt.add_column(col, justify="right" if col in ("threads", "memory", "1 request alone") else "left")
    for d in devices:
        m = d.get("compute", {}).get("measured")
        emu = d.get("emulation") or {}
        emu_s = ", ".join(filter(None, [f"EMULATED x{emu['slowdown']:g} slower" if emu.get("slowdown", 1) != 1 else "",
                                        f"EMULATED cap {fmt_bytes(emu['memory_cap_bytes'])}"
                                        if emu.get("memory_cap_bytes") else ""]))
        per_req = "-"
        if graph is not None and m and set(counts) <= set(m.get("blocks", {})):
            per_req = f"{predict_request_s(m, graph, slowdown=float(emu.get('slowdown') or 1.0)):.3f} s"
        elif not m and d.get("compute", {}).get("roofline"):
            per_req = "roofline"
        dt.add_row(d["name"], d.get("host", ""), d.get("torch_device", ""), d.get("dtype", ""),
                   str(d.get("threads", "")), fmt_bytes(d["memory_bytes"]), emu_s or "-", per_req)

    ct = Table(title="measured ms per block: prefill / one decode step (spread); the device's own "
                     "time, before any emulated slowdown")
    ct.add_column("kind")
    for d in devices:
        ct.add_column(d["name"], justify="right")
    for k in KINDS:
        cells, any_measured = [], False
        for d in devices:
            b = d.get("compute", {}).get("measured", {}).get("blocks", {}).get(k)
            if b is None:
                cells.append("roofline" if d.get("compute", {}).get("roofline") else "-")
                continue
            any_measured = True
            text = f"{b['prefill_s'] * 1e3:.3g}" if k in VISION_KINDS else \
                f"{b['prefill_s'] * 1e3:.3g} / {b['decode_s'] * 1e3:.3g}"
            cells.append(f"{text} ({b.get('spread', 0) * 100:.0f}%)")
        if any_measured:
            ct.add_row(f"{k} x{counts[k]}" if k in counts else k, *cells)

    lt = Table(title="links (src -> dst), fit of latency + size / bandwidth")
    for col in ("src", "dst", "bandwidth", "latency", "emulated as"):
        lt.add_column(col)
    links = cluster.get("links", {})
    rows = [{"src": "default", "dst": "", **links.get("default", {})}] + list(links.get("pairs", []))
    for p in rows:
        emu = p.get("emulated_as")
        lt.add_row(p["src"], p["dst"], fmt_rate(p["bandwidth_bytes_per_s"]), f"{p['latency_s'] * 1e3:.3f} ms",
                   f"EMULATED {fmt_rate(emu['bandwidth_bytes_per_s'])}, {emu['latency_s'] * 1e3:g} ms" if emu
                   else ("EMULATED" if p.get("emulated") else "-"))
    return dt, ct, lt


# ---------------------------------------------------------------------------- command line


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure devices and links into cluster.json",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", help="preset:NAME or a LLaVA checkpoint directory")
    p.add_argument("--out", default="cluster.json", help="where rank 0 writes cluster.json")
    p.add_argument("--check", metavar="FILE", help="only validate FILE (e.g. hand-written) and show it")
    p.add_argument("--merge", metavar="FILE", help="add FILE's devices and links to the profile")
    p.add_argument("--local", type=int, metavar="N", help="start N local ranks (runtime.launcher)")
    p.add_argument("--names", help="device names, one per rank (default cpu<rank>/gpu<rank>)")
    p.add_argument("--cluster-name", help="cluster name (default: the --out file's stem)")
    p.add_argument("--device", help="torch device per rank (default cuda:<local rank> if CUDA, else cpu)")
    p.add_argument("--threads", help="torch threads per rank, e.g. 1,2 (--local default: cores / N)")
    p.add_argument("--slowdown", default="1", help="EMULATION: compute slowdown per rank, e.g. 1,2")
    p.add_argument("--memory-cap", default="none", help="EMULATION: memory cap per rank, e.g. none,2GiB")
    p.add_argument("--link-bandwidth", help="EMULATION: e.g. 100Mbit (every pair) or 0-1=100Mbit,1-0=1Gbit")
    p.add_argument("--link-latency", help="EMULATION: e.g. 2ms (every pair) or 0-1=5ms")
    p.add_argument("--memory-reserve", help="reserve off free memory: bytes (2GiB) or share (10%%); "
                                            "default max(1 GiB, 10%% of total)")
    p.add_argument("--prefill-tokens", type=int, default=640, help="S: prompt tokens, image tokens included")
    p.add_argument("--decode-tokens", type=int, default=64, help="T: sets the default decode context S + T/2")
    p.add_argument("--decode-context", type=int, help="C: context of the measured decode step")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--kinds", help=f"block kinds to measure (default all: {','.join(KINDS)})")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="at most this many timed runs per measurement")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=10.0, help="seconds per measurement after min-repeats")
    p.add_argument("--link-sizes", help="message sizes of the link probe, e.g. 0,256KiB,1MiB,4MiB")
    p.add_argument("--link-repeats", type=int, default=3)
    p.add_argument("--cycle-bytes", default="1GiB",
                   help="time each layer kind run back to back over distinct copies of up to this many "
                        "bytes of weights, as a stage runs them (0: one layer, timed alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.set_defaults(func=_cmd_profile)


def _options(args) -> ProfileOptions:
    return ProfileOptions(
        model=args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
        decode_context=args.decode_context, images=args.images, dtype=args.dtype,
        kinds=tuple(args.kinds.split(",")) if args.kinds else KINDS, warmup=args.warmup,
        repeats=args.repeats, min_repeats=min(args.min_repeats, args.repeats), budget_s=args.budget,
        seed=args.seed, cycle_bytes=parse_bytes(args.cycle_bytes, "--cycle-bytes"),
        memory_reserve=args.memory_reserve,
        link_sizes=tuple(parse_bytes(s, "--link-sizes") for s in args.link_sizes.split(","))
        if args.link_sizes else LINK_SIZES,
        link_repeats=args.link_repeats, timeout_s=args.timeout)


def _per_rank(text: str | None, world: int, what: str) -> list[str | None]:
    """`a` -> a for every rank; `a,b,...` -> one per rank."""
    if text is None:
        return [None] * world
    vals = [v.strip() for v in str(text).split(",")]
    if len(vals) == 1:
        return vals * world
    if len(vals) != world:
        raise ProfileError(f"{what}: {len(vals)} values for {world} ranks; give one, or one per rank")
    return vals


def _rank_setup(args, rank: int, world: int, local_rank: int) -> RankSetup:
    import torch

    dev = _per_rank(args.device, world, "--device")[rank]
    if dev is None:
        dev = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    name = _per_rank(args.names, world, "--names")[rank] or f"{'gpu' if dev.startswith('cuda') else 'cpu'}{rank}"
    threads = _per_rank(args.threads, world, "--threads")[rank]
    try:
        threads = int(threads) if threads else None
        slowdown = float(_per_rank(args.slowdown, world, "--slowdown")[rank])
    except ValueError as e:
        raise ProfileError(f"--threads/--slowdown: {e}") from None
    if slowdown < 1:
        raise ProfileError(f"--slowdown: {slowdown} for rank {rank}: must be >= 1")
    cap = _per_rank(args.memory_cap, world, "--memory-cap")[rank]
    cap_b = None if cap in (None, "", "none") else parse_bytes(cap, "--memory-cap")
    return RankSetup(name=name, torch_device=dev, threads=threads, slowdown=slowdown, memory_cap_bytes=cap_b)


def _cmd_profile(args) -> int:
    from partitioner.validate import load_cluster

    if args.check:
        cluster = load_cluster(args.check)
        _print_summary(cluster.to_dict())
        print(f"{args.check}: valid {CLUSTER_SCHEMA}, {len(cluster.devices)} devices")
        return 0
    if not args.model:
        raise ProfileError("profile: --model is required (or --check FILE)")
    opts = _options(args)
    merge = load_cluster(args.merge) if args.merge else None
    if args.local:
        return _launch_local(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "RANK" in os.environ:
        return _run_distributed(args, opts, merge)
    setup = _rank_setup(args, 0, 1, 0)
    link_emulation(args.link_bandwidth, args.link_latency, 1)  # validate the option anyway
    with Display([setup.name], with_links=False) as display:
        devices, pairs = profile_rank(opts, setup, display=display)
    return _finish(args, devices, pairs, merge)


def _launch_local(args) -> int:
    from runtime.launcher import launch_local

    n = args.local
    if n < 1:
        raise ProfileError(f"--local: must be >= 1, got {n}")
    threads = _per_rank(args.threads, n, "--threads")
    default = max(1, (os.cpu_count() or 1) // n)
    threads = [int(t) if t else default for t in threads]
    for i in range(n):  # option errors here, not in N children
        _rank_setup(args, i, n, i)
    link_emulation(args.link_bandwidth, args.link_latency, n)
    env = {"ADAPTLINK_PROFILE_ARGS": json.dumps({k: v for k, v in vars(args).items() if k != "func"})}
    result = launch_local([sys.executable, "-m", "adaptlink.profiler"], n, threads=threads, env=env,
                          timeout_s=args.timeout + 60)
    if not result.ok:
        bad = {r: rc for r, rc in result.returncodes.items() if rc != 0}
        raise ProfileError(f"--local {n}: profiling failed (rank exit codes {bad}"
                           f"{', timed out' if result.timed_out else ''})")
    return 0


def _run_distributed(args, opts: ProfileOptions, merge) -> int:
    """One rank of a run started by torchrun or by `--local`."""
    import torch.distributed as dist

    from runtime.launcher import init_rank

    ctx = init_rank(timeout=opts.timeout_s)
    log.info("rank %d of %d joined", ctx.rank, ctx.world_size)
    rank, world = ctx.rank, ctx.world_size
    board = _Board(ctx.store, rank, world, opts.timeout_s)
    try:
        setup = _rank_setup(args, rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        links = link_emulation(args.link_bandwidth, args.link_latency, world)
        if rank != 0:
            board.put(f"name/{rank}", setup.name)
            profile_rank(opts, setup, board=board, links=links)
            return 0
        board.put("name/0", setup.name)
        names = [board.get(f"name/{r}") for r in range(world)]
        stop = threading.Event()
        with Display(names, with_links=True) as display:
            watcher = threading.Thread(target=_watch_progress, args=(ctx.store.clone(), world, display, stop),
                                       daemon=True)
            watcher.start()
            try:
                devices, pairs = profile_rank(opts, setup, board=board, links=links, display=display)
            finally:
                stop.set()
                watcher.join()
                for r in range(world):
                    if board.has(f"progress/{r}"):
                        display.device(r, *json.loads(ctx.store.get(f"{KEY}progress/{r}")))
        return _finish(args, devices, pairs, merge)
    except BaseException as e:
        try:
            board.put("error", f"rank {rank}: {type(e).__name__}: {e}")
        except Exception:
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _finish(args, devices: list[dict], pairs: list[dict], merge) -> int:
    """Rank 0: assemble, validate, write, show."""
    import torch

    from partitioner.validate import cluster_from_dict

    out = Path(args.out)
    cluster = cluster_dict(devices, pairs, name=args.cluster_name or out.stem,
                           links_emulated=any(p.get("emulated") for p in pairs), merge=merge)

    cluster["profiled"] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__, "hostname": socket.gethostname()}
    cluster_from_dict(cluster, source=str(out))  # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cluster, indent=1) + "\n")
    _print_summary(cluster, _graph_or_none(args))
    print(f"wrote {out}: {len(cluster['devices'])} devices, {len(cluster['links']['pairs'])} links"
          + (" (EMULATED knobs used)" if any(d.get("emulation") for d in cluster["devices"])
             or any(p.get("emulated") for p in cluster["links"]["pairs"]) else ""))
    return 0


def _graph_or_none(args):
    """The block graph of the profiled model and workload, for the summary's per-request figure."""
    from adaptlink.model.graph import build_graph

    try:
        return build_graph(args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
                           images_per_request=args.images, dtype=args.dtype)
    except Exception as e:  # the summary must not fail a profile that was written
        log.warning("no per-request prediction in the summary: %s", e)
        return None


def _print_summary(cluster: dict, graph=None) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 160
    for t in summary_tables(cluster, graph):
        console.print(t)


def _child_main() -> int:
    """Entry of a rank started by `--local` (runtime.launcher sets RANK, WORLD_SIZE, ...)."""
    import argparse

    ns = argparse.Namespace(**json.loads(os.environ["ADAPTLINK_PROFILE_ARGS"]))
    ns.local = None
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{os.environ.get('RANK')} %(name)s: %(message)s")
    try:
        opts = _options(ns)
        from partitioner.validate import load_cluster

        merge = load_cluster(ns.merge) if ns.merge else None
        return _run_distributed(ns, opts, merge)
    except AdaptLinkError as e:
        print(f"adaptlink profile (rank {os.environ.get('RANK')}): error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_child_main())
