"""The seed's ``train_accelerate.py``, corrected: one Day-25 training loop for every launcher.

In a notebook or a script (one process; the GPU if there is one, else the CPU)::

    from lowvram.config import get_preset
    from lowvram.train import train
    model_cfg, train_cfg = get_preset("cpu-demo")
    history = train(model_cfg, train_cfg)          # also in runs/cpu-demo/history.json

Data-parallel, from a notebook (two CPU processes on a machine without a GPU)::

    from accelerate import notebook_launcher
    notebook_launcher(train, args=(model_cfg, train_cfg), num_processes=2)
    # notebook_launcher returns nothing: read runs/cpu-demo/history.json

From the command line (steps are optimizer steps, as in the history)::

    python -m lowvram.train --preset cpu-demo --max-steps 200
    accelerate launch --multi_gpu --num_processes 2 -m lowvram.train --preset cpu-demo

(``--multi_gpu`` is accelerate's torchrun launcher: without a GPU each process trains on the
CPU, data-parallel over gloo. ``accelerate launch --cpu --num_processes 2`` starts only ONE
process; ``main`` warns when it sees that.)

The loop follows the seed step by step (config -> Accelerator -> data -> model, optimizer,
scheduler -> one ``accelerator.prepare`` -> ``accumulate`` / ``backward`` / clip / step).
Each place where it differs from the seed carries a ``# seed:`` comment saying why.
Everything that is not the loop (step counting, the precision policy, checkpoints) is a
small helper next to it.

Reliability (what a learner's laptop needs):

- Checkpoints (``<output_dir>/checkpoints/step_000100``) are written into ``step_000100.tmp``
  and renamed into place only when complete; ``manifest.json`` (step, tokens seen, epoch,
  configs, file sizes) is their last file. A crash mid-save leaves the older checkpoints
  intact, and the newest ``keep_checkpoints`` are kept. ``latest_checkpoint(output_dir)``
  finds the newest complete one; ``resume_from="latest"`` (``--resume-from latest``) uses it.
- Resuming restores the weights, AdamW, the LR schedule, the GradScaler, the RNG states and
  the data position: the run ends with the same weights, bit for bit, as one never stopped.
  A missing, incomplete or corrupt checkpoint, or one of another model or batch setting, is
  a ``ValueError`` / ``FileNotFoundError`` that says what to do.
- A NaN/inf loss stops training with :class:`NonFiniteLossError` (a ``FloatingPointError``)
  naming the step and likely causes; history.json keeps the steps done, and no checkpoint
  or model file with the broken weights is written.
- CUDA out of memory becomes :class:`TrainingOutOfMemoryError` (a ``torch.OutOfMemoryError``)
  whose message carries ``lowvram.memory``'s plan for this model on this card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch.nn import functional as F

from lowvram.config import PRESETS, ModelConfig, TrainConfig, get_preset
from lowvram.data import build_dataloaders, check_rows, load_datasets
from lowvram.model import GPTModel

__all__ = [
    "NonFiniteLossError",
    "TrainingOutOfMemoryError",
    "count_optimizer_steps",
    "force_grad_scaler",
    "latest_checkpoint",
    "lr_schedule",
    "main",
    "reset_accelerate_state",
    "resolve_precision",
    "schedule_steps",
    "train",
]

HISTORY_FILE = "history.json"
LOOP_STATE_FILE = "loop_state.json"  # next to accelerate's files in each checkpoint
MANIFEST_FILE = "manifest.json"  # a checkpoint's last file: step, tokens, configs, file sizes
CHECKPOINTS_DIR = "checkpoints"
_COMPLETE = re.compile(r"step_\d{6,}")  # a complete checkpoint's directory name
_UNFINISHED = re.compile(r"step_\d{6,}\.(tmp|old)")  # a save in progress, or killed mid-way


class NonFiniteLossError(FloatingPointError):
    """Training stopped: an optimizer step's loss (or, without a GradScaler, its gradient
    norm) was NaN or inf. history.json holds the steps before it; nothing with the broken
    weights was saved, so the last checkpoint is the last good state."""


class TrainingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """CUDA ran out of memory during ``train``; the message carries ``lowvram.memory``'s plan
    (micro-batch and accumulation that fit this card). Still a ``torch.OutOfMemoryError``."""


# ----------------------------------------------------------------------------- helpers


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
    for name, value in (
        ("num_batches", num_batches),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("num_epochs", num_epochs),
    ):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be a positive integer")
    if max_steps is not None:
        if not (isinstance(max_steps, int) and max_steps > 0):
            raise ValueError(f"max_steps={max_steps!r} is not allowed: use None or an integer >= 1")
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

    The seed counted ``len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS`` on
    the *unprepared* loader (all processes' batches) and floored a short last window away.
    """
    total = count_optimizer_steps(num_batches, gradient_accumulation_steps, num_epochs, max_steps)
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio!r} is not allowed: it must be in [0, 1)")
    return int(total * warmup_ratio), total  # the seed: total_steps // 10


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, scale: int = 1):
    """The seed's ``get_linear_schedule_with_warmup``, counted in ``scale`` ticks per step."""
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
    scheduler = _linear_schedule(optimizer, warmup_steps, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The one place precision is decided: (precision that will run, the reason in English).

    Warns (``UserWarning``) whenever what runs differs from what was requested.
    """
    device = torch.device(device)
    if requested not in ("no", "fp16", "bf16"):
        raise ValueError(
            f"mixed_precision={requested!r} is not allowed: use 'no' (fp32), 'fp16' or 'bf16'"
        )
    if requested == "no":
        return "no", "fp32 was requested"
    if device.type == "cuda":
        if requested == "fp16":
            return "fp16", (
                "fp16 autocast with a GradScaler on CUDA: half the activation memory; the "
                "scaler keeps small gradients from underflowing to zero"
            )
        if torch.cuda.is_bf16_supported():
            return "bf16", (
                "bf16 autocast on CUDA: the same memory saving as fp16, fp32's exponent range "
                "(no GradScaler, no skipped steps), 3 fewer mantissa bits"
            )
        reason = (
            f"bf16 was requested but {torch.cuda.get_device_name(device)} does not support it "
            "(bf16 needs an Ampere or newer GPU); running fp16 autocast with a GradScaler instead"
        )
        warnings.warn(reason, UserWarning, stacklevel=2)
        return "fp16", reason
    if requested == "bf16":
        return "bf16", (
            f"bf16 autocast on {device.type}: accelerate supports it there; it saves memory but "
            "may be slower than fp32 on CPUs without native bf16 instructions"
        )
    # fp16 on a CPU. accelerate would silently run fp32 and still report "fp16".
    # We choose fp32 and say so, rather than bf16: on a CPU memory is rarely the limit, bf16
    # matmuls are slower than fp32 on CPUs without AVX512-BF16/AMX, and bf16 would not show
    # what fp16 is about (a GradScaler) anyway; fp32 is also the reference every other run is
    # compared with.
    reason = (
        f"fp16 was requested on {device.type}, where accelerate runs no fp16 autocast and no "
        "GradScaler; running fp32 ('no') instead. fp16 needs a CUDA GPU; on a CPU use 'no' "
        "(or 'bf16' for bf16 autocast)"
    )
    warnings.warn(reason, UserWarning, stacklevel=2)
    return "no", reason


def force_grad_scaler(accelerator: Accelerator, init_scale: float = 2.0**16) -> None:
    """Make a CPU Accelerator behave like fp16 on a GPU: fp16 autocast plus a GradScaler.

    For demonstrations and tests only: the Accelerator must have been created with
    ``mixed_precision="fp16"``; call this before ``accelerator.prepare``. ``init_scale`` is
    GradScaler's first loss scale (a larger one overflows and skips the first steps).
    """
    if accelerator.mixed_precision != "fp16":
        raise ValueError(
            f"accelerator.mixed_precision={accelerator.mixed_precision!r}: create the "
            "Accelerator with mixed_precision='fp16' before forcing a GradScaler"
        )
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=init_scale)


def _batches_per_process(num_batches: int, num_processes: int, drop_last: bool) -> int:
    """Length of a prepared train loader: the batches are dealt round-robin to the processes;
    a short last round is dropped with ``drop_last``, else padded (accelerate's even_batches)."""
    return num_batches // num_processes if drop_last else math.ceil(num_batches / num_processes)


@dataclasses.dataclass
class _LoopState:
    """Where the loop stands; saved with each checkpoint, enough to continue from it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch to continue in
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed (per process)
    tokens: int = 0  # input tokens seen, all processes together


def _fsync(directory: Path) -> None:
    """Flush a directory's files (and, on POSIX, the directory itself) to the disk, so that a
    rename after it cannot point at data that a power cut would lose."""
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if os.name == "posix":  # Windows cannot open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints (renamed into place, manifest present), oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        p for p in checkpoints_dir.iterdir()
        if _COMPLETE.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len("step_"):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None.

    A save that was interrupted (``step_XXXXXX.tmp``) is never returned.
    """
    complete = _complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIR)
    return complete[-1] if complete else None


def _save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    loop: _LoopState,
    history: dict[str, Any],
    keep: int,
    batches_per_epoch: int,
) -> Path:
    """``accelerator.save_state`` plus the loop state, the history and a manifest, atomically.

    Everything goes into ``step_XXXXXX.tmp``; ``manifest.json`` is written last, and the
    directory is renamed into place only then. A crash at any moment leaves either the whole
    checkpoint or none of it, and the older checkpoints untouched; the oldest are deleted
    only after the new one is complete.
    """
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    path = checkpoints_dir / f"step_{loop.step:06d}"
    tmp = path.with_name(path.name + ".tmp")  # the same name in every process
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.iterdir():  # left by a run killed while saving
            if _UNFINISHED.fullmatch(stale.name):
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process takes part: each writes its RNG states
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"loop": dataclasses.asdict(loop), "history": history}
        (tmp / LOOP_STATE_FILE).write_text(json.dumps(state, indent=1))
        manifest = {
            "step": loop.step,
            "tokens": loop.tokens,
            "epoch": loop.epoch,
            "batches_in_epoch": loop.batches_in_epoch,
            "model": history["config"]["model"],
            "train": history["config"]["train"],
            "precision": history["precision"],
            "num_processes": accelerator.num_processes,
            "batches_per_epoch": batches_per_epoch,
            "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():  # the same step saved again (a resumed run): swap, then delete
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(checkpoints_dir)
        shutil.rmtree(old, ignore_errors=True)
        for older in _complete_checkpoints(checkpoints_dir)[:-keep]:
            if older != path:
                shutil.rmtree(older)
    accelerator.wait_for_everyone()
    return path


def _checkpoint_problem(path: Path, what: str) -> ValueError:
    """A ValueError for an unusable checkpoint, naming the complete ones next to it."""
    others = [p.name for p in _complete_checkpoints(path.parent) if p != path]
    where = (
        f"complete checkpoints next to it: {', '.join(others)}" if others
        else "there is no other complete checkpoint next to it: train from the start"
    )  # fmt: skip
    return ValueError(f"resume_from={str(path)!r} {what}. Delete it and resume from another; {where}")


def _check_checkpoint(
    resume_from: str | Path,
    output_dir: Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    num_processes: int,
    batches_per_epoch: int,
) -> Path:
    """Resolve ``resume_from`` ("latest" or a directory) and check its manifest and files
    against this run, before anything is built: a wrong checkpoint fails fast and clearly."""
    if str(resume_from) == "latest":
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise FileNotFoundError(
                f"resume_from='latest' but {output_dir / CHECKPOINTS_DIR} holds no complete "
                "checkpoint: train without resume_from first (checkpoints are saved at each "
                "epoch end and every checkpoint_interval steps)"
            )
        return latest
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume_from={str(path)!r} does not exist or is not a directory, so it is not a "
            f"lowvram checkpoint: pass one such as <output_dir>/{CHECKPOINTS_DIR}/step_000100, "
            "or 'latest'"
        )
    if _UNFINISHED.fullmatch(path.name):
        raise _checkpoint_problem(
            path, "is an incomplete checkpoint: a save was interrupted while writing it"
        )
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"resume_from={str(path)!r} is not a lowvram checkpoint ({MANIFEST_FILE}, the file "
            f"written last, is missing): pass a directory such as "
            f"<output_dir>/{CHECKPOINTS_DIR}/step_000100, or 'latest'"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        files, saved_model = dict(manifest["files"]), manifest["model"]
        saved_train = manifest["train"]
    except (ValueError, KeyError, TypeError) as err:
        raise _checkpoint_problem(
            path, f"is corrupt: {MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
        ) from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise _checkpoint_problem(path, f"is corrupt: {name} is missing")
        if f.stat().st_size != size:
            raise _checkpoint_problem(
                path,
                f"is corrupt: {name} has {f.stat().st_size} bytes, its manifest says {size} "
                "(truncated or overwritten)",
            )
    if saved_model != dataclasses.asdict(model_config):
        raise ValueError(
            f"resume_from={str(path)!r} was written for the model {saved_model}, not "
            f"{dataclasses.asdict(model_config)}: resume with the same model config"
        )
    saved = (
        saved_train.get("per_device_train_batch_size"),
        saved_train.get("gradient_accumulation_steps"),
        manifest.get("num_processes"),
        manifest.get("batches_per_epoch"),
    )
    now = (
        train_config.per_device_train_batch_size,
        train_config.gradient_accumulation_steps,
        num_processes,
        batches_per_epoch,
    )
    if saved != now:
        names = "per_device_train_batch_size, gradient_accumulation_steps, processes, batches per epoch"
        raise ValueError(
            f"resume_from={str(path)!r} was written with ({names}) = {saved}, this run has "
            f"{now}: the checkpoint's data position would mean other rows. Resume with the same "
            "batch settings, process count and train data, or start a new run"
        )
    return path


