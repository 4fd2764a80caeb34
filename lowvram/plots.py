"""Figures of a training run, from its history (the dict ``train`` returns, or history.json)::

    from lowvram.plots import plot_losses, plot_lr, plot_lr_schedule
    fig = plot_losses("runs/cpu-demo/history.json")   # train loss per optimizer step + val points
    fig = plot_lr(history)                             # the LR each optimizer step ran at
    fig = plot_lr_schedule(warmup_steps=10, total_steps=200, max_lr=2e-3)   # before training

Each function returns the matplotlib Figure (matplotlib is imported only when one is called);
in a notebook end the cell with ``plt.show()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.precision import PRECISION_LABELS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["load_history", "plot_losses", "plot_lr", "plot_lr_schedule"]


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


def plot_losses(history_or_path: dict[str, Any] | str | Path) -> Figure:
    """Training loss per optimizer step (a line) and validation loss (points)."""
    import matplotlib.pyplot as plt

    history = load_history(history_or_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = history["steps"]
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1, label="train")
    val = history.get("val", [])
    ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    precision = PRECISION_LABELS.get(history.get("precision"), history.get("precision", "?"))
    n = history.get("num_processes", 1)
    ax.set_title(f"loss ({precision}, {n} process{'es' if n != 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _plot_lr_values(steps: list[int], lrs: list[float], title: str) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, lrs, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_lr(history_or_path: dict[str, Any] | str | Path) -> Figure:
    """The learning rate each optimizer step of a run ran at."""
    history = load_history(history_or_path)
    steps = history["steps"]
    title = f"learning rate (warmup {history.get('warmup_steps', '?')} of {history.get('total_steps', '?')} steps)"
    return _plot_lr_values([s["step"] for s in steps], [s["lr"] for s in steps], title)


def plot_lr_schedule(warmup_steps: int, total_steps: int, max_lr: float) -> Figure:
    """The linear warmup-then-decay schedule the loop will use, before any training."""
    from lowvram.schedule import lr_schedule

    lrs = lr_schedule(warmup_steps, total_steps, max_lr)
    title = f"linear schedule: warmup {warmup_steps} of {total_steps} steps, peak {max_lr:g}"
    return _plot_lr_values(list(range(1, total_steps + 1)), lrs, title)
