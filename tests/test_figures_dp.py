"""lowvram.figures.data_parallel: the concept figure of data parallelism (25_4)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from lowvram.figures import data_parallel


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")) if t.get_text()]


def test_two_processes_shards_all_reduce_one_step():
    fig = data_parallel(num_processes=2, batch_size=4)
    texts = _texts(fig)
    assert isinstance(fig, Figure)
    assert "Proses 0\nbatch 0: 4 sıra" in texts and "Proses 1\nbatch 1: 4 sıra" in texts
    assert sum("forward + backward" in t for t in texts) == 2
    assert sum("optimizator addımı\n" in t for t in texts) == 2  # the same step on each
    reduce = [t for t in texts if t.startswith("all-reduce")]
    assert reduce == ["all-reduce\n(orta)\n$g = (g_0 + g_1)/2$"]
    assert "2 proses, bir optimizator addımı (2 × 4 = 8 sıra)" in fig._suptitle.get_text()
    plt.close(fig)


@pytest.mark.parametrize("P", [1, 3])
def test_one_lane_per_process(P):
    fig = data_parallel(num_processes=P, batch_size=2)
    texts = _texts(fig)
    assert [t for t in texts if t.startswith("Proses")] == [
        f"Proses {p}\nbatch {p}: 2 sıra" for p in range(P)]
    assert any(t.startswith("all-reduce yoxdur") for t in texts) == (P == 1)
    plt.close(fig)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="num_processes=0 is not allowed"):
        data_parallel(num_processes=0)
    with pytest.raises(ValueError, match="num_processes=5 is not allowed: draw 1 to 4"):
        data_parallel(num_processes=5)
    with pytest.raises(ValueError, match="batch_size=-1 is not allowed"):
        data_parallel(batch_size=-1)
