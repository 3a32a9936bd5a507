"""The partitioner's data: devices and links in, a frozen `Plan` out; one class per contract.

`Cluster` is cluster.json parsed and validated (see `partitioner.validate.load_cluster`);
`Plan` is plan.json: what every rank reads, and all it reads. Both are plain data with
explicit `to_dict`/`from_dict`; the dict fields inside them (compute profiles, emulation,
predictions) are copies and must be treated as read-only. `Link`, `Links`, `Emulation`
and `Workload` are the typed contracts the other layers use (the runtime's transport
shapes its links with this `Link`; the model layer's graph is built for this `Workload`).

Imports go one way: types -> checks (the field checks, which build nothing) -> vocab;
`partitioner.validate` builds a `Cluster` from here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.checks import Checker, check_links, check_plan_dict
from partitioner.errors import PlanError
# BLOCK_KINDS and LAYER_KINDS are re-exported for the tests that import them from here; the
# block vocabulary itself is partitioner.vocab's (import it from there).
from partitioner.vocab import (BLOCK_KINDS, CLUSTER_SCHEMA, DTYPE_BYTES, LAYER_KINDS, PLAN_SCHEMA,
                               mean_decode_context)

__all__ = ["Link", "Links", "Emulation", "Device", "Cluster", "Workload", "Backup", "Stage", "Plan",
           "canonical_json", "plan_hash", "load_plan", "save_plan", "BLOCK_KINDS", "LAYER_KINDS"]


# ----------------------------------------------------------------------------------------------
# cluster.json


@dataclass(frozen=True)
class Link:
    """One direction of a network path between two devices: what the planner costs with,
    and what the runtime's transport enforces on an emulated link (`runtime.transport.LinkEmulation`)."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0
    emulated: bool = False
    emulated_as: dict | None = field(default=None, hash=False)
    """On a profiled emulated link: `{"bandwidth_bytes_per_s", "latency_s"}` that the
    transport was asked to enforce (runtime.transport.LinkEmulation enforces these, not the
    measured figures above, which the planner costs with). None elsewhere."""

    def __post_init__(self):
        if not self.bandwidth_bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(f"link needs bandwidth > 0 and latency >= 0, got "
                             f"{self.bandwidth_bytes_per_s} B/s, {self.latency_s} s")

    def seconds(self, nbytes: float, messages: float = 1) -> float:
        """Time to send `nbytes` in `messages` messages (each pays the latency once)."""
        return nbytes / self.bandwidth_bytes_per_s + messages * self.latency_s

    def to_dict(self) -> dict:
        """A `links` entry of cluster.json / plan.json (`emulated`, `emulated_as` when set)."""
        out: dict[str, Any] = {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}
        if self.emulated:
            out["emulated"] = True
        if self.emulated_as is not None:
            out["emulated_as"] = copy.deepcopy(self.emulated_as)
        return out


@dataclass(frozen=True)
class Links:
    """The `links` object of cluster.json and plan.json: a default and per-direction pairs.
    `link(a, b)` is the path from a to b."""

    default: Link
    pairs: dict = field(default_factory=dict, hash=False)
    """(src, dst) -> Link; a pair given one way applies both ways unless the other is given."""

    def link(self, src: str, dst: str) -> Link:
        return self.pairs.get((src, dst), self.default)

    @property
    def emulated(self) -> bool:
        return self.default.emulated or any(l.emulated for l in self.pairs.values())

    def to_dict(self) -> dict:
        """One entry per direction given, with every field the runtime reads."""
        return {"default": self.default.to_dict(),
                "pairs": [{"src": s, "dst": t, **l.to_dict()} for (s, t), l in sorted(self.pairs.items())]}

    @classmethod
    def parse(cls, c: Checker, d: dict, seen: Mapping[str, int]) -> "Links":
        """Check (`partitioner.checks.check_links`: errors through `c`) and build."""
        default, pairs = check_links(c, d, seen)
        return cls(Link(**default), {k: Link(**v) for k, v in pairs.items()})

    @classmethod
    def from_dict(cls, d: Any, names: list[str], source: str = "plan.json",
                  error: type[Exception] = PlanError) -> "Links":
        """A `links` object among the devices `names` (plan.json's `links`, for one)."""
        c = Checker(source, error)
        return cls.parse(c, c.obj(d, "links"), {n: i for i, n in enumerate(names)})


