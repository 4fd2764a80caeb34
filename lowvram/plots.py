"""Figures of a training run, from its history (the dict ``train`` returns, or history.json)::

    from lowvram.plots import plot_losses, plot_lr, plot_lr_schedule
    fig = plot_losses("runs/cpu-demo/history.json")    # train loss per optimizer step + val points
    fig = plot_losses("runs/cpu-demo", "runs/launched")  # several runs on one plot
    fig = plot_lr(history)                              # planned schedule and the LR each step ran at
    fig = plot_lr_schedule(warmup_steps=10, total_steps=200, max_lr=2e-3)   # before training

The figures are labelled in Azerbaijani, the language of the notebooks they are drawn in; the
loss plots carry the ln(V) line, the loss of a model that guesses uniformly over the vocabulary,
where an untrained model starts. Each function returns the matplotlib Figure (matplotlib is
imported only when one is called); in a notebook end the cell with ``plt.show()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["load_history", "plot_losses", "plot_lr", "plot_lr_schedule", "run_label"]

_STEP = "optimizator addımı"


def load_history(history_or_path: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A history dict as is, or read from history.json (or a run directory that holds one)."""
    if isinstance(history_or_path, dict):
        history = history_or_path
    else:
        path = Path(history_or_path)
        if path.is_dir():
            path = path / "history.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no training history at {path}: pass the dict that train() returned, or the "
                "history.json (or the output_dir) of a finished run"
            )
        history = json.loads(path.read_text())
    if "steps" not in history:
        raise ValueError(
            f"history has keys {sorted(history)[:8]} but no 'steps': pass what lowvram.train.train "
            "returned or wrote to history.json"
        )
    return history


def run_label(history: dict[str, Any]) -> str:
    """How a run is named on a plot: its precision and process count, e.g. 'fp32, 2 proses'."""
    from lowvram.precision import PRECISION_LABELS  # the one label map ('no' is fp32)

    precision = history.get("precision", "?")
    label = PRECISION_LABELS.get(precision, precision)
    return f"{label}, {history.get('num_processes', 1)} proses"


def _vocab_size(history: dict[str, Any]) -> int | None:
    return history.get("config", {}).get("model", {}).get("vocab_size")


def plot_losses(
    *histories_or_paths: dict[str, Any] | str | Path, labels: Sequence[str] | None = None
) -> Figure:
    """Training loss per optimizer step (a line) and validation loss (points) of one or more runs.

    Args:
        histories_or_paths: one or more histories (dicts, history.json files or run folders).
        labels: a legend name per run; by default its precision and process count.

    With several runs (e.g. 1 process and 2 processes at the same effective batch) the curves
    share the axes, so a learner sees whether they agree. The dashed line is ln(V).
    """
    import matplotlib.pyplot as plt

    if not histories_or_paths:
        raise ValueError("plot_losses needs at least one history (dict, history.json or folder)")
    histories = [load_history(h) for h in histories_or_paths]
    if labels is None:
        labels = [run_label(h) for h in histories]
    if len(labels) != len(histories):
        raise ValueError(f"{len(histories)} histories but {len(labels)} labels")
    fig, ax = plt.subplots(figsize=(7, 4))
    for history, label, style in zip(histories, labels, ("-", "--", ":", "-."), strict=False):
        steps, val = history["steps"], history.get("val", [])
        (line,) = ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], style, lw=1,
                          label=f"təlim ({label})")
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o", color=line.get_color(),
                mfc="none" if style != "-" else line.get_color(), label=f"validasiya ({label})")
    vocab_sizes = {_vocab_size(h) for h in histories} - {None}
    for vocab in sorted(vocab_sizes):
        ax.axhline(math.log(vocab), color="gray", ls="--", lw=1,
                   label=f"ln(V) = ln({vocab}) = {math.log(vocab):.2f}: təsadüfi təxmin")
    ax.set_xlabel(_STEP)
    ax.set_ylabel("çarpaz entropiya itkisi")
    if len(histories) == 1:
        ax.set_title(f"İtki ({labels[0]})")
    else:
        ax.set_title("İtki: " + " və ".join(labels))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _lr_axes(title: str):  # (Figure, Axes); matplotlib is imported lazily
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.set_xlabel(_STEP)
    ax.set_ylabel("öyrənmə sürəti (LR)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_lr(history_or_path: dict[str, Any] | str | Path) -> Figure:
    """The planned schedule (a line) and the LR each optimizer step of a run ran at (points).

    The plan is the linear warmup-then-decay schedule for the run's ``warmup_steps``,
    ``total_steps`` and ``max_lr``; if the points leave the line, the scheduler stepped in other
    units than the optimizer (the lesson's defect that ``lowvram.train`` corrects).
    """
    from lowvram.schedule import lr_schedule

    history = load_history(history_or_path)
    steps = history["steps"]
    warmup, total = history.get("warmup_steps"), history.get("total_steps")
    fig, ax = _lr_axes(f"LR: planlaşdırılan və faktiki (isinmə {warmup}, cəmi {total} addım)")
    max_lr = history.get("config", {}).get("train", {}).get("max_lr")
    if warmup is not None and total and max_lr is not None:
        ax.plot(range(1, total + 1), lr_schedule(warmup, total, max_lr), lw=1.5,
                label="planlaşdırılan")
    ax.plot([s["step"] for s in steps], [s["lr"] for s in steps], ".", ms=3,
            label="faktiki (hər addımın LR-i)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lr_schedule(warmup_steps: int, total_steps: int, max_lr: float) -> Figure:
    """The linear warmup-then-decay schedule the loop will use, before any training."""
    from lowvram.schedule import lr_schedule

    fig, ax = _lr_axes(
        f"Xətti cədvəl: isinmə {warmup_steps}, cəmi {total_steps} addım, pik {max_lr:g}"
    )
    ax.plot(range(1, total_steps + 1), lr_schedule(warmup_steps, total_steps, max_lr), lw=1.5)
    fig.tight_layout()
    return fig
