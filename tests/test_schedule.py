"""lowvram.schedule: optimizer steps and the linear LR schedule (no training here)."""

from __future__ import annotations

import pytest
import torch

import lowvram.train
from lowvram.schedule import (
    batches_per_process,
    count_optimizer_steps,
    follow_schedule,
    linear_schedule,
    lr_schedule,
    schedule_steps,
)


def test_count_optimizer_steps():
    assert count_optimizer_steps(40, 4, 1) == 10
    assert count_optimizer_steps(41, 4, 1) == 11  # the short last window is a step
    assert count_optimizer_steps(9, 2, 3) == 15
    assert count_optimizer_steps(9, 2, 3, max_steps=7) == 7  # max_steps overrides the epochs
    # the seed's formula, len * epochs // accum, loses the short windows
    assert 41 * 1 // 4 == 10
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0"):
        count_optimizer_steps(40, 0, 1)
    with pytest.raises(ValueError, match="max_steps=0"):
        count_optimizer_steps(40, 4, 1, max_steps=0)


def test_schedule_steps():
    assert schedule_steps(40, 4, 2) == (2, 20)  # the seed's total // 10
    assert schedule_steps(41, 4, 1, warmup_ratio=0.05) == (0, 11)
    assert schedule_steps(100, 4, 10, max_steps=200, warmup_ratio=0.05) == (10, 200)


def test_lr_schedule_values():
    lrs = lr_schedule(2, 10, 1e-3)
    assert len(lrs) == 10
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(1e-3 / 8)  # one step before zero



def test_count_optimizer_steps_refuses_what_is_not_a_positive_integer():
    for name, args in (("num_batches", (0, 4, 1)), ("num_epochs", (40, 4, -1)),
                       ("gradient_accumulation_steps", (40, 2.5, 1))):
        with pytest.raises(ValueError, match=f"{name}=.* is not allowed: {name} must be a "
                                             r"positive integer \(>= 1\)"):
            count_optimizer_steps(*args)
    with pytest.raises(ValueError, match="max_steps=True is not allowed"):
        count_optimizer_steps(40, 4, 1, max_steps=True)  # bool is not a count


def test_batches_per_process():
    assert batches_per_process(9, 2, drop_last=True) == 4  # the short last round is dropped
    assert batches_per_process(9, 2, drop_last=False) == 5  # ... or padded (even_batches)
    assert batches_per_process(8, 1, drop_last=True) == 8
    assert batches_per_process(1, 2, drop_last=True) == 0  # without rows: just the length
    with pytest.raises(ValueError, match=r"train_data has 3 rows: fewer than one batch .* for "
                                         r"each of 2 processes"):
        batches_per_process(1, 2, drop_last=True, rows=3)


def test_linear_schedule_ticks_num_processes_times_per_step():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = linear_schedule(optimizer, 2, 10, scale=2)  # 2 processes: 2 ticks per step
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        for _ in range(2):
            optimizer.step()
            scheduler.step()
    assert lrs == pytest.approx(lr_schedule(2, 10, 1.0))


def test_train_re_exports_the_names_notebooks_import():
    assert lowvram.train.count_optimizer_steps is count_optimizer_steps
    assert lowvram.train.schedule_steps is schedule_steps
    assert lowvram.train.lr_schedule is lr_schedule


def test_follow_schedule_moves_the_lr_to_a_new_total():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    old = linear_schedule(optimizer, 0, 4)
    for _ in range(4):
        optimizer.step()
        old.step()
    assert old.get_last_lr() == [0.0]  # a finished run ends at LR 0
    extended = linear_schedule(optimizer, 0, 6)  # what train builds for max_steps=6 ...
    extended.load_state_dict(old.state_dict())  # ... then loads the checkpoint's state
    optimizer.param_groups[0]["lr"] = 0.0  # (and AdamW's, with the LR it last ran at)
    assert extended.get_last_lr() == [0.0]
    follow_schedule(extended)
    assert extended.get_last_lr()[0] == optimizer.param_groups[0]["lr"] == pytest.approx(2 / 6)
    same = linear_schedule(optimizer, 0, 4)
    same.load_state_dict(old.state_dict())
    optimizer.param_groups[0]["lr"] = 0.0
    follow_schedule(same)  # a resume of the same run: unchanged
    assert same.get_last_lr() == [0.0]


def test_effective_batch_is_the_batch_really_used():
    # n66 before: 20 rows of data, batch 4 x accumulation 8 printed "effective batch: 32"
    from lowvram.schedule import effective_batch

    assert effective_batch(16, 4, 4, 2) == (32, None)
    used, note = effective_batch(5, 4, 8, 1)
    assert used == 20
    assert "each optimizer step uses 20 rows, not 32" in note
    assert "5/8 of their mean" in note and "--gradient-accumulation-steps 5" in note


def test_train_prints_and_records_the_short_window_batch(tmp_path, capsys):
    from conftest import run

    history = run(tmp_path / "run", n_train=10, max_steps=2, gradient_accumulation_steps=8)
    printed = capsys.readouterr().out
    assert history["effective_batch_size"] == 10  # 5 micro-batches of 2
    assert "effective batch: 10 |" in printed and "each optimizer step uses 10 rows, not 16" in printed
