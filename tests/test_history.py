"""lowvram.history: the step records of a run, on a fake one-process accelerator (no training)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TRAIN

from lowvram.checkpoints import LoopState
from lowvram.config import ModelConfig
from lowvram.failures import NonFiniteLossError
from lowvram.history import StepLog, new_history


class FakeAccelerator:
    """What StepLog uses of an Accelerator; ``reduce`` sums as if ``copies`` processes had
    the same values."""

    device = torch.device("cpu")
    is_main_process = True
    scaler = None

    def __init__(self, copies: int = 1) -> None:
        self.copies, self.printed = copies, []

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * self.copies

    def print(self, line):
        self.printed.append(line)


def _log(tmp_path, copies=1, **changes):
    model = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    train_config = TRAIN.replace(**changes)
    history = new_history(model, train_config, precision="no", reason="cpu", advice=None,
                          num_processes=copies, total_steps=10, warmup_steps=1)
    accelerator = FakeAccelerator(copies)
    return StepLog(accelerator, history, tmp_path, train_config, 0, progress=False), history, accelerator


def test_a_step_records_the_mean_over_its_micro_batches_and_processes(tmp_path):
    steps, history, accelerator = _log(tmp_path, copies=2, log_interval=2)
    assert history["effective_batch_size"] == TRAIN.effective_batch_for(2)
    assert history["steps"] == [] and history["config"]["train"]["log_interval"] == 2
    loop = LoopState()
    for loss in (1.0, 2.0, 6.0):
        steps.add(torch.tensor(loss), tokens=8)
    loop.step = 1
    record = steps.step(loop, 0, lr=1e-3, grad_norm=torch.tensor(0.5), loss_scale=None, skipped=False)
    assert record["loss"] == 3.0  # (1 + 2 + 6) / 3, the same on both processes
    assert record["tokens"] == loop.tokens == 2 * 3 * 8
    assert history["steps"] == [record] and accelerator.printed == []  # logs every 2nd step
    steps.add(torch.tensor(4.0), tokens=8)  # the window starts anew
    loop.step = 2
    second = steps.step(loop, 0, lr=1e-3, grad_norm=torch.tensor(0.5), loss_scale=65536.0,
                        skipped=True)
    assert second["loss"] == 4.0 and second["tokens"] == 48 + 16
    assert history["skipped_steps"] == 1
    assert accelerator.printed == ["step      2/10 | epoch 0 | loss 4.0000 | lr 1.00e-03 | grad norm 0.500"]
    steps.close()


@pytest.mark.parametrize(("loss", "grad_norm", "words"), [
    (math.nan, 0.5, "the loss is nan"),
    (2.0, math.inf, "the gradient norm is inf"),
])
def test_a_non_finite_step_is_not_recorded_and_history_json_says_why(tmp_path, loss, grad_norm, words):
    steps, history, _ = _log(tmp_path)
    loop = LoopState(step=1)
    steps.add(torch.tensor(loss), tokens=8)
    with pytest.raises(NonFiniteLossError, match=words):
        steps.step(loop, 0, lr=1e-3, grad_norm=torch.tensor(grad_norm), loss_scale=None,
                   skipped=False)
    assert history["steps"] == []
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["error"]["type"] == "NonFiniteLossError" and words in saved["error"]["message"]
