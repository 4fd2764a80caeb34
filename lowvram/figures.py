"""Concept figures of the lesson, drawn by code (labels in Azerbaijani, as the notebooks)::

    from lowvram.figures import accumulation_timeline, memory_stack, data_parallel
    fig = accumulation_timeline(accumulation=4)   # 4 micro-batches -> 1 optimizer step
    fig = memory_stack(...)                         # what one training step keeps in memory
    fig = data_parallel(num_processes=2)            # shards, all-reduce, one step on each

Each function returns a matplotlib Figure (matplotlib is imported only when one is called);
in a notebook end the cell with ``plt.show()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["accumulation_timeline", "data_parallel", "memory_stack"]


def accumulation_timeline(accumulation: int = 4, **kwargs: Any) -> Figure:
    """Micro-batches on a time axis: backward on each, clip and optimizer step on the last."""
    raise NotImplementedError("accumulation_timeline: being written (hnbA)")


# ---------------------------------------------------------------------------------------------


def memory_stack(*args: Any, **kwargs: Any) -> Figure:
    """The memory of one training step as a stack: weights, gradients, AdamW state, activations,
    and what gradient accumulation keeps alive."""
    raise NotImplementedError("memory_stack: being written (hnbA)")


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
