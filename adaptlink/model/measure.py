"""Measuring blocks: timed runs on synthetic inputs, the runtime's warm-up, usable memory, and
the per-request prediction from a measurement. The model layer's part of `adaptlink profile`
(the ranks and links: `runtime.profiling`; the command: `adaptlink.profiler`).

- compute: one representative block of each kind (`REPRESENTATIVE`), built at the model's
  real size with seeded random weights (so a 7B layer needs no 7B of weights and no
  download; of a checkpoint directory only config.json is read), on the rank's torch
  device, dtype and thread count. A layer kind (vision and decoder layers) is timed run
  back to back over several distinct layers (up to `cycle_bytes` of weights, at most as
  many as the model has), as a stage runs them: one layer timed alone again and again
  would run from cache and read too fast. Its time is per layer. Prefill at S tokens (and
  the request's images for vision kinds) and one decode step at context C (a KV cache of
  C-1 random positions). Each: warm-up, then repetitions (at least `min_repeats`, at most
  `repeats`, stopping once `budget_s` is spent); the median is kept and the spread
  `(max - min) / median` recorded. Ranks on one host take turns run by run (`turns`), so
  that no measurement competes with another rank's and all see the same background load.
- memory: free memory (`psutil` available RAM, or `torch.cuda.mem_get_info`) minus a
  reserve (default `max(1 GiB, 10% of total)`), divided among the ranks of this host that
  use the same torch device. Measured before any block is built.
- prediction: `predict_request_s` sums the planner's own rule (`partitioner.costs.measured_seconds`)
  over a block graph, so the profile's summary and experiments/profile_predict.py check what
  the planner will use.

Under a slowdown the blocks run padded (`adaptlink.model.emulation.DeadlinePadder`):
`prefill_s`/`decode_s` stay the device's own times, which the planner multiplies by
`slowdown`, and `emulated_prefill_s`/`emulated_decode_s` are the padded times observed.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from adaptlink.model.blocks import LlavaBlocks, Step
from adaptlink.model.config import PRESET_PREFIX, ModelInfo, load_config
from adaptlink.model.emulation import DeadlinePadder, fmt_bytes, parse_bytes
from adaptlink.model.graph import block_ids as all_block_ids
from adaptlink.model.microbatch import MicroBatch, Row
from partitioner.costs import measured_seconds, table_seconds
from partitioner.errors import AdaptLinkError
from partitioner.types import Workload
from partitioner.vocab import (BLOCK_KINDS, LAYER_KINDS, PROFILE_ROWS, VISION_KINDS, block_index, block_kind,
                               mean_decode_context)

REPRESENTATIVE = {"vision_embed": "vision.embed", "vision_layer": "vision.layer.0",
                  "projector": "projector", "text_embed": "text.embed", "merge": "merge",
                  "decoder_layer": "decoder.layer.0", "head": "head"}
CYCLE_BYTES = 1 << 30
MIN_RESERVE = 1 << 30


class ProfileError(AdaptLinkError):
    """Profiling options that cannot work, or a rank of the run that failed."""


@dataclass(kw_only=True, slots=True)
class MeasureOptions:
    """How to measure the blocks; the same on every rank."""

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
    kinds: tuple[str, ...] = BLOCK_KINDS
    warmup: int = 1
    repeats: int = 7
    min_repeats: int = 3
    budget_s: float = 10.0
    """Stop repeating one measurement after this many seconds (once min_repeats are done)."""
    seed: int = 0
    rows: tuple[int, ...] = PROFILE_ROWS
    """Decode rows per micro-batch each text kind is timed at (`decode_s_by_rows`), through
    the runtime's batched path (`LlavaBlocks.run_batch`); empty: one row, the one-request
    path (`run_many`), as a cluster/1 profile."""
    prefill_counts: tuple[int, ...] | None = None
    """Prompt tokens each text kind's prefill is timed at (`prefill_s_by_tokens`); default
    S/4, S/2 and S."""
    cycle_bytes: int = CYCLE_BYTES
    """Layer kinds are timed run back to back over this many bytes of distinct copies (at most
    the model's count of that kind), so their weights come from memory as in a stage."""

    def __post_init__(self):
        if self.decode_context is None:
            self.decode_context = mean_decode_context(self.prefill_tokens, self.decode_tokens)
        unknown = [k for k in self.kinds if k not in BLOCK_KINDS]
        if unknown:
            raise ProfileError(f"--kinds: unknown kinds {unknown}; kinds are {', '.join(BLOCK_KINDS)}")
        for name in ("prefill_tokens", "decode_context", "repeats", "min_repeats"):
            if getattr(self, name) < 1:
                raise ProfileError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.prefill_counts is None:
            self.prefill_counts = tuple(sorted({max(1, self.prefill_tokens // 4), max(1, self.prefill_tokens // 2),
                                               self.prefill_tokens}))
        if any(r < 1 for r in self.rows) or any(n < 1 for n in self.prefill_counts):
            raise ProfileError(f"--rows and --prefill-counts must be >= 1, got {list(self.rows)}, "
                               f"{list(self.prefill_counts)}")
        if self.images < 0 or self.warmup < 0:
            raise ProfileError(f"--images and --warmup must be >= 0, got {self.images}, {self.warmup}")


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


def _random_inputs(g: torch.Generator, device, dtype, vocab_size: int, image_token_id: int):
    """(rnd(*shape), ids(n)) drawing from `g`: random activations in `dtype` on `device`, and
    `[1, n]` random token ids, none of them the image token."""

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def ids(n):
        x = torch.randint(0, vocab_size, (1, n), generator=g)
        x[x == image_token_id] = 0
        return x.to(device)

    return rnd, ids


def _cases(blocks, opts: MeasureOptions, device, copies: dict[str, list[str]]):
    """(kind, phase, setup) for every measurement; setup() -> (block ids, inputs, step): the
    block ids (`copies[kind]`) run one after another, each on what the one before produced."""
    cfg, info = blocks.config, blocks.info
    vc, tc = cfg.vision_config, cfg.text_config
    dt = blocks.dtype
    S, C, n_img = opts.prefill_tokens, opts.decode_context, opts.images
    n_vis = info.vision_tokens
    g = torch.Generator().manual_seed(opts.seed)

    rnd, ids = _random_inputs(g, device, dt, tc.vocab_size, info.image_token_id)

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
        # LLaVA-NeXT: each image is its tiles (ModelInfo's representative size) plus its image_sizes
        tiles = n_img * info.tiles_per_image
        sizes = {"image_sizes": torch.tensor([list(info.image_size)[::-1]] * n_img, device=device)} \
            if info.next else {}
        if kind == "vision_embed":
            x = {"pixel_values": rnd(tiles, 3, vc.image_size, vc.image_size), **sizes}
        elif kind == "vision_layer":
            x = {"vision_hidden": rnd(tiles, n_vis, vc.hidden_size)}
        elif kind == "projector":
            x = {f"vision_feat.{k}": rnd(tiles, n_vis, vc.hidden_size) for k in info.feature_picks} | sizes
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


def _batched_cases(blocks, opts: MeasureOptions, device, copies: dict[str, list[str]]):
    """(kind, (phase, count), setup) for the text kinds through the runtime's batched path:
    setup() -> (block ids, micro-batch, inputs, KV store) for `LlavaBlocks.run_batch`.

    - ("prefill", n): one row of a prompt of n tokens at position 0 (the image tokens, as
      many of them as fit, in it for merge), into an empty KV store;
    - ("decode", R): R rows of one token each, every row holding a history of C - 1 tokens
      (random keys and values written to the store once; each run adds one token to each
      row, so the context drifts by the number of runs, a few tokens)."""
    cfg, info = blocks.config, blocks.info
    tc = cfg.text_config
    dt = blocks.dtype
    C = opts.decode_context
    g = torch.Generator().manual_seed(opts.seed + 1)
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads

    rnd, ids = _random_inputs(g, device, dt, tc.vocab_size, info.image_token_id)

    for kind in opts.kinds:
        if kind in VISION_KINDS:
            continue
        b = copies[kind]
        layers = [block_index(c) for c in b] if kind == "decoder_layer" else []
        for n in opts.prefill_counts:
            image = kind == "merge" and opts.images > 0 and n >= opts.images * info.image_tokens
            if kind == "text_embed":
                x = {"input_ids": ids(n)}
            elif kind == "merge":
                tok = ids(n)
                x = {"inputs_embeds": rnd(1, n, tc.hidden_size)}
                if image:
                    tok[0, :opts.images * info.image_tokens] = info.image_token_id
                    x["image_features"] = rnd(opts.images * info.image_tokens, tc.hidden_size)
                x["input_ids"] = tok
            else:
                x = {"hidden": rnd(1, n, tc.hidden_size)}
            mb = MicroBatch.of(Row("p", 0, 0, n, image))
            yield kind, ("prefill", n), (lambda b=b, mb=mb, x=x, layers=layers:
                                         (b, mb, x, blocks.new_kv_store(layers=layers) if layers else None))
        for R in opts.rows:
            if kind == "text_embed":
                x = {"input_ids": ids(R)}
            elif kind == "merge":
                x = {"inputs_embeds": rnd(1, R, tc.hidden_size), "input_ids": ids(R)}
            else:
                x = {"hidden": rnd(1, R, tc.hidden_size)}
            kv = None
            if layers:
                kv = blocks.new_kv_store(layers=layers)
                k, v = rnd(1, tc.num_key_value_heads, C - 1, hd), rnd(1, tc.num_key_value_heads, C - 1, hd)
                for r in range(R):
                    kv.begin(r, 0, C - 1)
                    for i in layers:
                        kv.append(r, i, k, v)
                    kv.commit(r)

            def setup(b=b, x=x, kv=kv, R=R):
                pos = [kv.tokens(r) if kv is not None else C - 1 for r in range(R)]
                return b, MicroBatch.of(*(Row(r, 0, pos[r], 1) for r in range(R))), x, kv
            yield kind, ("decode", R), setup


def measure_compute(opts: MeasureOptions, *, device: str = "cpu", slowdown: float = 1.0, config=None,
                    on_progress: Callable[[int, int, str], None] | None = None, turns=None) -> dict:
    """The `compute.measured` object of one device: one representative block per kind.

    Every step (building the blocks, each case's warm-up, each timed run) happens inside
    `with turns():`. Ranks that share a machine pass turns that make them take those steps
    one rank after the other (`runtime.profiling.HostTurns`), so that each runs alone and all
    of them see the same background load: the ratios between devices stay right on a busy
    machine. `turns.agree(name, value)` returns the first rank's value, so all do as many runs.
    """
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
        copies = layer_copies(blocks, opts)
        blocks.add(source, [b for ids in copies.values() for b in ids], seed=opts.seed)
        batched = bool(opts.rows)
        cases = [(kind, phase, blocks.run_many, setup) for kind, phase, setup in _cases(blocks, opts, device, copies)
                 if not batched or kind in VISION_KINDS]
        if batched:
            cases += [(kind, phase, blocks.run_batch, setup)
                      for kind, phase, setup in _batched_cases(blocks, opts, device, copies)]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    padder = DeadlinePadder(slowdown, sync=sync)
    out: dict[str, dict] = {}
    for i, (kind, phase, runner, setup) in enumerate(cases):
        what = phase if isinstance(phase, str) else f"{phase[0]} {phase[1]} {'rows' if phase[0] == 'decode' else 'tokens'}"
        progress(i, len(cases), f"{kind} {what}")
        n = len(copies[kind])
        runs = opts.repeats
        if opts.warmup:
            with turns():
                t0 = time.perf_counter()
                for _ in range(opts.warmup):
                    runner(*setup())
                    if sync:
                        sync()
                one = (time.perf_counter() - t0) / opts.warmup
            runs = max(opts.min_repeats, min(opts.repeats, int(opts.budget_s / max(one, 1e-9))))
        timing = Timing()
        for _ in range(turns.agree(f"runs/{i}", runs)):
            with turns():  # padded to `slowdown` x the fastest run of this shape, as the runtime pads
                padder.run(runner, *setup(), key=(kind, phase))
            timing.compute_s.append(padder.stats.last_compute_s / n)
            timing.total_s.append(padder.stats.last_total_s / n)
        entry = out.setdefault(kind, {"block": copies[kind][0], "prefill_s": 0.0, "decode_s": 0.0})
        if n > 1:
            entry["copies"] = n
        if isinstance(phase, str):
            name = phase
        else:  # a table entry; the table's own prompt length / one row are the scalar figures
            name, count = phase
            table = entry.setdefault(f"{name}_s_by_{'rows' if name == 'decode' else 'tokens'}", {})
            table[str(count)] = timing.median_s
            entry.setdefault(f"{name}_spreads", {})[str(count)] = round(timing.spread, 4)
            if padder.active:
                entry.setdefault(f"emulated_{name}_s_by_{'rows' if name == 'decode' else 'tokens'}",
                                 {})[str(count)] = timing.padded_median_s
            if count != (1 if name == "decode" else opts.prefill_tokens):
                continue
        entry[f"{name}_s"] = timing.median_s
        entry[f"{name}_spread"] = round(timing.spread, 4)
        entry[f"{name}_repeats"] = len(timing.compute_s)
        if padder.active:
            entry[f"emulated_{name}_s"] = timing.padded_median_s
    for entry in out.values():
        spreads = [entry.get("prefill_spread", 0.0), entry.get("decode_spread", 0.0)]
        spreads += [v for k in ("prefill_spreads", "decode_spreads") for v in entry.get(k, {}).values()]
        entry["spread"] = max(spreads)
    for entry in out.values():  # scalar figures not measured as such: from the tables' rule
        if "decode_s_by_rows" in entry and "decode_repeats" not in entry:
            entry["decode_s"] = table_seconds(entry["decode_s_by_rows"], 1)[0]
        if "prefill_s_by_tokens" in entry and "prefill_repeats" not in entry:
            entry["prefill_s"] = table_seconds(entry["prefill_s_by_tokens"], opts.prefill_tokens)[0]
    progress(len(cases), len(cases), "done")
    return {"model": opts.model, "dtype": opts.dtype, "prefill_tokens": opts.prefill_tokens,
            "decode_context": opts.decode_context, "images_per_request": opts.images,
            "method": (f"median of {opts.min_repeats}-{opts.repeats} runs (as many as fit "
                       f"{opts.budget_s:g} s) after {opts.warmup} warm-up, random-weight blocks at full "
                       f"size: one per kind; a layer kind run back to back over `copies` distinct "
                       f"layers (up to {fmt_bytes(opts.cycle_bytes)} of weights), time per layer; "
                       f"spread = (max - min) / median"
                       + (f"; text kinds through the batched path (LlavaBlocks.run_batch): one prompt of "
                          f"{list(opts.prefill_counts)} tokens, one decode step of {list(opts.rows)} rows"
                          if batched else "")),
            "blocks": out}


def layer_copies(blocks, opts: MeasureOptions) -> dict[str, list[str]]:
    """The block ids each kind is timed over: its representative alone, or for a layer kind
    the model's first layers of that kind, as many as fit `cycle_bytes` (one at least).

    A block timed alone, again and again, runs from cache if its weights fit there, while a
    stage runs its layers back to back and reads each one's weights from memory: a 30M-
    parameter model's decoder layer measured 1.01 ms per decode step repeated alone and
    1.55 ms run in turn with the 7 others (experiments/profile_predict.py). Run back to back,
    the copies also share one step's rope and mask, as the layers of a stage do."""
    out = {k: [REPRESENTATIVE[k]] for k in opts.kinds}
    for kind in set(opts.kinds) & set(LAYER_KINDS):
        nbytes = blocks.param_bytes([REPRESENTATIVE[kind]])
        ids = [b for b in all_block_ids(blocks.info) if block_kind(b) == kind]
        out[kind] = ids[:max(1, min(len(ids), opts.cycle_bytes // max(nbytes, 1)))]
    return out


def warm_up(blocks, block_ids: list[str] | None = None, *, prefill_tokens: int = 8) -> float:
    """Run each held block once on synthetic inputs (a short prefill, one decode step; vision
    blocks on one image), so that the first request served does not pay first-call costs
    (allocator, kernel set-up). Returns the seconds it took; outputs are discarded."""
    ids = blocks.block_ids if block_ids is None else block_ids
    t0 = time.perf_counter()
    by_kind: dict[str, list[str]] = {}
    for b in ids:
        by_kind.setdefault(block_kind(b), []).append(b)
    vision = tuple(k for k in VISION_KINDS if k in by_kind)
    text = tuple(k for k in BLOCK_KINDS if k in by_kind and k not in VISION_KINDS)
    for kinds, images in ((vision, 1), (text, 0)):
        if not kinds:
            continue
        opts = MeasureOptions(model="warm-up", prefill_tokens=prefill_tokens, decode_tokens=2,
                              images=images, kinds=kinds)
        for _kind, _phase, setup in _cases(blocks, opts, blocks.device, by_kind):
            blocks.run_many(*setup())
    if blocks.device.type == "cuda":
        torch.cuda.synchronize(blocks.device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- memory


def usable_memory(torch_device: str, reserve: str | None = None, shared_by: int = 1) -> dict:
    """Usable bytes of a device now: free minus the reserve, split among `shared_by` ranks."""
    dev = torch.device(torch_device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        source = "torch.cuda.mem_get_info"
    else:
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


# ---------------------------------------------------------------------------- prediction


def predict_request_s(measured: dict, graph, decode_tokens: int | None = None, slowdown: float = 1.0) -> float:
    """Seconds one request takes with every block of `graph` run one after another on the
    measured device: sum over blocks of prefill + T * decode, each block's times by the
    planner's rule (`partitioner.costs.measured_seconds`: prefill scaled from the measured
    to the graph's prompt length, vision kinds by images)."""
    g = graph.graph
    T = g["decode_tokens"] if decode_tokens is None else decode_tokens
    workload = Workload(prefill_tokens=g["prefill_tokens"], decode_tokens=T,
                        images_per_request=g["images_per_request"])
    total = 0.0
    for b in graph.nodes:
        kind = graph.nodes[b]["kind"]
        if kind not in measured["blocks"]:
            raise ProfileError(f"no measured time for {kind} blocks (profile with that kind)")
        prefill_s, decode_s = measured_seconds(measured, kind, workload)
        total += prefill_s + T * decode_s
    return total * slowdown
