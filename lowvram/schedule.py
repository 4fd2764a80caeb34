"""Step counting and the LR schedule, in optimizer steps (what the prepared loop really makes).

    from lowvram.schedule import count_optimizer_steps, schedule_steps, lr_schedule
    count_optimizer_steps(41, 4, 1)          # 11: the short last window is a step too
    warmup, total = schedule_steps(41, 4, 2) # (2, 22)
    lrs = lr_schedule(warmup, total, 3e-4)   # the LR each optimizer step runs at

The lesson counted ``len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS`` on
the unprepared loader: the prepared scheduler steps only on a sync (and ``num_processes``
times then), so with that count some updates ran at LR 0.
"""

from __future__ import annotations

import math

import torch

from lowvram.config import check_positive_int

__all__ = [
    "batches_per_process",
    "effective_batch",
    "count_optimizer_steps",
    "follow_schedule",
    "linear_schedule",
    "lr_schedule",
    "schedule_steps",
]


def count_optimizer_steps(
    num_batches: int,
    gradient_accumulation_steps: int,
    num_epochs: int,
    max_steps: int | None = None,
) -> int:
    """Optimizer steps of a run whose prepared train loader yields ``num_batches`` per process.

    accelerate syncs every ``gradient_accumulation_steps`` micro-batches *and* on the last
    batch of each epoch, so an epoch has ``ceil(num_batches / accumulation)`` steps.
    ``max_steps``, when set, overrides the epochs (the loop runs as many epochs as it needs).
    """
    check_positive_int("num_batches", num_batches)
    check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    check_positive_int("num_epochs", num_epochs)
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
        return max_steps
    return num_epochs * math.ceil(num_batches / gradient_accumulation_steps)


def schedule_steps(
    num_batches: int,
    gradient_accumulation_steps: int,
    num_epochs: int,
    max_steps: int | None = None,
    warmup_ratio: float = 0.1,
) -> tuple[int, int]:
    """(warmup_steps, total_steps) of the LR schedule, both in optimizer steps.

    The lesson counted ``len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS`` on
    the *unprepared* loader (all processes' batches) and floored a short last window away.
    """
    total = count_optimizer_steps(num_batches, gradient_accumulation_steps, num_epochs, max_steps)
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio!r} is not allowed: it must be in [0, 1)")
    return int(total * warmup_ratio), total  # the lesson: total_steps // 10


def batches_per_process(num_batches: int, num_processes: int, drop_last: bool,
                        rows: int | None = None) -> int:
    """Length of a prepared train loader: the batches are dealt round-robin to the processes;
    a short last round is dropped with ``drop_last``, else padded (accelerate's even_batches).
    Given the loader's ``rows``, a length of 0 (nothing to train on) is a ValueError."""
    n = num_batches // num_processes if drop_last else math.ceil(num_batches / num_processes)
    if n == 0 and rows is not None:
        raise ValueError(
            f"train_data has {rows} rows: fewer than one batch (per_device_train_batch_size) "
            f"for each of {num_processes} processes; use more data or a smaller batch"
        )
    return n


def effective_batch(batches_per_epoch: int, per_device_batch: int, accumulation: int,
                    num_processes: int) -> tuple[int, str | None]:
    """The rows one optimizer step really uses, and a note when that is not the configured
    ``per_device_batch x accumulation x num_processes``: an epoch of fewer micro-batches than
    one accumulation window makes every step a short window (accelerate still divides each
    micro-batch's loss by ``accumulation``, so the gradient is scaled by their ratio)."""
    if batches_per_epoch >= accumulation:
        return per_device_batch * accumulation * num_processes, None
    used = per_device_batch * batches_per_epoch * num_processes
    return used, (
        f"the train data makes only {batches_per_epoch} micro-batch(es) of "
        f"{per_device_batch} per process and epoch, fewer than gradient_accumulation_steps="
        f"{accumulation}: each optimizer step uses {used} rows, not "
        f"{per_device_batch * accumulation * num_processes}, and its gradient is "
        f"{batches_per_epoch}/{accumulation} of their mean (accelerate divides every loss by "
        f"{accumulation}). Use --gradient-accumulation-steps {batches_per_epoch} (or more data) "
        "for full steps"
    )


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, scale: int = 1):
    """The lesson's ``get_linear_schedule_with_warmup``, counted in ``scale`` ticks per step.

    (The prepared scheduler ticks ``num_processes`` times per optimizer step: pass that as
    ``scale`` and the LR of step k is the same for any number of processes.)
    """
    if not (isinstance(warmup, int) and isinstance(total, int) and 0 <= warmup < total):
        raise ValueError(
            f"warmup_steps={warmup!r} is not allowed with total_steps={total!r}: warmup must be "
            "shorter than training (0 <= warmup_steps < total_steps); lower the warmup or train "
            "for more steps"
        )
    from transformers import get_linear_schedule_with_warmup  # ~1 s of import: lazily

    return get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup * scale, num_training_steps=total * scale
    )


def lr_schedule(warmup_steps: int, total_steps: int, max_lr: float) -> list[float]:
    """The learning rate that each of the ``total_steps`` optimizer steps runs at."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def follow_schedule(scheduler) -> None:
    """Set the LR to the schedule's value at the tick it stands at, after loading a checkpoint.

    For a resume of the same run this is the saved LR, bit for bit. A run extended with a
    larger max_steps would otherwise run its next step at the old schedule's final LR (0.0
    after a finished run); it follows the new schedule instead, from the checkpoint's step.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, or a LambdaLR
    groups = inner.optimizer.param_groups
    for group, lr_lambda, base_lr in zip(groups, inner.lr_lambdas, inner.base_lrs, strict=True):
        group["lr"] = base_lr * lr_lambda(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in groups]