def _load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[_LoopState, dict[str, Any]]:
    """``accelerator.load_state`` plus the loop state and history saved next to it (the
    checkpoint was checked by ``_check_checkpoint``; what still fails to load is corrupt)."""
    try:
        state = json.loads((path / LOOP_STATE_FILE).read_text())
        loop = _LoopState(**state["loop"])
        history = state["history"]
        # accelerate also loads the RNG states, the scheduler, AdamW and the GradScaler (it
        # would skip unreadable RNG states silently: the manifest's file sizes catch that)
        accelerator.load_state(str(path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise _checkpoint_problem(
            path, f"is corrupt: it could not be loaded ({type(err).__name__}: {first})"
        ) from err
    return loop, history


def _non_finite(record: dict[str, Any]) -> str | None:
    """What is not finite in an optimizer step's record, or None. Under a GradScaler an inf
    gradient norm is an fp16 overflow that the scaler skipped (counted, not an error)."""
    if not math.isfinite(record["loss"]):
        return f"the loss is {record['loss']}"
    if not math.isfinite(record["grad_norm"]) and not record["skipped"]:
        return f"the gradient norm is {record['grad_norm']} (the loss was {record['loss']:.4f})"
    return None


def _stop_non_finite(
    accelerator: Accelerator,
    output_dir: Path,
    history: dict[str, Any],
    record: dict[str, Any],
    problem: str,
    train_config: TrainConfig,
) -> NoReturn:
    """Write history.json with the steps done, then raise NonFiniteLossError. Called before
    the step is recorded or checkpointed, so no saved file holds the broken weights."""
    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    precision = history["precision"]
    scaler = "with" if accelerator.scaler is not None else "without"
    message = (
        f"training stopped at optimizer step {record['step']} (epoch {record['epoch']}): "
        f"{problem}. Nothing from this step was saved: {kept}, and {output_dir / HISTORY_FILE} "
        f"holds the {len(history['steps'])} steps before it. Likely causes: "
        f"(1) the learning rate is too high (this step ran at lr={record['lr']:.2e}, "
        f"max_lr={train_config.max_lr:g}): lower max_lr or warm up longer; "
        f"(2) fp16 overflow (this run: precision={precision!r} {scaler} a GradScaler): fp16 "
        "holds values only up to 65504, and a GradScaler guards the gradients but not the "
        "forward pass; use bf16 or 'no' (fp32); "
        "(3) bad data in this step's batches (token ids are range-checked, so look for rows "
        "unlike the rest)"
    )
    history["error"] = {"type": NonFiniteLossError.__name__, "step": record["step"], "message": message}
    if accelerator.is_main_process:
        _write_history(output_dir, history)
    raise NonFiniteLossError(message)


def _planner_advice(
    model_config: ModelConfig, train_config: TrainConfig, precision: str, card_gib: float
) -> str:
    """``lowvram.memory``'s plan for this model on this card: the largest micro-batch that
    fits, for this run's precision and for fp16. Computed only after an OOM (the planner
    measures a few steps on fake tensors: about a second each for the seed's model)."""
    from lowvram.memory import Recipe, plan

    recipes = [
        Recipe(p, precision=p, tie=model_config.tie_embeddings,
               checkpointing=model_config.gradient_checkpointing)
        for p in dict.fromkeys([precision, "fp16"])
    ]  # fmt: skip
    try:
        rows = plan(model_config, card_gib, train_config.effective_batch_size, recipes)
    except Exception as err:  # advice only: never hide the OOM behind the planner's failure
        return f"(lowvram.memory's planner failed: {type(err).__name__}: {err})"
    names = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
    advice = []
    for row in rows:
        p = row.recipe.precision
        if not row.fits:
            advice.append(
                f"with {names[p]} not even a micro-batch of 1 fits: turn on gradient_checkpointing "
                "and tie_embeddings in the ModelConfig, or use a smaller model or block_size"
            )
            continue
        advice.append(
            f"with {names[p]} micro-batch <= {row.micro_batch}, accumulation {row.accumulation} "
            f"(effective batch {row.effective_batch}): try --per-device-train-batch-size "
            f"{row.micro_batch} --gradient-accumulation-steps {row.accumulation} "
            f"--mixed-precision {p} (in Python: train_config.replace(per_device_train_batch_size="
            f"{row.micro_batch}, gradient_accumulation_steps={row.accumulation}, "
            f"mixed_precision={p!r}))"
        )
    return (
        f"The memory planner (lowvram.memory) says, for this model on a {card_gib:.1f} GiB card: "
        + "; ".join(advice)
    )


def _out_of_memory(
    original: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    precision: str,
    device: torch.device,
) -> TrainingOutOfMemoryError:
    """The OOM error a learner can act on: what ran, and what the planner says would fit."""
    if device.type == "cuda":
        card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:  # a test's artificial OOM: plan for the course's 4 GB card
        card_gib = 4.0
    tc = train_config
    return TrainingOutOfMemoryError(
        f"CUDA ran out of memory during training ({original}). This run: "
        f"per_device_train_batch_size={tc.per_device_train_batch_size}, "
        f"gradient_accumulation_steps={tc.gradient_accumulation_steps}, precision={precision!r}, "
        f"block_size={model_config.block_size}. "
        f"{_planner_advice(model_config, tc, precision, card_gib)}. Also close other programs "
        "that use the GPU (nvidia-smi lists them)."
    )


def _write_history(output_dir: Path, history: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))


@torch.no_grad()
def _evaluate(accelerator: Accelerator, model: torch.nn.Module, val_loader) -> float:
    """Mean validation loss over the whole (capped) val set, the same for any process count."""
    model.eval()
    losses = []
    for (rows,) in val_loader:
        X, Y = rows[:, :-1], rows[:, 1:]
        logits, _ = model(X)
        # one loss per sequence, so that gather_for_metrics can drop the samples that
        # accelerate repeated to give every process a full last batch
        per_seq = F.cross_entropy(logits.transpose(1, 2), Y, reduction="none").mean(dim=1)
        losses.append(accelerator.gather_for_metrics(per_seq))
    model.train()
    return torch.cat(losses).mean().item()


def reset_accelerate_state() -> None:
    """Forget this process's Accelerator so that the next ``train`` (or a ``notebook_launcher``)
    can start one with other settings; accelerate refuses otherwise."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------- the loop


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    train_data: torch.Tensor | None = None,
    val_data: torch.Tensor | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    cpu: bool | None = None,
    _force_grad_scaler: bool = False,
    _grad_hook: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train a GPTModel as the seed does, corrected; return the history (also in history.json).

    Args:
        model_config, train_config: the model's shape and the loop's settings (``get_preset``).
        train_data, val_data: LongTensors ``[N, block_size + 1]`` (checked with
            ``lowvram.data.check_rows``); by default
            ``lowvram.data.load_datasets(model_config, train_config.data_dir)``.
        resume_from: a checkpoint directory (``<output_dir>/checkpoints/step_XXXXXX``), or
            ``"latest"``: the newest complete one under ``train_config.output_dir``.
        progress: a progress bar on the main process.
        cpu: None uses the CUDA GPU if there is one, else the CPU (then launched processes
            do real data-parallel training over gloo); True forces the CPU.
        _force_grad_scaler: fp16 autocast and a GradScaler on the CPU (tests and the notebook).
        _grad_hook: called with the model at each optimizer step, after the gradients are
            complete and before clipping (tests).

    Returns:
        The history: config, precision, steps (one record per optimizer step), val losses.

    Raises:
        ValueError: bad data or settings, or a checkpoint that is corrupt, incomplete or
            written for another model or batch setting (the message says which and what to do).
        FileNotFoundError: missing data files or checkpoint.
        NonFiniteLossError: (a ``FloatingPointError``) the loss became NaN or inf.
        TrainingOutOfMemoryError: (a ``torch.OutOfMemoryError``) with the planner's advice.
    """
    # 1. Configuration: precision is decided once, before the Accelerator needs it.
    if cpu is None:
        cpu = not torch.cuda.is_available()
    elif not cpu and not torch.cuda.is_available():
        raise ValueError("cpu=False but no CUDA GPU is visible: use cpu=None (the GPU if any)")
    device = torch.device("cpu" if cpu else "cuda")
    if _force_grad_scaler:
        precision = "fp16"
        reason = "fp16 autocast with a GradScaler forced on the CPU (demonstration)"
    else:
        precision, reason = resolve_precision(train_config.mixed_precision, device)

    # 2. The Accelerator, created inside the function: notebook_launcher and accelerate launch
    #    can then run this function in each process. seed: it was a module-level global.
    accelerator = Accelerator(
        cpu=cpu,  # seed: no cpu=; on a CPU box the launched processes would not talk
        mixed_precision=precision,  # seed: 'fp16' even where it silently runs fp32
        gradient_accumulation_steps=train_config.gradient_accumulation_steps,
        # seed: a plain shuffle; a seedable sampler makes the order depend on (seed, epoch)
        # only, the same for 1 and 2 processes and reproducible when resuming mid-epoch
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=train_config.seed
        ),
    )
    if _force_grad_scaler:
        force_grad_scaler(accelerator)
    out_of_memory = None
    try:
        set_seed(train_config.seed)  # seed: no seed; now it also fixes the model's init
        return _train_loop(
            accelerator,
            model_config,
            train_config,
            precision,
            reason,
            train_data,
            val_data,
            resume_from,
            progress,
            _grad_hook,
        )
    except torch.cuda.OutOfMemoryError as err:
        # handled below, outside this block: the traceback holds the frames that hold the
        # GPU memory (PyTorch FAQ), so the error raised here does not chain to it
        out_of_memory = (str(err).strip().splitlines() or ["out of memory"])[0]
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            reset_accelerate_state()
    accelerator.free_memory()  # the model, optimizer and their GPU memory: a retry can fit
    raise _out_of_memory(out_of_memory, model_config, train_config, precision, device)


