"""The lesson's ``train_accelerate.py``, corrected: one Day-25 training loop for every launcher.

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

``train`` reads top to bottom in the lesson's six parts (configuration, the Accelerator, the
data, model/optimizer/scheduler, one ``accelerator.prepare``, the loop); each place where it
differs from the lesson carries a ``# lesson:`` comment saying what the lesson did and why it
changed. What is not the loop has a module of its own: ``lowvram.precision``,
``lowvram.schedule``, ``lowvram.checkpoints`` (atomic, verified checkpoints; owned output
dirs) and ``lowvram.failures`` (NaN and out-of-memory reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch.nn import functional as F

from lowvram import checkpoints
from lowvram.checkpoints import HISTORY_FILE, LoopState, latest_checkpoint, write_history
from lowvram.config import PRECISIONS, PRESETS, ModelConfig, TrainConfig, get_preset
from lowvram.data import build_dataloaders, check_rows, load_datasets, rows_fingerprint
from lowvram.failures import (
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    is_cpu_out_of_memory,
    non_finite,
    non_finite_message,
    out_of_memory_error,
)
from lowvram.model import GPTModel
from lowvram.optim import OPTIMIZERS, build_optimizer
from lowvram.precision import force_grad_scaler, precision_advice, resolve_precision
from lowvram.schedule import (
    batches_per_process,
    count_optimizer_steps,
    follow_schedule,
    linear_schedule,
    lr_schedule,
    schedule_steps,
)

__all__ = [  # the names the notebooks import from here (most live in their own modules)
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


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    train_data: torch.Tensor | None = None,
    val_data: torch.Tensor | None = None,
    resume_from: str | Path | None = None,
    overwrite_output_dir: bool = False,
    progress: bool = True,
    cpu: bool | None = None,
    on_optimizer_step: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train a GPTModel as the lesson does, corrected; return the history (also in history.json).

    Args:
        model_config, train_config: the model's shape and the loop's settings (``get_preset``).
        train_data, val_data: LongTensors ``[N, block_size + 1]``; by default loaded from
            ``train_config.data_dir`` (``lowvram.data.load_datasets``).
        resume_from: a checkpoint directory, or ``"latest"`` (the newest of this run). With a
            larger ``max_steps`` the run is extended: the LR follows the new schedule.
        overwrite_output_dir: a fresh run may replace another run's files in ``output_dir``.
        progress: a progress bar on the main process.
        cpu: None: the CUDA GPU if there is one, else the CPU; True forces the CPU.
        on_optimizer_step: called with the model at each optimizer step, once the gradients
            are complete and before clipping (e.g. to look at the gradients).

    Raises:
        ValueError: bad data or settings, or a checkpoint that is corrupt or another run's.
        FileNotFoundError: missing data files or checkpoint.
        OSError: an output dir that is a file, read-only, full, locked or another run's.
        NonFiniteLossError: the loss became NaN or inf (a ``FloatingPointError``).
        TrainingOutOfMemoryError: with the planner's advice (a ``torch.OutOfMemoryError``).
    """
    # 1. Configuration: the device and the precision are decided once, before the Accelerator.
    # lesson: module constants (BLOCK_SIZE, BATCH_SIZE, ...); here the two config dataclasses
    output_dir = Path(train_config.output_dir)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    elif not cpu and not torch.cuda.is_available():
        raise ValueError("cpu=False but no CUDA GPU is visible: use cpu=None (the GPU if any)")
    device = torch.device("cpu" if cpu else "cuda")
    precision, reason = resolve_precision(train_config.mixed_precision, device)

    # 2. The Accelerator, created inside the function, so that notebook_launcher and accelerate
    #    launch can run this function in each process. lesson: a module-level global.
    accelerator = Accelerator(
        cpu=cpu,  # lesson: no cpu=; on a CPU box the launched processes would not talk
        mixed_precision=precision,  # lesson: 'fp16' even where it silently runs fp32
        gradient_accumulation_steps=train_config.gradient_accumulation_steps,
        # lesson: a plain shuffle; a seedable sampler makes the order depend on (seed, epoch)
        # only, the same for 1 and 2 processes and reproducible when resuming mid-epoch
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_config.seed),
    )
    if device.type == "cpu" and accelerator.num_processes > 1:
        torch.set_num_threads(_threads_per_process(accelerator.num_processes))
    if precision == "fp16" and device.type == "cpu":  # only a demonstration asks for this
        force_grad_scaler(accelerator)  # fp16 autocast + GradScaler, as on the 4 GB card
    lock = checkpoints.OutputDirLock(output_dir, log=accelerator.print)
    out_of_memory = None
    try:
        set_seed(train_config.seed)  # lesson: no seed; now it also fixes the model's init

        # 3. Data: the lesson's TensorDataset loaders (lesson: no validation, no checks).
        train_data, val_data = _datasets(model_config, train_config, train_data, val_data)
        train_loader, val_loader = build_dataloaders(
            train_data, val_data, batch_size=train_config.per_device_train_batch_size,
            eval_batch_size=train_config.per_device_eval_batch_size, drop_last=train_config.drop_last, seed=train_config.seed,
        )  # fmt: skip
        num_processes = accelerator.num_processes
        batches_per_epoch = batches_per_process(len(train_loader), num_processes, train_config.drop_last)
        if batches_per_epoch == 0:
            raise ValueError(
                f"train_data has {len(train_data)} rows: fewer than one batch of "
                f"per_device_train_batch_size={train_config.per_device_train_batch_size} for each of "
                f"{num_processes} processes; use more data or a smaller batch"
            )
        identity = checkpoints.run_identity(model_config, train_config, num_processes, batches_per_epoch,
                                            rows_fingerprint(train_data))
        if resume_from is not None:  # lesson: no resume. Checked before anything is built.
            resume_from = checkpoints.resolve_checkpoint(resume_from, output_dir, identity,
                                                         log=accelerator.print)

        # 4. Model, optimizer and scheduler.
        model = GPTModel(model_config)
        # lesson: torch.optim.AdamW; train_config.optimizer="adamw8bit" keeps its two moments
        # in 8 bits (bitsandbytes), 2 bytes of state per parameter instead of 8
        optimizer = build_optimizer(model.parameters(), train_config)
        # lesson: total_steps = len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS
        # on the unprepared loader. Counted here in optimizer steps of one process; the prepared
        # scheduler ticks num_processes times per optimizer step, so its lengths are scaled by
        # num_processes and the LR of step k is the same for any number of processes. Under
        # fp16 it does not tick on a step the GradScaler skipped (as in HF's Trainer).
        warmup_steps, total_steps = schedule_steps(
            batches_per_epoch, train_config.gradient_accumulation_steps, train_config.num_epochs, train_config.max_steps,
            train_config.warmup_ratio,
        )  # fmt: skip
        num_epochs = math.ceil(total_steps / math.ceil(batches_per_epoch / train_config.gradient_accumulation_steps))
        scheduler = linear_schedule(optimizer, warmup_steps, total_steps, scale=num_processes)
        # lesson: no output dir. Checked before training; one training writes to it at a time.
        _claim_output_dir(accelerator, lock, resume_from is None, overwrite_output_dir,
                          model.num_parameters())

        # 5. One prepare of all five, as in the lesson.
        model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        assert len(train_loader) == batches_per_epoch, "this accelerate shards differently"

        history: dict[str, Any] = {
            "config": {"model": dataclasses.asdict(model_config),
                       "train": dataclasses.asdict(train_config)},
            "precision": precision, "precision_reason": reason,
            "precision_advice": precision_advice(precision, device),
            "num_processes": num_processes,
            "effective_batch_size": train_config.effective_batch_for(num_processes),
            "total_steps": total_steps, "warmup_steps": warmup_steps,
            "steps": [], "skipped_steps": 0, "val": [], "final_val_loss": None, "final_lr": None,
        }  # fmt: skip
        loop = LoopState()
        if resume_from is not None:  # lesson: no resume
            loop = _resume(accelerator, resume_from, model, scheduler, history)
        accelerator.print(
            f"precision: {precision} ({reason}) | processes: {num_processes} | effective batch: "
            f"{history['effective_batch_size']} | steps: {total_steps} (warmup {warmup_steps})"
        )

        def evaluate() -> None:
            if not history["val"] or history["val"][-1]["step"] != loop.step:
                val_loss = _evaluate(accelerator, model, val_loader)
                history["val"].append({"step": loop.step, "loss": val_loss})
                accelerator.print(f"step {loop.step:>6} | val loss {val_loss:.4f}")

        saved_at = loop.step if resume_from is not None else -1

        def checkpoint() -> None:
            nonlocal saved_at
            if saved_at != loop.step:
                checkpoints.save_checkpoint(accelerator, output_dir, loop, history,
                                            train_config.keep_checkpoints, identity)
                saved_at = loop.step

        from tqdm.auto import tqdm  # lazily: tqdm.auto pulls in the notebook machinery

        bar = tqdm(total=total_steps, initial=loop.step, desc="train", unit="step",
                   disable=not (progress and accelerator.is_main_process))
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
            if loop.batches_in_epoch:  # resuming mid-epoch: skip what the checkpoint consumed
                batches = accelerator.skip_first_batches(train_loader, loop.batches_in_epoch)
            for batch in batches:
                X, Y = batch[0][:, :-1], batch[0][:, 1:]
                with accelerator.accumulate(model):
                    logits, loss = model(X, Y)
                    accelerator.backward(loss)  # divides the loss by the accumulation steps
                    # lesson: clipped on every micro-step. With fp16's GradScaler that raises
                    # "unscale_() has already been called" at the 2nd micro-step; without one it
                    # clips partial sums. Clip once, when the gradients are complete.
                    if accelerator.sync_gradients:
                        if on_optimizer_step is not None:
                            on_optimizer_step(model)
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
                        lr = scheduler.get_last_lr()[0]  # the LR this step runs at
                        scale = accelerator.scaler.get_scale() if accelerator.scaler else None
                    # lesson: the same calls; the prepared optimizer and scheduler act on a sync
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                window_loss += loss.detach()
                window_batches += 1
                window_tokens += X.numel()
                loop.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                # One optimizer step done. lesson: printed one micro-batch's loss of one
                # process; here the mean over the window's micro-batches and the processes.
                totals = accelerator.reduce(
                    torch.stack([window_loss, zero + window_batches, zero + window_tokens]), "sum"
                )
                window_loss, window_batches, window_tokens = zero.clone(), 0, 0
                skipped = accelerator.optimizer_step_was_skipped  # fp16 overflow: no update
                history["skipped_steps"] += int(skipped)
                loop.step += 1
                loop.tokens += int(totals[2].item())
                record = {
                    "step": loop.step, "epoch": epoch, "tokens": loop.tokens,
                    "loss": (totals[0] / totals[1]).item(), "lr": lr,
                    "grad_norm": grad_norm.item(), "loss_scale": scale, "skipped": skipped,
                }  # fmt: skip
                problem = non_finite(record)
                if problem:  # stop before these weights reach a checkpoint or the model file
                    bar.close()
                    _stop_non_finite(accelerator, output_dir, history, record, problem, train_config)
                history["steps"].append(record)
                if loop.batches_in_epoch == batches_per_epoch:  # the epoch is complete
                    loop.epoch, loop.batches_in_epoch = epoch + 1, 0
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if loop.step % train_config.log_interval == 0:
                    accelerator.print(
                        f"step {loop.step:>6}/{total_steps} | epoch {epoch} | loss "
                        f"{record['loss']:.4f} | lr {lr:.2e} | grad norm {record['grad_norm']:.3f}"
                    )
                if loop.step >= total_steps:
                    break
                if train_config.eval_interval and loop.step % train_config.eval_interval == 0:
                    evaluate()
                if train_config.checkpoint_interval and loop.step % train_config.checkpoint_interval == 0:
                    checkpoint()
            # the end of an epoch, or of training. lesson: "... (Gün 27 və Gün 28-də öyrəniləcək)"
            evaluate()
            checkpoint()
        bar.close()

        history["final_val_loss"] = history["val"][-1]["loss"]
        history["final_lr"] = scheduler.get_last_lr()[0]
        _save_model_and_history(accelerator, model, output_dir, history, loop.step)
        return history
    except torch.cuda.OutOfMemoryError as err:
        # handled below, outside this block: the traceback holds the frames that hold the
        # GPU memory (PyTorch FAQ), so the error raised there does not chain to it
        out_of_memory = (str(err).strip().splitlines() or ["out of memory"])[0], False
    except RuntimeError as err:
        if not is_cpu_out_of_memory(err):
            raise
        out_of_memory = (str(err).strip().splitlines() or ["out of memory"])[0], True
    finally:
        lock.release()
        accelerator.end_training()
        if accelerator.num_processes == 1:
            reset_accelerate_state()
    accelerator.free_memory()  # the model, optimizer and their memory: a retry can fit
    original, on_cpu = out_of_memory
    raise out_of_memory_error(original, model_config, train_config, precision, device, cpu_allocator=on_cpu)