@dataclass(frozen=True)
class Emulation:
    """A device's `emulation` object: `{"slowdown": k, "memory_cap_bytes": n or None}`."""

    slowdown: float = 1.0
    memory_cap_bytes: int | None = None

    @classmethod
    def of(cls, d: Mapping | None) -> "Emulation":
        """From cluster.json's / plan.json's `emulation` (None: a real device)."""
        d = d or {}
        cap = d.get("memory_cap_bytes")
        return cls(float(d.get("slowdown") or 1.0), int(cap) if cap else None)

    def usable_bytes(self, memory_bytes: int) -> int:
        """What a device of `memory_bytes` may fill: that, or the emulated cap where lower."""
        return memory_bytes if self.memory_cap_bytes is None else min(memory_bytes, self.memory_cap_bytes)


@dataclass(frozen=True)
class Device:
    """One device of cluster.json: where it runs, its memory, and how fast it computes."""

    name: str
    memory_bytes: int
    """Usable memory, reserve already taken off."""
    compute: dict = field(default_factory=dict, hash=False)
    """`{"measured": {...}, "roofline": {...}}` as in cluster.json (either or both)."""
    host: str = "127.0.0.1"
    torch_device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    emulation: dict | None = field(default=None, hash=False)
    """`{"slowdown": k, "memory_cap_bytes": n or None}`; None for a real device."""
    index: int = 0
    """Position in cluster.json's `devices` (for error messages)."""

    @staticmethod
    def usable_bytes(memory_bytes: int, emulation: Mapping | None) -> int:
        """The memory rule: what a device (or a plan's stage) of `memory_bytes` with this
        `emulation` object may fill: memory_bytes, or the emulated cap where lower."""
        return Emulation.of(emulation).usable_bytes(memory_bytes)

    @property
    def slowdown(self) -> float:
        return Emulation.of(self.emulation).slowdown

    @property
    def capacity_bytes(self) -> int:
        """What the planner may fill: memory_bytes, or the emulated cap where lower."""
        return Device.usable_bytes(self.memory_bytes, self.emulation)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict:
        return {"name": self.name, "host": self.host, "torch_device": self.torch_device,
                "dtype": self.dtype, "threads": self.threads, "memory_bytes": self.memory_bytes,
                "compute": copy.deepcopy(self.compute), "emulation": copy.deepcopy(self.emulation)}


@dataclass(frozen=True)
class Cluster:
    """Devices and the links between them. `link(a, b)` is the path from a to b."""

    name: str
    devices: tuple[Device, ...]
    links: Links
    source: str = "cluster.json"
    """The file it came from, for error messages."""

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def link(self, src: str, dst: str) -> Link:
        return self.links.link(src, dst)

    @property
    def default_link(self) -> Link:
        return self.links.default

    @property
    def pairs(self) -> dict:
        """(src, dst) -> Link; a pair given one way applies both ways unless the other is given."""
        return self.links.pairs

    def links_dict(self) -> dict:
        """The `links` object of cluster.json (one entry per direction given), with every
        field the runtime reads: `emulated` and `emulated_as` included."""
        return self.links.to_dict()

    def to_dict(self) -> dict:
        return {"schema": CLUSTER_SCHEMA, "name": self.name,
                "devices": [d.to_dict() for d in self.devices], "links": self.links_dict()}

    @property
    def emulated(self) -> bool:
        return any(d.emulation for d in self.devices) or self.links.emulated


# ----------------------------------------------------------------------------------------------
# plan.json


