"""The work of `adaptlink profile` (usage: `adaptlink.profiler`, which registers the command
and imports this module only when it runs, since this one imports torch).

- `ProfileRun`: the run's options, typed, from the command line (`from_args`) to every rank;
  a `--local` child gets them as JSON in ADAPTLINK_PROFILE_ARGS (`to_json`/`from_dict`).
- the ways to run: this machine alone (one process), `--local N` ranks started here
  (`runtime.launcher`), or one rank of a torchrun (`runtime.profiling.run_rank`).
- rank 0: cluster.json assembled (`cluster_dict`), validated, written, and shown (rich).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adaptlink.model.emulation import fmt_bytes, fmt_rate, parse_bytes
from adaptlink.model.graph import build_graph
from adaptlink.model.measure import ProfileError, predict_request_s
from partitioner.errors import AdaptLinkError
from partitioner.validate import cluster_from_dict, load_cluster
from partitioner.vocab import BLOCK_KINDS, CLUSTER_SCHEMA, PROFILE_ROWS, VISION_KINDS
from runtime.launcher import launch_local
from runtime.profiling import LINK_SIZES, ProfileOptions, RankSetup, profile_rank, run_rank
from runtime.transport import link_emulation

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- options


def _counts(text: str | None, flag: str, default):
    """A comma-separated list of positive counts; 'none': an empty one; None: `default`."""
    if text is None:
        return default
    if text.strip() == "none":
        return ()
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ProfileError(f"{flag}: must be positive integers separated by commas, got {text!r}") from None
    if any(n < 1 for n in out):
        raise ProfileError(f"{flag}: must be positive integers, got {text!r}")
    return out


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


@dataclass(kw_only=True, slots=True)
class ProfileRun:
    """One `adaptlink profile` run: what to measure, and each rank's knobs as given (one value
    for every rank or one per rank, resolved by `setup` once a rank knows its number)."""

    ENV: ClassVar[str] = "ADAPTLINK_PROFILE_ARGS"
    """Where a `--local` child finds the run (`to_json`)."""

    options: ProfileOptions
    out: str = "cluster.json"
    """Where rank 0 writes cluster.json."""
    cluster_name: str | None = None
    """Default: the stem of `out`."""
    merge: str | None = None
    """A validated cluster.json whose devices and links are added to the profile."""
    names: str | None = None
    device: str | None = None
    threads: str | None = None
    slowdown: str = "1"
    memory_cap: str = "none"
    link_bandwidth: str | None = None
    link_latency: str | None = None
    verbose: bool = False

    @classmethod
    def from_args(cls, args) -> "ProfileRun":
        """From the parsed `adaptlink profile` command line (`adaptlink.profiler.add_parser`)."""
        opts = ProfileOptions(
            model=args.model, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens,
            decode_context=args.decode_context, images=args.images, dtype=args.dtype,
            kinds=tuple(args.kinds.split(",")) if args.kinds else BLOCK_KINDS, warmup=args.warmup,
            repeats=args.repeats, min_repeats=min(args.min_repeats, args.repeats), budget_s=args.budget,
            seed=args.seed, cycle_bytes=parse_bytes(args.cycle_bytes, "--cycle-bytes"),
            memory_reserve=args.memory_reserve,
            link_sizes=tuple(parse_bytes(s, "--link-sizes") for s in args.link_sizes.split(","))
            if args.link_sizes else LINK_SIZES,
            link_repeats=args.link_repeats, timeout_s=args.timeout,
            rows=_counts(getattr(args, "rows", None), "--rows", PROFILE_ROWS),
            prefill_counts=_counts(getattr(args, "prefill_counts", None), "--prefill-counts", None))
        return cls(options=opts, out=args.out, cluster_name=args.cluster_name, merge=args.merge,
                   names=args.names, device=args.device, threads=args.threads, slowdown=args.slowdown,
                   memory_cap=args.memory_cap, link_bandwidth=args.link_bandwidth,
                   link_latency=args.link_latency, verbose=bool(getattr(args, "verbose", False)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileRun":
        """The inverse of `to_json` (after json.loads)."""
        o = dict(d["options"])
        o["kinds"], o["link_sizes"], o["rows"] = tuple(o["kinds"]), tuple(o["link_sizes"]), tuple(o["rows"])
        o["prefill_counts"] = tuple(o["prefill_counts"])
        return cls(**{**d, "options": ProfileOptions(**o)})

    def setup(self, rank: int, world: int, local_rank: int) -> RankSetup:
        """This rank's device and emulation knobs (ProfileError on a bad value)."""
        dev = _per_rank(self.device, world, "--device")[rank]
        if dev is None:
            dev = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        name = _per_rank(self.names, world, "--names")[rank] or f"{'gpu' if dev.startswith('cuda') else 'cpu'}{rank}"
        threads = _per_rank(self.threads, world, "--threads")[rank]
        try:
            threads = int(threads) if threads else None
            slowdown = float(_per_rank(self.slowdown, world, "--slowdown")[rank])
        except ValueError as e:
            raise ProfileError(f"--threads/--slowdown: {e}") from None
        if slowdown < 1:
            raise ProfileError(f"--slowdown: {slowdown} for rank {rank}: must be >= 1")
        cap = _per_rank(self.memory_cap, world, "--memory-cap")[rank]
        cap_b = None if cap in (None, "", "none") else parse_bytes(cap, "--memory-cap")
        return RankSetup(name=name, torch_device=dev, threads=threads, slowdown=slowdown, memory_cap_bytes=cap_b)

    def links(self, world: int):
        """The transport's link emulation of `--link-bandwidth`/`--link-latency`, or None."""
        return link_emulation(self.link_bandwidth, self.link_latency, world)


