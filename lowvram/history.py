"""The history of a run (``history.json``): its settings, and one record per optimizer step.

    history = train(model_config, train_config)
    history["steps"][-1]   # {"step", "epoch", "tokens", "loss", "lr", "grad_norm", ...}
    history["val"][-1]     # {"step", "loss"}

``lowvram.plots`` draws it; ``lowvram.outputdir.write_history`` writes it atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lowvram.failures import non_finite, stop_non_finite

__all__ = ["StepLog", "new_history"]


def new_history(model_config, train_config, *, precision: str, reason: str, advice: str | None,
                num_processes: int, total_steps: int, warmup_steps: int) -> dict[str, Any]:
    """What ``history.json`` holds before the first step: the configs and the run's settings."""
    return {
        "config": {"model": dataclasses.asdict(model_config),
                   "train": dataclasses.asdict(train_config)},
        "precision": precision, "precision_reason": reason, "precision_advice": advice,
        "num_processes": num_processes,
        "effective_batch_size": train_config.effective_batch_for(num_processes),
        "total_steps": total_steps, "warmup_steps": warmup_steps,
        "steps": [], "skipped_steps": 0, "val": [], "final_val_loss": None, "final_lr": None,
    }  # fmt: skip


class StepLog:
    """What ``train`` keeps of its optimizer steps: a record each in ``history["steps"]``, the
    progress bar, and a log line every ``log_interval`` steps.

    The lesson printed one micro-batch's loss of one process. Here each micro-batch's loss is
    added up on the device (:meth:`add`: no device-to-host copy per micro-batch), and at the
    optimizer step one ``accelerator.reduce`` gives the mean over all its micro-batches of all
    processes (:meth:`step`).
    """

    def __init__(self, accelerator, history: dict[str, Any], output_dir: Path, train_config,
                 initial_step: int, progress: bool) -> None:
        from tqdm.auto import tqdm  # lazily: tqdm.auto pulls in the notebook machinery

        self.accelerator, self.history, self.output_dir = accelerator, history, output_dir
        self.log_interval, self.max_lr = train_config.log_interval, train_config.max_lr
        self.bar = tqdm(total=history["total_steps"], initial=initial_step, desc="train",
                        unit="step", disable=not (progress and accelerator.is_main_process))
        self.zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.loss, self.batches, self.tokens = self.zero.clone(), 0, 0

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        """One micro-batch: its loss and its number of input tokens."""
        self.loss += loss.detach()
        self.batches, self.tokens = self.batches + 1, self.tokens + tokens

    def step(self, loop, epoch: int, *, lr: float, grad_norm: torch.Tensor,
             loss_scale: float | None, skipped: bool) -> dict[str, Any]:
        """Record optimizer step ``loop.step`` (and add its tokens to ``loop.tokens``).

        Raises NonFiniteLossError, with history.json written, when its loss (or gradient norm)
        is NaN or inf: before the step is recorded, so that no saved file holds those weights.
        """
        totals = torch.stack([self.loss, self.zero + self.batches, self.zero + self.tokens])
        loss_sum, batches, tokens = self.accelerator.reduce(totals, "sum").tolist()
        self._reset()
        loop.tokens += int(tokens)
        record = {
            "step": loop.step, "epoch": epoch, "tokens": loop.tokens, "loss": loss_sum / batches,
            "lr": lr, "grad_norm": grad_norm.item(), "loss_scale": loss_scale, "skipped": skipped,
        }  # fmt: skip
        self.history["skipped_steps"] += int(skipped)  # fp16 overflow: the GradScaler skipped it
        problem = non_finite(record)
        if problem:
            self.bar.close()
            stop_non_finite(self.accelerator, self.output_dir, self.history, record, problem,
                            self.max_lr)
        self.history["steps"].append(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if loop.step % self.log_interval == 0:
            self.accelerator.print(
                f"step {loop.step:>6}/{self.history['total_steps']} | epoch {epoch} | loss "
                f"{record['loss']:.4f} | lr {lr:.2e} | grad norm {record['grad_norm']:.3f}"
            )
        return record

    def close(self) -> None:
        self.bar.close()