def _train_loop(
    accelerator: Accelerator,
    model_config: ModelConfig,
    train_config: TrainConfig,
    precision: str,
    reason: str,
    train_data: torch.Tensor | None,
    val_data: torch.Tensor | None,
    resume_from: str | Path | None,
    progress: bool,
    grad_hook: Callable[[torch.nn.Module], None] | None,
) -> dict[str, Any]:
    tc = train_config
    output_dir = Path(tc.output_dir)
    num_processes = accelerator.num_processes
    accum = tc.gradient_accumulation_steps

    # 3. Data: the seed's TensorDataset loaders.
    if (train_data is None) != (val_data is None):
        raise ValueError(
            "pass both train_data and val_data, or neither (then they are loaded from "
            f"data_dir={tc.data_dir!r})"
        )
    if train_data is None:
        train_data, val_data = load_datasets(model_config, tc.data_dir)
    else:  # the same checks as the files get: shape [N, block_size + 1], ids < vocab_size
        train_data = check_rows(train_data, model_config, "train_data")
        val_data = check_rows(val_data, model_config, "val_data")
    if tc.eval_max_batches is not None:
        # seed: no validation. Capped by rows, so that every process count sees the same rows.
        val_data = val_data[: tc.eval_max_batches * tc.per_device_eval_batch_size]
    train_loader, val_loader = build_dataloaders(
        train_data,
        val_data,
        batch_size=tc.per_device_train_batch_size,
        eval_batch_size=tc.per_device_eval_batch_size,
        drop_last=tc.drop_last,
        seed=tc.seed,
    )
    batches_per_epoch = _batches_per_process(len(train_loader), num_processes, tc.drop_last)
    if batches_per_epoch == 0:
        raise ValueError(
            f"train_data has {len(train_data)} rows: fewer than one batch of "
            f"per_device_train_batch_size={tc.per_device_train_batch_size} for each of "
            f"{num_processes} processes; use more data or a smaller batch"
        )
    if resume_from is not None:  # checked before anything is built: a wrong one fails fast
        resume_from = _check_checkpoint(
            resume_from, output_dir, model_config, tc, num_processes, batches_per_epoch
        )

    # 4. Model, optimizer and scheduler.
    model = GPTModel(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.max_lr, weight_decay=tc.weight_decay)
    # seed: total_steps = len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS.
    # Counted here in optimizer steps of one process. The prepared scheduler ticks
    # num_processes times per optimizer step (it assumes the LR is counted in samples of one
    # process), so its lengths are scaled by num_processes: the LR of step k is then the same
    # for any number of processes. (split_batches=True would tick once, but it would also
    # divide each batch between the processes and change what per_device_train_batch_size means.)
    # Under fp16 it also does not tick on a step that GradScaler skipped (as in HF's Trainer): each
    # skip delays the schedule by one step; history['skipped_steps'] says by how much.
    warmup_steps, total_steps = schedule_steps(
        batches_per_epoch, accum, tc.num_epochs, tc.max_steps, tc.warmup_ratio
    )
    num_epochs = math.ceil(total_steps / math.ceil(batches_per_epoch / accum))
    scheduler = _linear_schedule(optimizer, warmup_steps, total_steps, scale=num_processes)

    # 5. One prepare of all five, as in the seed.
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    if len(train_loader) != batches_per_epoch:  # the step count above relies on it
        raise RuntimeError(
            f"the prepared train loader has {len(train_loader)} batches per process, "
            f"lowvram expected {batches_per_epoch}: this accelerate version shards differently"
        )

    history: dict[str, Any] = {
        "config": {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(tc)},
        "precision": precision,
        "precision_reason": reason,
        "num_processes": num_processes,
        "effective_batch_size": tc.effective_batch_for(num_processes),
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "steps": [],
        "skipped_steps": 0,
        "val": [],
        "final_val_loss": None,
        "final_lr": None,
    }
    loop = _LoopState()
    if resume_from is not None:  # seed: no resume
        loop, saved = _load_checkpoint(accelerator, resume_from)
        if loop.step > total_steps:
            raise ValueError(
                f"resume_from={str(resume_from)!r} is at step {loop.step}, past this run's "
                f"total_steps={total_steps}: raise max_steps (or num_epochs) to train further"
            )
        history.update(steps=saved["steps"], val=saved["val"], skipped_steps=saved["skipped_steps"])
        accelerator.print(f"resumed from {resume_from} at step {loop.step}")

    accelerator.print(
        f"precision: {precision} ({reason}) | processes: {num_processes} | effective batch: "
        f"{history['effective_batch_size']} | steps: {total_steps} (warmup {warmup_steps})"
    )

    def evaluate() -> None:
        if not history["val"] or history["val"][-1]["step"] != loop.step:
            val_loss = _evaluate(accelerator, model, val_loader)
            history["val"].append({"step": loop.step, "loss": val_loss})
            accelerator.print(f"step {loop.step:>6} | val loss {val_loss:.4f}")

    last_checkpoint = loop.step if resume_from is not None else -1

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if last_checkpoint != loop.step:
            _save_checkpoint(
                accelerator, output_dir, loop, history, tc.keep_checkpoints, batches_per_epoch
            )
            last_checkpoint = loop.step

    from tqdm.auto import tqdm  # lazily: tqdm.auto pulls in the notebook machinery

    bar = tqdm(
        total=total_steps,
        initial=loop.step,
        desc="train",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    if loop.step == 0:
        evaluate()  # the starting point, about ln(vocab_size)

    # 6. The training loop.
    zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_loss, window_batches, window_tokens = zero.clone(), 0, 0
    for epoch in range(loop.epoch, num_epochs):
        if loop.step >= total_steps:
            break
        model.train()
        train_loader.set_epoch(epoch)  # the shuffle order of this epoch: (seed, epoch)
        batches = train_loader
        if loop.batches_in_epoch:  # resuming mid-epoch: skip what the checkpoint had consumed
            batches = accelerator.skip_first_batches(train_loader, loop.batches_in_epoch)
        for batch in batches:
            X, Y = batch[0][:, :-1], batch[0][:, 1:]
            with accelerator.accumulate(model):
                logits, loss = model(X, Y)
                accelerator.backward(loss)  # divides the loss by accum
                # seed: clipped on every micro-step. With fp16's GradScaler that raises
                # "unscale_() has already been called" at the 2nd micro-step; without one it
                # clips partial sums. Clip once, when the gradients are complete.
                if accelerator.sync_gradients:
                    if grad_hook is not None:
                        grad_hook(model)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                    lr = scheduler.get_last_lr()[0]  # the LR this step runs at
                    scale = accelerator.scaler.get_scale() if accelerator.scaler else None
                # seed: same calls; the prepared optimizer and scheduler act only on a sync
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_loss += loss.detach()
            window_batches += 1
            window_tokens += X.numel()
            loop.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done. seed: printed one micro-batch's loss of one process;
            # here the mean over the window's micro-batches and over the processes.
            totals = accelerator.reduce(
                torch.stack([window_loss, zero + window_batches, zero + window_tokens]), "sum"
            )
            window_loss, window_batches, window_tokens = zero.clone(), 0, 0
            skipped = accelerator.optimizer_step_was_skipped  # fp16 overflow: no update
            history["skipped_steps"] += int(skipped)
            loop.step += 1
            loop.tokens += int(totals[2].item())
            record = {
                "step": loop.step,
                "epoch": epoch,
                "tokens": loop.tokens,
                "loss": (totals[0] / totals[1]).item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "loss_scale": scale,
                "skipped": skipped,
            }
            problem = _non_finite(record)
            if problem:  # stop before these weights reach a checkpoint or the model file
                bar.close()
                _stop_non_finite(accelerator, output_dir, history, record, problem, tc)
            history["steps"].append(record)
            if loop.batches_in_epoch == batches_per_epoch:  # the epoch is complete
                loop.epoch, loop.batches_in_epoch = epoch + 1, 0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if loop.step % tc.log_interval == 0:
                accelerator.print(
                    f"step {loop.step:>6}/{total_steps} | epoch {epoch} | loss {record['loss']:.4f}"
                    f" | lr {lr:.2e} | grad norm {record['grad_norm']:.3f}"
                )
            if loop.step >= total_steps:
                break
            if tc.eval_interval and loop.step % tc.eval_interval == 0:
                evaluate()
            if tc.checkpoint_interval and loop.step % tc.checkpoint_interval == 0:
                checkpoint()
        # the end of an epoch, or of training: seed: "... (Gün 27 və Gün 28-də öyrəniləcək)"
        evaluate()
        checkpoint()
    bar.close()

    history["final_val_loss"] = history["val"][-1]["loss"]
    history["final_lr"] = scheduler.get_last_lr()[0]
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir))  # unwraps; -> model.safetensors
    if accelerator.is_main_process:
        _write_history(output_dir, history)
    skipped_note = ""
    if accelerator.scaler is not None:  # fp16: say how many updates the GradScaler dropped
        skipped_note = f" ({history['skipped_steps']} skipped by the GradScaler: fp16 overflow)"
    accelerator.print(
        f"final val loss {history['final_val_loss']:.4f} after {loop.step} steps{skipped_note}; "
        f"wrote {output_dir / 'model.safetensors'} and {output_dir / HISTORY_FILE}"
    )
    return history


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lowvram.train --preset NAME [...]``, also under ``accelerate launch``."""
    parser = argparse.ArgumentParser(
        prog="python -m lowvram.train",
        description="Train the Day-17 GPT with accelerate (steps are optimizer steps).",
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--output-dir", help="default: the preset's (runs/NAME)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps; overrides the epochs")
    parser.add_argument("--per-device-train-batch-size", type=int)
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--checkpoint-every", type=int, help="save_state every N optimizer steps")
    parser.add_argument(
        "--resume-from",
        help="a checkpoint directory to continue from, or 'latest' (the newest complete one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate's "simple" launcher sets MASTER_ADDR only for --num_processes > 1, yet
        # starts one process: `accelerate launch --cpu --num_processes 2` trains on one process
        warnings.warn(
            "this is one process although accelerate launch was asked for several: with --cpu it "
            "starts only one (without mpirun). On a machine without a GPU use `accelerate launch "
            "--multi_gpu --num_processes 2 -m lowvram.train ...` (or `torchrun --nproc_per_node 2 "
            "-m lowvram.train ...`): each process then trains on the CPU, data-parallel over gloo",
            UserWarning,
            stacklevel=1,
        )
    model_config, train_config = get_preset(args.preset)
    changes = {
        "output_dir": args.output_dir,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "mixed_precision": args.mixed_precision,
        "seed": args.seed,
        "data_dir": args.data_dir,
        "checkpoint_interval": args.checkpoint_every,
    }
    try:
        train_config = train_config.replace(**{k: v for k, v in changes.items() if v is not None})
    except ValueError as err:
        parser.error(str(err))
    try:
        train(
            model_config,
            train_config,
            resume_from=args.resume_from,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, NonFiniteLossError, torch.cuda.OutOfMemoryError) as err:
        # each message says what was wrong and what to do: a traceback would only hide it
        parser.exit(2, f"error: {type(err).__name__}: {err}\n")


if __name__ == "__main__":
    main()