# ----------------------------------------------------------------------------- loop helpers


def _threads_per_process(num_processes: int) -> int:
    """Threads for each of several CPU processes: never more than their share of the cores.

    More threads than cores in all only spin-wait on each other: OMP_NUM_THREADS=3 (set for one
    process) in each of 2 processes on 2 cores made notebook 25_4's launched run several times
    slower. accelerate keeps such a variable as it is, so the share is applied here.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(torch.get_num_threads(), max(1, (cores or 1) // num_processes))


def _datasets(model_config: ModelConfig, train_config: TrainConfig,
              train_data: torch.Tensor | None, val_data: torch.Tensor | None):
    """(train, val) rows: given (checked like files: ``[N, block_size + 1]``, ids < vocab_size)
    or loaded from ``data_dir``; val capped by ``eval_max_batches`` (by rows: every process
    count sees the same rows)."""
    if (train_data is None) != (val_data is None):
        raise ValueError("pass both train_data and val_data, or neither (then they are "
                         f"loaded from data_dir={train_config.data_dir!r})")
    if train_data is None:
        train_data, val_data = load_datasets(model_config, train_config.data_dir)
    else:
        train_data = check_rows(train_data, model_config, "train_data")
        val_data = check_rows(val_data, model_config, "val_data")
    if train_config.eval_max_batches is not None:
        val_data = val_data[: train_config.eval_max_batches * train_config.per_device_eval_batch_size]
    return train_data, val_data


def _claim_output_dir(accelerator: Accelerator, lock: checkpoints.OutputDirLock, fresh: bool,
                      overwrite: bool, num_parameters: int) -> None:
    """Every process checks the output dir (``checkpoints.check_output_dir``); then the main
    process takes its lock and, for ``overwrite``, deletes the earlier run's files."""
    output_dir = lock.path.parent
    checkpoints.check_output_dir(output_dir, resume=not fresh, overwrite=overwrite,
                                 num_parameters=num_parameters)
    accelerator.wait_for_everyone()  # every process checked the dir before it changes
    if accelerator.is_main_process:
        lock.acquire()
        if overwrite and fresh:
            checkpoints.overwrite_output_dir(output_dir)