@dataclass(frozen=True)
class Workload:
    """The request mix a plan is sized for."""

    prefill_tokens: int = 640
    """Prompt tokens per request, image tokens included."""
    decode_tokens: int = 64
    """Generated tokens per request (decode steps)."""
    images_per_request: int = 1
    in_flight: int = 4
    """Requests in the pipeline at once: sizes the KV cache and the simulation (the model
    layer's graph, `adaptlink.model.graph.build_graph`, ignores it). A batch-planned plan
    has `batch_rows * micro_batches` of them."""
    batch_rows: int | None = None
    """B: rows (requests) per micro-batch the plan was costed at; None: a plan of one request
    per forward (plans before micro-batches), costed as B = 1."""
    micro_batches: int | None = None
    """M: micro-batches in the pipeline at once (>= its stages); None: `in_flight / B`."""

    def __post_init__(self):
        for name in ("prefill_tokens", "decode_tokens", "images_per_request"):
            if getattr(self, name) < 0 or (name == "prefill_tokens" and self.prefill_tokens < 1):
                raise ValueError(f"workload.{name}: must be positive, got {getattr(self, name)}")
        for name in ("batch_rows", "micro_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"workload.{name}: must be >= 1, got {v}")

    @property
    def rows(self) -> int:
        """B, rows per micro-batch the costs are for (1 for a plan without micro-batches)."""
        return self.batch_rows or 1

    @property
    def customers(self) -> int:
        """Micro-batches in flight: the units that circulate through the pipeline (each
        request alone when B = 1), what the closed-pipeline bound and the simulator count."""
        return self.micro_batches or max(1, math.ceil(self.in_flight / self.rows))

    @property
    def decode_context(self) -> int:
        """Context at which one decode step is costed: its mean over the request."""
        return mean_decode_context(self.prefill_tokens, self.decode_tokens)

    def to_dict(self) -> dict:
        d = {"prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens,
             "images_per_request": self.images_per_request, "in_flight": self.in_flight}
        for name in ("batch_rows", "micro_batches"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


@dataclass(frozen=True)
class Backup:
    """Blocks a device preloads so that it can take over `for_rank`'s share at once."""

    for_rank: int
    blocks: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"for_rank": self.for_rank, "blocks": list(self.blocks)}


@dataclass(frozen=True)
class Stage:
    """One device of the plan: how to start it, the blocks it runs (maybe none: a pure
    backup holder), the backups it preloads, and its predicted load."""

    rank: int
    name: str
    host: str
    torch_device: str
    dtype: str
    threads: int
    memory_bytes: int
    emulation: dict | None
    blocks: tuple[str, ...]
    backups: tuple[Backup, ...] = ()
    predicted: dict = field(default_factory=dict, hash=False)
    """busy_s_per_request, memory_bytes (used, backups included), memory breakdown, utilisation."""
    extra: dict = field(default_factory=dict, hash=False)
    """Fields of plan.json this version does not know; kept so the hash survives a round trip."""

    def to_dict(self) -> dict:
        return {**copy.deepcopy(self.extra),
                "rank": self.rank, "name": self.name, "host": self.host,
                "torch_device": self.torch_device, "dtype": self.dtype, "threads": self.threads,
                "memory_bytes": self.memory_bytes, "emulation": copy.deepcopy(self.emulation),
                "blocks": list(self.blocks), "backups": [b.to_dict() for b in self.backups],
                "predicted": copy.deepcopy(self.predicted)}


@dataclass(frozen=True)
class Plan:
    """plan.json: which device runs which blocks, who backs up whom, and what to expect.

    Ranks are 0..N-1 in `devices` order; `coordinator` (where requests arrive) holds
    `text.embed` and `head`.
    """

    model: dict
    """{"source": ..., "dtype": ...}"""
    workload: Workload
    method: str
    """ilp | uniform | memory | compute | chain-dp"""
    objective: str
    """throughput | latency"""
    solver: dict | None
    """{"name", "status", "objective", "bound", "gap", "seconds"} for the ILP, else None."""
    coordinator: int
    devices: tuple[Stage, ...]
    links: dict
    """As cluster.json's `links`."""
    predicted: dict
    """requests_per_s, tokens_per_s, latency_s, bottleneck, ..."""
    resilience: dict
    """mode, worst_single_dropout_requests_per_s, per-device dropouts, coordinator."""
    cost_model: dict | None = None
    """Per-block times and bytes per rank: what `simulate` needs, so plan.json stands alone."""
    extra: dict = field(default_factory=dict, hash=False)
    schema: str = PLAN_SCHEMA

    # -- access -----------------------------------------------------------------------------

    def device(self, rank: int) -> Stage:
        return self.devices[rank]

    def rank_of(self, name: str) -> int:
        for s in self.devices:
            if s.name == name:
                return s.rank
        raise KeyError(name)

    def block_ranks(self) -> dict[str, int]:
        """block id -> rank that runs it."""
        return {b: s.rank for s in self.devices for b in s.blocks}

    def backup_holder(self, rank: int) -> int | None:
        """The rank that preloads `rank`'s share, or None (the coordinator, or an empty share)."""
        for s in self.devices:
            for b in s.backups:
                if b.for_rank == rank:
                    return s.rank
        return None

    def after_dropout(self, rank: int) -> dict[str, int]:
        """block id -> rank once `rank` has dropped out and its backup holder took over."""
        holder = self.backup_holder(rank)
        if rank == self.coordinator or (holder is None and self.devices[rank].blocks):
            raise ValueError(f"rank {rank}'s share has no backup: its loss is not survived")
        return {b: (holder if r == rank else r) for b, r in self.block_ranks().items()}

    @property
    def emulated(self) -> bool:
        return any(s.emulation for s in self.devices)

    def link_table(self) -> Links:
        """`links` as a `Links` (device names are the stages')."""
        return Links.from_dict(self.links, [s.name for s in self.devices])

    # -- plan.json --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {**copy.deepcopy(self.extra),
             "schema": self.schema, "model": copy.deepcopy(self.model),
             "workload": self.workload.to_dict(), "method": self.method,
             "objective": self.objective, "solver": copy.deepcopy(self.solver),
             "coordinator": self.coordinator, "devices": [s.to_dict() for s in self.devices],
             "links": copy.deepcopy(self.links), "predicted": copy.deepcopy(self.predicted),
             "resilience": copy.deepcopy(self.resilience)}
        if self.cost_model is not None:
            d["cost_model"] = copy.deepcopy(self.cost_model)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan.json") -> "Plan":
        """Validate (errors name `source` and the field) and build."""
        check_plan_dict(d, source)
        known = {"schema", "model", "workload", "method", "objective", "solver", "coordinator",
                 "devices", "links", "predicted", "resilience", "cost_model"}
        stage_known = {"rank", "name", "host", "torch_device", "dtype", "threads", "memory_bytes",
                       "emulation", "blocks", "backups", "predicted"}
        w = d["workload"]
        stages = tuple(
            Stage(rank=s["rank"], name=s["name"], host=s.get("host", "127.0.0.1"),
                  torch_device=s["torch_device"], dtype=s["dtype"], threads=s["threads"],
                  memory_bytes=s["memory_bytes"], emulation=copy.deepcopy(s.get("emulation")),
                  blocks=tuple(s["blocks"]),
                  backups=tuple(Backup(b["for_rank"], tuple(b["blocks"])) for b in s.get("backups", [])),
                  predicted=copy.deepcopy(s.get("predicted", {})),
                  extra={k: copy.deepcopy(v) for k, v in s.items() if k not in stage_known})
            for s in d["devices"])
        return cls(model=copy.deepcopy(d["model"]),
                   workload=Workload(w["prefill_tokens"], w["decode_tokens"],
                                     w.get("images_per_request", 1), w.get("in_flight", 1),
                                     w.get("batch_rows"), w.get("micro_batches")),
                   method=d["method"], objective=d["objective"], solver=copy.deepcopy(d.get("solver")),
                   coordinator=d["coordinator"], devices=stages, links=copy.deepcopy(d["links"]),
                   predicted=copy.deepcopy(d.get("predicted", {})),
                   resilience=copy.deepcopy(d.get("resilience", {})),
                   cost_model=copy.deepcopy(d.get("cost_model")),
                   extra={k: copy.deepcopy(v) for k, v in d.items() if k not in known},
                   schema=d["schema"])

    def plan_hash(self) -> str:
        return plan_hash(self.to_dict())


def canonical_json(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def plan_hash(plan: "Plan | dict") -> str:
    """sha256 (hex) of the plan's canonical JSON (sorted keys, compact separators)."""
    d = plan.to_dict() if isinstance(plan, Plan) else plan
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()


def load_plan(path) -> Plan:
    """Read and validate plan.json; errors name the file and the field."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise PlanError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    return Plan.from_dict(d, source=str(path))


def save_plan(plan: Plan, path) -> str:
    """Write plan.json (indented, keys sorted); returns its hash."""
    d = plan.to_dict()
    with open(path, "w") as f:
        json.dump(d, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    return plan_hash(d)
