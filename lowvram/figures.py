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


def data_parallel(num_processes: int = 2, **kwargs: Any) -> Figure:
    """Data parallelism: each process its shard of the batch, an all-reduce of the gradients,
    and the same optimizer step on every process."""
    raise NotImplementedError("data_parallel: being written (hnbB)")
