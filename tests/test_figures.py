"""lowvram.figures: the concept figures' content (texts and boxes), not their pixels."""

from __future__ import annotations

import subprocess
import sys

import pytest
from matplotlib.patches import FancyBboxPatch, Rectangle

from lowvram.figures import MEMORY_PARTS, accumulation_timeline, memory_stack


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [fig.axes[0].get_title()]


def test_figures_import_matplotlib_lazily():
    code = "import sys, lowvram.figures; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("accumulation", "clip"), [(4, True), (2, False), (1, True)])
def test_accumulation_timeline_boxes_and_labels(accumulation, clip):
    fig = accumulation_timeline(accumulation, clip=clip)
    boxes = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    # forward + backward per micro-batch, one .grad box each, then (clip,) step, zero_grad
    assert len(boxes) == 3 * accumulation + (3 if clip else 2)
    texts = _texts(fig)
    assert texts.count("irəli") == accumulation and texts.count("geri") == accumulation
    assert [t for t in texts if t.startswith("mikro-batch ")] == [
        f"mikro-batch {k}" for k in range(1, accumulation + 1)
    ]
    # only the last micro-batch of the window synchronises: clip and step happen after it
    assert [t for t in texts if t.startswith("sync=")] == ["sync=False"] * (accumulation - 1) + [
        "sync=True"
    ]
    assert ("kəsmə\n(clip)" in texts) is clip
    assert "optimizator\naddımı" in texts and "zero_grad" in texts
    assert f"{accumulation} mikro-batch → 1 optimizator addımı" in fig.axes[0].get_title()


def test_accumulation_timeline_running_sum_of_gradients():
    texts = _texts(accumulation_timeline(4))
    assert [t for t in texts if t.startswith("g1")] == ["g1", "g1+g2", "g1+…+g3", "g1+…+g4"]


@pytest.mark.parametrize("bad", [0, 9, 2.0, True])
def test_accumulation_timeline_rejects_bad_accumulation(bad):
    with pytest.raises(ValueError, match="accumulation must be an int from 1 to 8"):
        accumulation_timeline(bad)


def test_memory_stack_parts_values_and_limit():
    bars = {
        "1-ci": {"weights": 513.0, "optimizer_state": 1031.0, "activations": 842.0},
        "2-ci": {"weights": 513.0, "optimizer_state": 1031.0, "grads": 520.0,
                 "activations": 842.0, "temporaries": 0.0},
    }  # fmt: skip
    fig = memory_stack(bars, limit=3796.0)
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 3 + 4  # zero-sized parts draw nothing
    heights = sorted(round(r.get_height()) for r in rects)
    assert heights == sorted([513, 1031, 842, 513, 1031, 520, 842])
    texts = _texts(fig)
    assert "2,386 MiB" in texts and "2,906 MiB" in texts  # each bar's total on top
    assert "520" in texts
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("kartın istifadə oluna bilən yaddaşı (3,796 MiB)")
    assert set(legend[1:]) == {MEMORY_PARTS[k][0] for k in ("weights", "optimizer_state",
                                                            "grads", "activations")}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1-ci", "2-ci"]
    # the stack's order is fixed: weights at the bottom, activations above the gradients
    second = sorted((r for r in rects if abs(r.get_x() + r.get_width() / 2 - 1) < 1e-9),
                    key=lambda r: r.get_y())
    assert [round(r.get_height()) for r in second] == [513, 1031, 520, 842]


def test_memory_stack_rejects_bad_input():
    with pytest.raises(ValueError, match="bars is empty"):
        memory_stack({})
    with pytest.raises(ValueError, match=r"unknown parts \['params'\]"):
        memory_stack({"x": {"params": 1.0}})
    with pytest.raises(ValueError, match="negative sizes"):
        memory_stack({"x": {"grads": -1.0}})
