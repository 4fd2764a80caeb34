"""Concept figures of the lesson, drawn by code (labels in Azerbaijani, as the notebooks)::

    from lowvram.figures import accumulation_timeline, memory_stack, data_parallel
    fig = accumulation_timeline(accumulation=4)   # 4 micro-batches -> 1 optimizer step
    fig = memory_stack({"2-ci mikro-batch": {"weights": 513, "grads": 520}})  # stacked parts
    fig = data_parallel(num_processes=2)            # shards, all-reduce, one step on each

Each function returns a matplotlib Figure (matplotlib is imported only when one is called);
in a notebook end the cell with ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["accumulation_timeline", "data_parallel", "memory_stack"]


def accumulation_timeline(accumulation: int = 4, *, clip: bool = True) -> Figure:
    """Micro-batches on a time axis: backward on each, clip and optimizer step on the last.

    One row of boxes per micro-batch pass (forward, then backward), a row below that shows what
    ``.grad`` holds after each backward (the running sum), and, after the last micro-batch of
    the window (``accelerator.sync_gradients`` True), the clipping (when ``clip``), the optimizer
    step and ``zero_grad``. The layout depends only on the arguments: the same figure every time.

    Args:
        accumulation: micro-batches per optimizer step (``gradient_accumulation_steps``), 1-8.
        clip: draw the clipping box (``clip_grad_norm_`` on the synchronising micro-step).

    Returns:
        The Figure: ``2 * accumulation`` pass boxes, ``accumulation`` ``.grad`` boxes, then
        one box each for clipping (if any), the optimizer step and ``zero_grad``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    ok = isinstance(accumulation, int) and not isinstance(accumulation, bool)
    if not (ok and 1 <= accumulation <= 8):
        raise ValueError(
            f"accumulation_timeline: accumulation must be an int from 1 to 8 (the figure's "
            f"width), got {accumulation!r}; e.g. accumulation_timeline(4)"
        )
    colors = {"forward": "#9ecae1", "backward": "#fdae6b", "grad": "#c7e9c0", "sync": "#e377c2"}
    n_sync = 3 if clip else 2
    width = 2.0 * accumulation + 1.6 * n_sync + 0.6
    fig, ax = plt.subplots(figsize=(max(6.0, 1.05 * width), 2.8))

    def box(x: float, y: float, w: float, text: str, color: str) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, 0.8, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=color, edgecolor="#333333", linewidth=0.8))
        ax.text(x + w / 2, y + 0.4, text, ha="center", va="center", fontsize=8)

    for k in range(accumulation):
        x = 2.0 * k
        box(x, 2.0, 0.95, "irəli", colors["forward"])
        box(x + 1.0, 2.0, 0.95, "geri", colors["backward"])
        ax.text(x + 0.975, 3.0, f"mikro-batch {k + 1}", ha="center", fontsize=8)
        grads = "g1" if k == 0 else ("g1+g2" if k == 1 else f"g1+…+g{k + 1}")
        box(x + 1.0, 0.9, 0.95, grads, colors["grad"])
        sync = k == accumulation - 1
        ax.text(x + 0.975, 0.6, f"sync={'True' if sync else 'False'}", ha="center",
                fontsize=7, color="#a0006a" if sync else "#555555")
    x = 2.0 * accumulation + 0.3
    for text in (["kəsmə\n(clip)"] if clip else []) + ["optimizator\naddımı", "zero_grad"]:
        box(x, 2.0, 1.4, text, colors["sync"])
        x += 1.6
    ax.text(-0.1, 1.3, ".grad:", ha="right", va="center", fontsize=8)
    ax.annotate("", xy=(x - 0.1, 1.75), xytext=(0, 1.75),
                arrowprops={"arrowstyle": "->", "color": "#777777"})
    ax.text(x - 0.1, 1.55, "zaman", ha="right", va="top", fontsize=7, color="#777777")
    ax.set_xlim(-1.0, x + 0.1)
    ax.set_ylim(0.3, 3.4)
    ax.axis("off")
    ax.set_title(f"Qradiyent yığımı: {accumulation} mikro-batch → 1 optimizator addımı",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------


# The stack's parts, bottom to top, with their Azerbaijani labels and colours
MEMORY_PARTS = {
    "weights": ("çəkilər", "#6baed6"),
    "optimizer_state": ("AdamW vəziyyəti", "#9e9ac8"),
    "grads": ("qradiyentlər", "#74c476"),
    "activations": ("aktivasiyalar", "#fd8d3c"),
    "temporaries": ("müvəqqəti tensorlar", "#fdd0a2"),
}


def memory_stack(
    bars: Mapping[str, Mapping[str, float]],
    *,
    limit: float | None = None,
    limit_label: str = "kartın istifadə oluna bilən yaddaşı",
    unit: str = "MiB",
    title: str = "Bir təlim addımının yaddaşı",
) -> Figure:
    """The memory of one training step as stacked bars: weights, AdamW state, gradients,
    activations (and temporaries), one bar per moment of the step.

    Typical bars: the 1st micro-batch's backward (no ``.grad`` yet) next to a later one's, where
    the accumulated gradients are alive while the activations are used: the figure shows what
    gradient accumulation keeps in memory. The numbers come from the caller (e.g. a
    ``lowvram.memory`` report), so the figure has no constants of its own.

    Args:
        bars: bar label -> {part: size in ``unit``}; parts are keys of :data:`MEMORY_PARTS`
            (``weights``, ``optimizer_state``, ``grads``, ``activations``, ``temporaries``);
            a missing or zero part draws nothing.
        limit: a dashed line at this size (e.g. the card's usable memory), or None.
        limit_label, unit, title: texts of the figure (Azerbaijani by default).

    Returns:
        The Figure: one rectangle per non-zero part of each bar, its size written inside, the
        bar's total above it.
    """
    import matplotlib.pyplot as plt

    if not bars:
        raise ValueError("memory_stack: bars is empty; pass {'bar label': {'weights': 513.2, ...}}")
    for label, parts in bars.items():
        unknown = sorted(set(parts) - set(MEMORY_PARTS))
        if unknown:
            raise ValueError(
                f"memory_stack: bar {label!r} has unknown parts {unknown}; "
                f"use {list(MEMORY_PARTS)}"
            )
        negative = {k: v for k, v in parts.items() if v < 0}
        if negative:
            raise ValueError(f"memory_stack: bar {label!r} has negative sizes {negative}")
    fig, ax = plt.subplots(figsize=(max(5.5, 2.4 * len(bars) + 2.5), 4.6))
    tops = []
    used: set[str] = set()
    for i, parts in enumerate(bars.values()):
        bottom = 0.0
        for key, (name, color) in MEMORY_PARTS.items():
            size = float(parts.get(key, 0.0))
            if size <= 0:
                continue
            ax.bar(i, size, bottom=bottom, width=0.6, color=color, edgecolor="white",
                   label=name if key not in used else None)
            used.add(key)
            ax.text(i, bottom + size / 2, f"{size:,.0f}", ha="center", va="center", fontsize=8)
            bottom += size
        tops.append(bottom)
        ax.text(i, bottom, f"{bottom:,.0f} {unit}", ha="center", va="bottom", fontsize=8,
                fontweight="bold")
    if limit is not None:
        ax.axhline(limit, color="#cb181d", linestyle="--", linewidth=1.2,
                   label=f"{limit_label} ({limit:,.0f} {unit})")
    ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
    ax.set_ylabel(unit)
    ax.set_ylim(0, 1.15 * max([*tops, limit or 0.0]))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------


def data_parallel(num_processes: int = 2, batch_size: int = 4, **kwargs: Any) -> Figure:
    """Data parallelism: each process its shard of the batch, an all-reduce of the gradients,
    and the same optimizer step on every process.

    One lane per process (``num_processes``, 1-4): the prepared loader deals whole batches of
    ``batch_size`` rows round-robin (process p gets batches p, p + P, ...), each process runs
    forward and backward on its own shard, the all-reduce averages the gradients, and every
    process takes the same optimizer step, so the weights stay identical. ``kwargs`` go to
    ``plt.figure`` (e.g. ``figsize``).
    """
    from lowvram.config import check_positive_int

    check_positive_int("num_processes", num_processes)
    check_positive_int("batch_size", batch_size)
    if num_processes > 4:
        raise ValueError(f"num_processes={num_processes} is not allowed: draw 1 to 4 processes")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    P = num_processes
    fig = plt.figure(**{"figsize": (11, 1.0 + 1.3 * P), **kwargs})
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.86))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.2, P * 1.3)
    ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def box(x, y, w, h, text, color="white", **kw):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=color,
                                    ec="black", lw=1, alpha=0.9, **kw))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "lw": 1.2})

    lane = [(P - 1 - p) * 1.3 + 0.15 for p in range(P)]  # process 0 on top
    reduce_y, reduce_h = lane[-1], lane[0] + 0.9 - lane[-1]
    for p in range(P):
        y, c = lane[p], colors[p % len(colors)]
        box(0.1, y, 2.0, 0.9, f"Proses {p}\nbatch {p}: {batch_size} sıra", color=c)
        arrow(2.15, y + 0.45, 2.55, y + 0.45)
        box(2.6, y, 2.1, 0.9, "forward + backward\n(öz hissəsində)")
        arrow(4.75, y + 0.45, 5.15, y + 0.45)
        box(5.2, y, 0.9, 0.9, f"qradiyent\n$g_{p}$")
        arrow(6.15, y + 0.45, 6.55, y + 0.45)
        arrow(7.95, y + 0.45, 8.35, y + 0.45)
        box(8.4, y, 2.5, 0.9, "optimizator addımı\n(eyni $g$ → eyni çəkilər)")
    terms = " + ".join(f"g_{p}" for p in range(P))
    box(6.6, reduce_y, 1.3, reduce_h, f"all-reduce\n(orta)\n$g = ({terms})/{P}$"
        if P > 1 else "all-reduce yoxdur\n(1 proses)", color="#eeeeee")
    effective = P * batch_size
    fig.suptitle(f"Verilənlər paralelliyi: {P} proses, bir optimizator addımı "
                 f"({P} × {batch_size} = {effective} sıra)", fontsize=11)
    return fig
