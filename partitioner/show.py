"""Draw a plan (matplotlib, Agg): which device runs which blocks, and the pipeline timeline.

Top: one row per device, its blocks along the model (coloured by kind), the shares it
preloads as backups (hatched, below), its memory use. Bottom: the simulator's schedule of
the first requests (one colour per request) on every device and link.
"""

from __future__ import annotations

import math

from partitioner.costs import CostModel
from partitioner.simulate import simulate

KIND_COLOURS = {"vision_embed": "#9ecae1", "vision_layer": "#4292c6", "projector": "#08519c",
                "text_embed": "#a1d99b", "merge": "#31a354", "decoder_layer": "#fd8d3c", "head": "#a63603"}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def draw_plan(plan, out: str, *, requests: int = 6) -> None:
    import matplotlib  # only when a plan is drawn: `adaptlink`'s start-up imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cm = CostModel.from_plan(plan)
    ranks = plan.block_ranks()
    assign = [ranks[b] for b in cm.blocks]
    N, B = cm.n_devices, cm.n_blocks
    sim = simulate(cm, assign, keep_timeline=requests)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 3 + 0.9 * N + 0.25 * N), height_ratios=[N, N + 2])

    # -- placement ------------------------------------------------------------------------
    for s in plan.devices:
        y = N - 1 - s.rank
        for b in s.blocks:
            i = cm.index[b]
            ax1.barh(y + 0.12, 1, left=i, height=0.55, color=KIND_COLOURS.get(cm.kinds[i], "grey"),
                     edgecolor="white", linewidth=0.3)
        for bk in s.backups:
            for b in bk.blocks:
                i = cm.index[b]
                ax1.barh(y - 0.3, 1, left=i, height=0.22, color="none", edgecolor="0.4", hatch="////",
                         linewidth=0.3)
        p = s.predicted
        used, cap = p.get("memory_bytes", 0), p.get("capacity_bytes", s.memory_bytes)
        ax1.text(B + 0.5, y, f"{_gb(used)} / {_gb(cap)}, busy {p.get('busy_s_per_request', 0):.3g} s/req",
                 va="center", fontsize=8)
    labels = [f"{s.rank}: {s.name}" + (" (coord.)" if s.rank == plan.coordinator else "")
              + (" [emu]" if s.emulation else "") for s in plan.devices]
    ax1.set_yticks(range(N), labels[::-1], fontsize=8)
    ax1.set_xlim(0, B + 12)
    ax1.set_xlabel("blocks in model order (hatched: preloaded backups)")
    pr = plan.predicted
    ax1.set_title(f"{plan.method} plan of {plan.model.get('source')}: {pr.get('requests_per_s')} req/s, "
                  f"{pr.get('tokens_per_s')} tok/s, latency {pr.get('latency_s')} s, K={pr.get('in_flight')}"
                  + (" (emulated cluster)" if plan.emulated else ""), fontsize=10)
    ax1.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items()], fontsize=7, ncol=7,
               loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)

    # -- timeline -------------------------------------------------------------------------
    resources = [("dev", d) for d in range(N)] + sorted({r for r, *_ in sim.timeline if r[0] == "link"})
    row = {r: len(resources) - 1 - i for i, r in enumerate(resources)}
    cmap = plt.get_cmap("tab10")
    for res, req, step, t0, t1, _ in sim.timeline:
        ax2.barh(row[res], t1 - t0, left=t0, height=0.7, color=cmap(req % 10),
                 alpha=1.0 if step == 0 else 0.6, linewidth=0)
    names = cm.device_names
    ax2.set_yticks([row[r] for r in resources],
                   [names[r[1]] if r[0] == "dev" else f"{names[r[1]]}->{names[r[2]]}" for r in resources],
                   fontsize=7)
    end = max((t1 for *_, t1, _ in sim.timeline), default=1.0)
    ax2.set_xlim(0, end if math.isfinite(end) else 1.0)
    ax2.set_xlabel("seconds (simulated; one colour per request, prefill opaque, decode steps lighter)")
    ax2.set_title(f"pipeline timeline of the first {requests} requests, {sim.in_flight} in flight", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
