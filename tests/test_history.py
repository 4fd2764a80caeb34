"""lowvram.history: the step records of a run, on a fake accelerator (no training)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN

from lowvram.checkpoints import LoopState
from lowvram.config import ModelConfig
from lowvram.history import StepLog, log_line, new_history


class FakeAccelerator:
    """What StepLog uses of an Accelerator; ``reduce`` sums as if ``copies`` processes had
    the same values."""

    device = torch.device("cpu")
    is_main_process = True

    def __init__(self, copies: int = 1, scaler=None) -> None:
        self.copies, self.scaler, self.reduced = copies, scaler, []

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reduced.append(tuple(tensor.shape))
        return tensor * self.copies


def test_new_history_holds_the_settings_and_no_steps():
    model = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    history = new_history(model, TRAIN.replace(log_interval=2), precision="no", reason="cpu",
                          advice=None, num_processes=2, total_steps=10, warmup_steps=1)
    assert history["effective_batch_size"] == 2 * 2 * 2  # batch 2 x accumulation 2 x 2 processes
    assert history["config"]["model"]["vocab_size"] == 64
    assert history["config"]["train"]["log_interval"] == 2
    assert (history["steps"], history["val"], history["skipped_steps"]) == ([], [], 0)


def test_steps_are_kept_on_the_device_and_read_in_one_go():
    accelerator = FakeAccelerator(copies=2)
    steps = StepLog(accelerator, total_steps=10, initial_step=0, progress=False)
    loop = LoopState()
    assert steps.read(loop) == [] and accelerator.reduced == []  # nothing kept: nothing read
    for loss in (1.0, 2.0, 6.0):
        steps.add(torch.tensor(loss), tokens=8)
    steps.step(1, 0, lr=1e-3, grad_norm=torch.tensor(0.5), loss_scale=None)
    steps.add(torch.tensor(4.0), tokens=8)  # the next step starts anew
    steps.step(2, 1, lr=5e-4, grad_norm=torch.tensor(0.25), loss_scale=None)
    assert loop.tokens == 0 and accelerator.reduced == []  # nothing read yet
    first, second = steps.read(loop)
    assert accelerator.reduced == [(2, 3)]  # one reduce: 2 steps x (loss sum, batches, tokens)
    # the mean over the step's micro-batches and processes; tokens of both processes, cumulative
    assert first == {"step": 1, "epoch": 0, "tokens": 2 * 3 * 8, "loss": 3.0, "lr": 1e-3,
                     "grad_norm": 0.5, "loss_scale": None, "skipped": False}
    assert second == {"step": 2, "epoch": 1, "tokens": 48 + 2 * 8, "loss": 4.0, "lr": 5e-4,
                      "grad_norm": 0.25, "loss_scale": None, "skipped": False}
    assert loop.tokens == 64
    assert log_line(second, total_steps=10) == (
        "step      2/10 | epoch 1 | loss 4.0000 | lr 5.00e-04 | grad norm 0.250")
    assert steps.read(loop) == []  # read once
    steps.close()


def test_a_float32_loss_and_norm_are_recorded_as_item_would_give_them():
    steps = StepLog(FakeAccelerator(), total_steps=1, initial_step=0, progress=False)
    loss, norm = torch.tensor(0.1, dtype=torch.float32), torch.tensor(1 / 3, dtype=torch.float32)
    steps.add(loss, tokens=4)
    steps.step(1, 0, lr=0.0, grad_norm=norm, loss_scale=None)
    (record,) = steps.read(LoopState())
    assert record["loss"] == loss.item() != 0.1  # float32's 0.1, summed in float64
    assert record["grad_norm"] == norm.item()


def _scaler_step(scaler: torch.amp.GradScaler, grad: float) -> None:
    """One GradScaler step of a one-parameter SGD whose gradient is ``grad``."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler.scale(param.sum()).backward()
    param.grad.fill_(grad)
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize(("grad", "skipped", "next_scale"), [(1.0, False, 8.0),
                                                             (float("inf"), True, 4.0)])
def test_the_loss_scale_and_a_skipped_step_without_reading_the_scaler(grad, skipped, next_scale):
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    steps = StepLog(FakeAccelerator(scaler=scaler), total_steps=2, initial_step=0, progress=False)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as accelerator.backward does
    steps.add(torch.tensor(2.0), tokens=4)
    scale = steps.loss_scale()  # before the optimizer step
    _scaler_step(scaler, grad)  # an inf gradient: the step is skipped, the scale halved
    steps.step(1, 0, lr=1e-3, grad_norm=torch.tensor(grad), loss_scale=scale)
    (record,) = steps.read(LoopState())
    assert record["loss_scale"] == 8.0 and record["skipped"] is skipped
    assert scaler.get_scale() == next_scale


def test_importing_history_loads_no_checkpoint_data_or_failure_code():
    code = ("import sys, lowvram.history; "
            "print(sorted(m for m in sys.modules if m.startswith('lowvram')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert "lowvram.history" in loaded
    for heavy in ("checkpoints", "data", "corpus", "failures", "outputdir"):
        assert f"lowvram.{heavy}" not in loaded
