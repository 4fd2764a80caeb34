"""lowvram.plots: Figures with one point per optimizer step and per validation."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.figure import Figure

from lowvram.plots import load_history, plot_losses, plot_lr, plot_lr_schedule
from lowvram.schedule import lr_schedule

HISTORY = {
    "config": {"model": {"vocab_size": 64}, "train": {"max_lr": 1e-3}},
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
        train_line, val_points, ln_v = fig.axes[0].get_lines()
        assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5]
        assert list(train_line.get_ydata()) == pytest.approx([4.5, 4.4, 4.3, 4.2, 4.1])
        assert list(val_points.get_xdata()) == [0, 5]
        assert list(val_points.get_ydata()) == [4.6, 4.2]


def test_plot_lr_draws_the_plan_and_what_ran_on_one_axes():
    planned, ran = plot_lr(HISTORY).axes[0].get_lines()
    assert list(ran.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(ran.get_ydata()) == pytest.approx([0.0, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    # the plan for (warmup 1, total 5, max_lr 1e-3): the points of a correct run lie on it
    assert list(planned.get_ydata()) == pytest.approx(list(ran.get_ydata()))
    assert [t.get_text() for t in plot_lr(HISTORY).axes[0].get_legend().get_texts()] == [
        "planlaşdırılan", "faktiki (hər addımın LR-i)"]


def test_plot_lr_without_config_draws_only_what_ran():
    history = {k: v for k, v in HISTORY.items() if k != "config"}
    (ran,) = plot_lr(history).axes[0].get_lines()
    assert len(ran.get_xdata()) == 5


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


def test_loss_plot_is_in_azerbaijani_and_names_precision_and_processes():
    ax = plot_losses(HISTORY).axes[0]
    assert ax.get_title() == "İtki (fp32, 1 proses)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optimizator addımı", "çarpaz entropiya itkisi")
    two = {**HISTORY, "precision": "fp16", "num_processes": 2}
    assert plot_losses(two).axes[0].get_title() == "İtki (fp16, 2 proses)"


def test_loss_plot_has_the_ln_vocab_line():
    ln_v = plot_losses(HISTORY).axes[0].get_lines()[-1]
    assert list(ln_v.get_ydata()) == pytest.approx([math.log(64)] * 2)
    assert ln_v.get_label() == "ln(V) = ln(64) = 4.16: təsadüfi təxmin"


def test_several_runs_share_one_plot():
    two = {**HISTORY, "num_processes": 2,
           "steps": [{**s, "loss": s["loss"] + 0.01} for s in HISTORY["steps"]]}
    ax = plot_losses(HISTORY, two).axes[0]
    assert ax.get_title() == "İtki: fp32, 1 proses və fp32, 2 proses"
    lines = ax.get_lines()
    assert len(lines) == 5  # train + val for each run, one ln(V) line (same vocabulary)
    assert list(lines[2].get_ydata()) == pytest.approx([4.51, 4.41, 4.31, 4.21, 4.11])
    labelled = plot_losses(HISTORY, two, labels=["bir", "iki"]).axes[0]
    assert labelled.get_title() == "İtki: bir və iki"
    with pytest.raises(ValueError, match="2 histories but 1 labels"):
        plot_losses(HISTORY, two, labels=["bir"])
    with pytest.raises(ValueError, match="at least one history"):
        plot_losses()