# ---------------------------------------------------------------------------- cluster.json


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


def summary_tables(cluster: dict, graph=None):
    """Rich tables of a cluster dict: devices, per-kind times (kinds as rows, devices as
    columns), links. With the model's block `graph`, also each device's predicted seconds
    for one whole request run alone on it (`predict_request_s`, slowdown included)."""
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
    for k in BLOCK_KINDS:
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


def print_summary(cluster: dict, graph=None) -> None:
    console = Console()
    if not console.is_terminal:
        console.width = 160
    for t in summary_tables(cluster, graph):
        console.print(t)


# ---------------------------------------------------------------------------- the command


def cmd_profile(args) -> int:
    """`adaptlink profile`: check a cluster.json, or profile alone, `--local N`, or as a torchrun rank."""
    if args.check:
        cluster = load_cluster(args.check)
        print_summary(cluster.to_dict())
        schema = json.loads(Path(args.check).read_text()).get("schema")
        print(f"{args.check}: valid {schema}, {len(cluster.devices)} devices"
              + ("" if schema == CLUSTER_SCHEMA else f" (read as {CLUSTER_SCHEMA}: costs at B rows are "
                                                      f"B x one row's; re-profile for a rows table)"))
        return 0
    if not args.model:
        raise ProfileError("profile: --model is required (or --check FILE)")
    run = ProfileRun.from_args(args)
    merge = load_cluster(run.merge) if run.merge else None
    if args.local:
        return launch_local_ranks(run, args.local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "RANK" in os.environ:
        return run_distributed(run, merge)
    setup = run.setup(0, 1, 0)
    run.links(1)  # validate the option anyway
    with Display([setup.name], with_links=False) as display:
        devices, pairs = profile_rank(run.options, setup, display=display)
    return finish(run, devices, pairs, merge)


def launch_local_ranks(run: ProfileRun, n: int) -> int:
    """`--local N`: start N ranks of this command here (`python -m adaptlink.profiler`)."""
    if n < 1:
        raise ProfileError(f"--local: must be >= 1, got {n}")
    threads = _per_rank(run.threads, n, "--threads")
    default = max(1, (os.cpu_count() or 1) // n)
    threads = [int(t) if t else default for t in threads]
    for i in range(n):  # option errors here, not in N children
        run.setup(i, n, i)
    run.links(n)
    result = launch_local([sys.executable, "-m", "adaptlink.profiler"], n, threads=threads,
                          env={ProfileRun.ENV: run.to_json()}, timeout_s=run.options.timeout_s + 60)
    if not result.ok:
        bad = {r: rc for r, rc in result.returncodes.items() if rc != 0}
        raise ProfileError(f"--local {n}: profiling failed (rank exit codes {bad}"
                           f"{', timed out' if result.timed_out else ''})")
    return 0


def run_distributed(run: ProfileRun, merge) -> int:
    """One rank of a run started by torchrun or by `--local`; rank 0 writes cluster.json."""
    return run_rank(run.options, run.setup, run.links,
                    open_display=lambda names: Display(names, with_links=True),
                    finish=lambda devices, pairs: finish(run, devices, pairs, merge))


def finish(run: ProfileRun, devices: list[dict], pairs: list[dict], merge) -> int:
    """Rank 0: assemble, validate, write, show."""
    out = Path(run.out)
    cluster = cluster_dict(devices, pairs, name=run.cluster_name or out.stem,
                           links_emulated=any(p.get("emulated") for p in pairs), merge=merge)

    cluster["profiled"] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__, "hostname": socket.gethostname()}
    cluster_from_dict(cluster, source=str(out))  # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cluster, indent=1) + "\n")
    print_summary(cluster, _graph_or_none(run.options))
    print(f"wrote {out}: {len(cluster['devices'])} devices, {len(cluster['links']['pairs'])} links"
          + (" (EMULATED knobs used)" if any(d.get("emulation") for d in cluster["devices"])
             or any(p.get("emulated") for p in cluster["links"]["pairs"]) else ""))
    return 0


def _graph_or_none(opts: ProfileOptions):
    """The block graph of the profiled model and workload, for the summary's per-request figure."""
    try:
        return build_graph(opts.model, prefill_tokens=opts.prefill_tokens, decode_tokens=opts.decode_tokens,
                           images_per_request=opts.images, dtype=opts.dtype)
    except Exception as e:  # the summary must not fail a profile that was written
        log.warning("no per-request prediction in the summary: %s", e)
        return None


def child_main() -> int:
    """Entry of a rank started by `--local` (runtime.launcher sets RANK, WORLD_SIZE, ...)."""
    data = json.loads(os.environ[ProfileRun.ENV])
    logging.basicConfig(level=logging.DEBUG if data.get("verbose") else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{os.environ.get('RANK')} %(name)s: %(message)s")
    try:
        run = ProfileRun.from_dict(data)
        merge = load_cluster(run.merge) if run.merge else None
        return run_distributed(run, merge)
    except AdaptLinkError as e:
        print(f"adaptlink profile (rank {os.environ.get('RANK')}): error: {e}", file=sys.stderr)
        return 2