def _resume(accelerator: Accelerator, path: Path, model, scheduler, history: dict[str, Any]):
    """Load the checked checkpoint ``path`` into the prepared objects; its steps into
    ``history``; return its loop state."""
    loop, saved = checkpoints.load_checkpoint(accelerator, path, model)
    if loop.step > history["total_steps"]:
        raise ValueError(
            f"resume_from={str(path)!r} is at step {loop.step}, past this run's "
            f"total_steps={history['total_steps']}: raise max_steps (or num_epochs) to train further"
        )
    follow_schedule(scheduler)  # an extended run: the LR of the new schedule
    history.update(steps=saved["steps"], val=saved["val"], skipped_steps=saved["skipped_steps"])
    accelerator.print(f"resumed from {path} at step {loop.step}")
    return loop


def _save_model_and_history(accelerator: Accelerator, model, output_dir: Path,
                            history: dict[str, Any], steps: int) -> None:
    """model.safetensors and history.json, and the closing line."""
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir))  # unwraps; -> model.safetensors
    if accelerator.is_main_process:
        write_history(output_dir, history)
    skipped_note = ""
    if accelerator.scaler is not None:  # fp16: say how many updates the GradScaler dropped
        skipped_note = f" ({history['skipped_steps']} skipped by the GradScaler: fp16 overflow)"
    accelerator.print(
        f"final val loss {history['final_val_loss']:.4f} after {steps} steps{skipped_note}; "
        f"wrote {output_dir / 'model.safetensors'} and {output_dir / HISTORY_FILE}"
    )


