"""lowvram.plots: Figures with one point per optimizer step and per validation."""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

from lowvram.plots import load_history, plot_losses, plot_lr, plot_lr_schedule
from lowvram.train import lr_schedule

HISTORY = {
    "precision": "no",
    "num_processes": 1,
    "warmup_steps": 1,
    "total_steps": 5,
    "steps": [
        {"step": i, "loss": 4.6 - 0.1 * i, "lr": lr}
        for i, lr in enumerate(lr_schedule(1, 5, 1e-3), start=1)
    ],
    "val": [{"step": 0, "loss": 4.6}, {"step": 5, "loss": 4.2}],
}


def test_plots_import_matplotlib_lazily():
    import subprocess
    import sys

    code = "import sys, lowvram.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_losses_from_dict_and_file(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(HISTORY))
    for source in (HISTORY, tmp_path / "history.json", str(tmp_path)):
        fig = plot_losses(source)
        assert isinstance(fig, Figure)
        train_line, val_points = fig.axes[0].get_lines()
        assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5]
        assert list(train_line.get_ydata()) == pytest.approx([4.5, 4.4, 4.3, 4.2, 4.1])
        assert list(val_points.get_xdata()) == [0, 5]
        assert list(val_points.get_ydata()) == [4.6, 4.2]


def test_plot_lr():
    (line,) = plot_lr(HISTORY).axes[0].get_lines()
    assert len(line.get_xdata()) == 5
    assert list(line.get_ydata()) == pytest.approx([0.0, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_plot_lr_schedule():
    (line,) = plot_lr_schedule(10, 200, 2e-3).axes[0].get_lines()
    assert list(line.get_xdata()) == list(range(1, 201))
    ys = list(line.get_ydata())
    assert ys[0] == 0.0 and max(ys) == pytest.approx(2e-3) and ys.index(max(ys)) == 10
    assert ys[-1] == pytest.approx(2e-3 / 190)


def test_load_history_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training history"):
        load_history(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no 'steps'"):
        load_history({"val": []})


def test_loss_title_names_the_precision_and_processes():
    assert plot_losses(HISTORY).axes[0].get_title() == "loss (fp32, 1 process)"
    two = {**HISTORY, "precision": "fp16", "num_processes": 2}
    assert plot_losses(two).axes[0].get_title() == "loss (fp16, 2 processes)"
