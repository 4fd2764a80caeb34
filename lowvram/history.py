"""The history of a run (``history.json``): its settings, and one record per optimizer step.

    history = train(model_config, train_config)
    history["steps"][-1]   # {"step", "epoch", "tokens", "loss", "lr", "grad_norm", ...}
    history["val"][-1]     # {"step", "loss"}

``lowvram.plots`` draws it; ``lowvram.outputdir.write_history`` writes it atomically.
``StepLog`` keeps the step records on the device until ``train`` reads them (see its docstring).
Importing this module loads torch and no other lowvram module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["StepLog", "log_line", "new_history"]


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


def log_line(record: dict[str, Any], total_steps: int) -> str:
    """The line ``train`` prints for a step record every ``log_interval`` steps."""
    return (f"step {record['step']:>6}/{total_steps} | epoch {record['epoch']} | loss "
            f"{record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f}")


class StepLog:
    """The optimizer steps' records of ``train``, kept on the device until read in one go.

    Reading a tensor's value on the host (``.item()``, ``.tolist()``, ``float(t)``, ``if t:``)
    makes the CPU wait until the GPU has finished everything queued so far. A fast GPU runs a
    step faster than Python issues it, so one such read per step costs the queue. Here nothing
    is read per micro-batch or per step:

    - :meth:`add` (each micro-batch) adds its loss to a sum on the device;
    - :meth:`step` (each optimizer step) keeps that step's loss sum, gradient norm, loss scale
      and skipped flag as device tensors (its LR, epoch, micro-batches and tokens are host
      numbers already) and moves the progress bar;
    - :meth:`read` copies every kept step to the host at once: one ``accelerator.reduce`` (the
      mean over all processes' micro-batches) and one ``.tolist()``, and returns the records.

    ``train`` reads at its log steps and before every evaluation, checkpoint and the final save.
    So a NaN/inf step is noticed up to ``log_interval`` steps late, but always before anything
    is saved: no saved file holds weights from after a non-finite step. The progress bar's
    loss is updated at each read.
    """

    def __init__(self, accelerator, *, total_steps: int, initial_step: int, progress: bool) -> None:
        from tqdm.auto import tqdm  # lazily: tqdm.auto pulls in the notebook machinery

        self.accelerator = accelerator
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                        disable=not (progress and accelerator.is_main_process))
        self.zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        # this step's loss sum (None until its first micro-batch), micro-batches and tokens
        self.loss: torch.Tensor | None = None
        self.batches, self.tokens = 0, 0
        self.kept: list[tuple[dict[str, Any], list[torch.Tensor]]] = []  # steps not read yet

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        """One micro-batch: its loss and its number of input tokens.

        One op on the device per micro-batch: on a host-bound GPU each op costs the host's
        time to issue it (``lowvram._bench.host_ops`` counts them). The sum is in float64,
        from the first loss on: ``0.0 + loss`` would be the same number.
        """
        with torch.no_grad():  # no graph, and no detach op
            if self.loss is None:
                self.loss = loss.to(torch.float64, copy=True)
            else:
                self.loss.add_(loss)
        self.batches, self.tokens = self.batches + 1, self.tokens + tokens

    def loss_scale(self) -> torch.Tensor | None:
        """The GradScaler's loss scale now, as a device copy (``scaler.get_scale()`` would wait
        for the GPU); None without a GradScaler. Take it before ``optimizer.step()``."""
        scaler = self.accelerator.scaler
        return None if scaler is None else scaler._get_scale_async().clone()

    def step(self, step: int, epoch: int, *, lr: float, grad_norm: torch.Tensor,
             loss_scale: torch.Tensor | None) -> None:
        """Keep optimizer step ``step``; call it after ``optimizer.step()``.

        ``loss_scale`` is :meth:`loss_scale` from before ``optimizer.step()``. The GradScaler
        skips a step whose gradients overflowed and then lowers its scale, so "skipped" is
        "the scale went down", compared on the device. (accelerate's
        ``optimizer_step_was_skipped`` says the same for the lesson's AdamW, but stays False for
        a fused AdamW, which skips inside its own kernel.)
        """
        if loss_scale is None:
            scale = skipped = self.zero
        else:
            scale = loss_scale
            skipped = self.accelerator.scaler._get_scale_async() < loss_scale
        norm = torch.as_tensor(grad_norm, device=self.zero.device)
        meta = {"step": step, "epoch": epoch, "lr": lr, "batches": self.batches,
                "tokens": self.tokens, "scaled": loss_scale is not None}
        loss = self.zero if self.loss is None else self.loss  # None: a step of no micro-batch
        self.kept.append((meta, [loss, norm, scale, skipped]))
        self.loss, self.batches, self.tokens = None, 0, 0
        self.bar.update(1)

    def read(self, loop) -> list[dict[str, Any]]:
        """The records of the steps kept since the last read, in order; ``loop.tokens`` grows
        by their tokens. One reduce and one device-to-host copy for all of them."""
        if not self.kept:
            return []
        metas = [meta for meta, _ in self.kept]
        f64 = dict(dtype=torch.float64, device=self.zero.device)
        columns = [torch.stack([values[i].to(**f64) for _, values in self.kept]) for i in range(4)]
        counts = torch.tensor([[m["batches"], m["tokens"]] for m in metas], **f64)
        # the loss sums, micro-batches and tokens of all processes; norm, scale, skipped: this one's
        summed = self.accelerator.reduce(torch.cat([columns[0][:, None], counts], dim=1), "sum")
        rows = torch.cat([summed, torch.stack(columns[1:], dim=1)], dim=1).tolist()
        self.kept = []
        records = []
        for meta, (loss_sum, batches, tokens, grad_norm, scale, skipped) in zip(metas, rows,
                                                                                strict=True):
            loop.tokens += int(tokens)
            records.append({
                "step": meta["step"], "epoch": meta["epoch"], "tokens": loop.tokens,
                "loss": loss_sum / batches, "lr": meta["lr"], "grad_norm": grad_norm,
                "loss_scale": scale if meta["scaled"] else None, "skipped": bool(skipped),
            })  # fmt: skip
        self.bar.set_postfix(loss=f"{records[-1]['loss']:.4f}")
        return records

    def close(self) -> None:
        self.bar.close()