def _stop_non_finite(accelerator: Accelerator, output_dir: Path, history: dict[str, Any],
                     record: dict[str, Any], problem: str, train_config: TrainConfig):
    """Write history.json with the steps done, then raise NonFiniteLossError. Called before
    the step is recorded or checkpointed, so no saved file holds the broken weights."""
    last = latest_checkpoint(output_dir)
    message = non_finite_message(
        record, problem, steps_done=len(history["steps"]),
        last_checkpoint=str(last) if last else None, history_file=str(output_dir / HISTORY_FILE),
        precision=history["precision"], has_scaler=accelerator.scaler is not None,
        max_lr=train_config.max_lr,
    )  # fmt: skip
    history["error"] = {"type": NonFiniteLossError.__name__, "step": record["step"], "message": message}
    if accelerator.is_main_process:
        write_history(output_dir, history)
    raise NonFiniteLossError(message)


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


# ----------------------------------------------------------------------------- command line


def _interrupted(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """The Ctrl-C line: what was saved, and the command that resumes."""
    out = Path(args.output_dir or get_preset(args.preset)[1].output_dir)
    last = latest_checkpoint(out)
    if last is None:
        return f"interrupted: no checkpoint was saved yet in {out}; start again with the same command"
    keep, skip = [], False
    for a in argv:  # the same command without its --resume-from / --overwrite-output-dir
        if skip or a in ("--overwrite-output-dir",):
            skip = False
            continue
        if a == "--resume-from":
            skip = True
            continue
        if not a.startswith("--resume-from="):
            keep.append(a)
    command = shlex.join(["python", "-m", "lowvram.train", *keep, "--resume-from", "latest"])
    return f"interrupted: the last checkpoint is {last}; resume with: {command}"


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
    parser.add_argument("--mixed-precision", choices=list(PRECISIONS))
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS),
                        help="adamw (the lesson's), or adamw8bit (bitsandbytes: 8-bit moments)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--checkpoint-every", type=int, help="save_state every N optimizer steps")
    parser.add_argument(
        "--resume-from",
        help="a checkpoint directory to continue from, or 'latest' (the newest of this run)",
    )
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="a fresh run may replace another run's files in the output dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    argv = sys.argv[1:] if argv is None else list(argv)
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
        "optimizer": args.optimizer,
        "seed": args.seed,
        "data_dir": args.data_dir,
        "checkpoint_interval": args.checkpoint_every,
    }
    try:
        train_config = train_config.replace(**{k: v for k, v in changes.items() if v is not None})
    except ValueError as err:
        parser.error(str(err))
    try:
        history = train(model_config, train_config, resume_from=args.resume_from,
                        overwrite_output_dir=args.overwrite_output_dir,
                        progress=not args.no_progress)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(_interrupted(args, argv), file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, NonFiniteLossError, torch.cuda.OutOfMemoryError) as err:
        # each message says what was wrong and what to do: a traceback would only hide it
        parser.exit(2, f"error: {type(err).__name__}: {err}\n")
    if history.get("precision_advice") and os.environ.get("RANK", "0") == "0":
        print(f"note: {history['precision_advice']}", file=sys.stderr)


if __name__ == "__main__":
    main()
