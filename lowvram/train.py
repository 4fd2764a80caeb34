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
    python -m lowvram.train --preset rtx2050 --loss-chunk-size 1024 --optimizer adamw8bit
    accelerate launch --multi_gpu --num_processes 2 -m lowvram.train --preset cpu-demo

(the second: a recipe of the memory planner, spelled as it prints it. Every recipe option of
``python -m lowvram.memory`` has the same spelling here: ``--tie-embeddings``,
``--gradient-checkpointing``, ``--loss-chunk-size N``, ``--optimizer``, ``--adamw-impl``.)

(``--multi_gpu`` is accelerate's torchrun launcher: without a GPU each process trains on the
CPU, data-parallel over gloo. ``accelerate launch --cpu --num_processes 2`` starts only ONE
process; ``main`` warns when it sees that.)

``train`` reads top to bottom in the lesson's six parts (configuration, the Accelerator, the
data, model/optimizer/scheduler, one ``accelerator.prepare``, the loop); each place where it
differs from the lesson carries a ``# lesson:`` comment saying what the lesson did and why it
changed. What is not the loop has a module of its own: ``precision``, ``schedule``, ``optim``,
``history``, ``checkpoints``, ``outputdir`` and ``failures`` (NaN and out-of-memory reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
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

from lowvram import checkpoints, outputdir
from lowvram.config import ADAMW_IMPLS, PRECISIONS, PRESETS, ModelConfig, TrainConfig, get_preset
from lowvram.data import build_dataloaders, rows_fingerprint, training_rows
from lowvram.environment import (
    one_process_launch,
    threads_per_process,
    training_device,
    warn_if_gpu_left_unused,
)
from lowvram.failures import (
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    interrupted_message,
    non_finite,
    out_of_memory_error,
    out_of_memory_in,
    stop_non_finite,
)
from lowvram.history import StepLog, log_line, new_history
from lowvram.model import GPTModel
from lowvram.optim import OPTIMIZERS, build_optimizer
from lowvram.precision import (
    force_grad_scaler,
    precision_advice,
    requested_precision,
    resolve_precision,
)
from lowvram.schedule import (
    batches_per_process,
    count_optimizer_steps,
    effective_batch,
    follow_schedule,
    linear_schedule,
    lr_schedule,
    schedule_steps,
)

__all__ = [  # the names the notebooks import from here (most live in their own modules)
    "NonFiniteLossError", "TrainingOutOfMemoryError", "count_optimizer_steps", "force_grad_scaler",
    "lr_schedule", "main", "reset_accelerate_state", "resolve_precision", "schedule_steps", "train",
]  # fmt: skip


def train(model_config: ModelConfig, train_config: TrainConfig, *,
          train_data: torch.Tensor | None = None, val_data: torch.Tensor | None = None,
          resume_from: str | Path | None = None, overwrite_output_dir: bool = False,
          progress: bool = True, cpu: bool | None = None, mixed_precision: str | None = None,
          on_optimizer_step: Callable[[torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Train a GPTModel as the lesson does, corrected; return the history (also in history.json).

    ``train_data``/``val_data``: LongTensors ``[N, block_size + 1]`` (default: loaded from
    ``train_config.data_dir``). ``resume_from``: a checkpoint directory, or ``"latest"`` (the
    newest of this run); with a larger ``max_steps`` the run is extended. ``overwrite_output_dir``:
    a fresh run may replace another run's files. ``cpu``: None is the GPU if any, else the CPU.
    ``mixed_precision``: an explicit choice (the CLI's ``--mixed-precision``) that beats
    accelerate's configured precision, which beats ``train_config.mixed_precision`` (the preset's;
    ``lowvram.precision.requested_precision``). The ``precision:`` line says which one won.
    ``on_optimizer_step(model)``: called at each optimizer step, with the gradients complete and
    before clipping. Raises ValueError (bad data, settings or checkpoint), FileNotFoundError,
    OSError (an output dir that is a file, read-only, full, locked or another run's),
    NonFiniteLossError (NaN/inf) and TrainingOutOfMemoryError (with the planner's advice).

    No tensor value is read back per micro-batch or per step (on a GPU each read waits for it):
    the step records stay on the device until a log step, an evaluation, a checkpoint or the
    end (``lowvram.history.StepLog``). So a NaN/inf step stops the run up to ``log_interval``
    steps late, but always before anything is saved after it.
    """
    # 1. Configuration: the device and the precision are decided once, before the Accelerator.
    # lesson: module constants (BLOCK_SIZE, BATCH_SIZE, ...); here the two config dataclasses
    output_dir = Path(train_config.output_dir)
    warn_if_gpu_left_unused(cpu)  # a CPU build of torch, or a CUDA build on a too-old driver
    device = training_device(cpu)
    requested, source = requested_precision(train_config.mixed_precision, mixed_precision)
    precision, reason = resolve_precision(requested, device)
    reason = f"{requested!r} from {source}: {reason}"  # which of the three won

    # 2. The Accelerator, created inside the function, so that notebook_launcher and accelerate
    #    launch can run this function in each process. lesson: a module-level global.
    accelerator = Accelerator(
        cpu=device.type == "cpu",  # lesson: no cpu=; launched CPU processes would not talk
        mixed_precision=precision,  # lesson: 'fp16' even where it silently runs fp32
        gradient_accumulation_steps=train_config.gradient_accumulation_steps,
        # lesson: a plain shuffle; a seedable sampler makes the order depend on (seed, epoch)
        # only, the same for 1 and 2 processes and reproducible when resuming mid-epoch
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=train_config.seed,
                                                  non_blocking=device.type == "cuda"),
    )
    num_processes = accelerator.num_processes
    if device.type == "cpu" and num_processes > 1:
        torch.set_num_threads(threads_per_process(num_processes))
    lock = outputdir.OutputDirLock(output_dir, log=accelerator.print)
    try:
        set_seed(train_config.seed)  # lesson: no seed; now it also fixes the model's init

        # 3. Data: the lesson's TensorDataset loaders (lesson: no validation, no checks).
        train_data, val_data = training_rows(model_config, train_config, train_data, val_data)
        train_loader, val_loader = build_dataloaders(
            train_data, val_data, batch_size=train_config.per_device_train_batch_size,
            eval_batch_size=train_config.per_device_eval_batch_size,
            drop_last=train_config.drop_last, seed=train_config.seed,
            # on a GPU: page-locked batches, copied without a wait (non_blocking above). A
            # plain copy makes the CPU wait for the GPU to finish all queued work, 1x per
            # micro-batch (measured on an H200: 4 of the 5 waits of the lesson's 4 x 4 step)
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        batches_per_epoch = batches_per_process(len(train_loader), num_processes,
                                                train_config.drop_last, rows=len(train_data))
        identity = checkpoints.run_identity(model_config, train_config, num_processes,
                                            batches_per_epoch, rows_fingerprint(train_data))
        if resume_from is not None:  # lesson: no resume. Checked before anything is built.
            resume_from = checkpoints.resolve_checkpoint(resume_from, output_dir, identity,
                                                         log=accelerator.print)

        # 4. Model, optimizer and scheduler.
        model = GPTModel(model_config)
        # the rows were range-checked once above: reading each batch's min/max token id would
        # make the CPU wait for the GPU twice per micro-batch
        model.check_token_range = False
        # lesson: torch.optim.AdamW; train_config.optimizer="adamw8bit" keeps its two moments
        # in 8 bits (bitsandbytes), 2 bytes of state per parameter instead of 8
        optimizer = build_optimizer(model.parameters(), train_config)
        # lesson: total_steps = len(train_dataloader) * NUM_EPOCHS // GRADIENT_ACCUMULATION_STEPS
        # on the unprepared loader. Counted here in optimizer steps of one process; the prepared
        # scheduler ticks num_processes times per optimizer step, so its lengths are scaled by
        # num_processes and the LR of step k is the same for any number of processes. Under
        # fp16 it does not tick on a step the GradScaler skipped (as in HF's Trainer).
        accumulation = train_config.gradient_accumulation_steps
        warmup_steps, total_steps = schedule_steps(batches_per_epoch, accumulation,
                                                   train_config.num_epochs, train_config.max_steps,
                                                   train_config.warmup_ratio)
        num_epochs = math.ceil(total_steps / math.ceil(batches_per_epoch / accumulation))
        scheduler = linear_schedule(optimizer, warmup_steps, total_steps, scale=num_processes)
        # lesson: no output dir. Checked before training; one training writes to it at a time.
        outputdir.claim_output_dir(accelerator, lock, fresh=resume_from is None,
                                   overwrite=overwrite_output_dir,
                                   num_parameters=model.num_parameters(), resume_from=resume_from)

        # 5. One prepare of all five, as in the lesson.
        model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        assert len(train_loader) == batches_per_epoch, "this accelerate shards differently"

        history = new_history(model_config, train_config, precision=precision, reason=reason,
                              advice=precision_advice(precision, device), num_processes=num_processes,
                              total_steps=total_steps, warmup_steps=warmup_steps)
        history["effective_batch_size"], short = effective_batch(  # n66: the batch really used
            batches_per_epoch, train_config.per_device_train_batch_size, accumulation, num_processes)
        if short:
            accelerator.print(f"note: {short}")
        loop = checkpoints.LoopState()
        if resume_from is not None:  # lesson: no resume
            loop = checkpoints.resume(accelerator, resume_from, model, history)
            follow_schedule(scheduler)  # an extended run: the LR of the new schedule
        accelerator.print(
            f"precision: {precision} ({reason}) | processes: {num_processes} | effective batch: "
            f"{history['effective_batch_size']} | steps: {total_steps} (warmup {warmup_steps})"
        )
        saved_at = loop.step if resume_from is not None else -1

        def read_steps() -> None:  # the steps' records, copied from the device in one go
            for record in steps.read(loop):
                if problem := non_finite(record):  # NaN or inf: stop, before anything is saved
                    steps.close()
                    stop_non_finite(accelerator, output_dir, history, record, problem,
                                    train_config.max_lr)
                history["steps"].append(record)
                history["skipped_steps"] += record["skipped"]  # fp16 overflow: the scaler skipped it
                if _due(record["step"], train_config.log_interval):
                    accelerator.print(log_line(record, total_steps))

        def evaluate() -> None:  # once per step
            if not history["val"] or history["val"][-1]["step"] != loop.step:
                val_loss = _evaluate(accelerator, model, val_loader)
                history["val"].append({"step": loop.step, "loss": val_loss})
                accelerator.print(f"step {loop.step:>6} | val loss {val_loss:.4f}")

        def checkpoint() -> None:  # once per step
            nonlocal saved_at
            if saved_at != loop.step:
                checkpoints.save_checkpoint(accelerator, output_dir, loop, history,
                                            train_config.keep_checkpoints, identity)
                saved_at = loop.step

        steps = StepLog(accelerator, total_steps=total_steps, initial_step=loop.step,
                        progress=progress)
        if loop.step == 0:
            evaluate()  # the starting point, about ln(vocab_size)

        # 6. The training loop.
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
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                train_config.max_grad_norm)
                        lr = scheduler.get_last_lr()[0]  # the LR this step runs at
                        scale = steps.loss_scale()  # a device copy; None without a GradScaler
                        # lesson: the same three calls on every micro-batch. The prepared ones
                        # do nothing until the gradients are complete, but each call still costs
                        # the host accelerate's checks (a package lookup in optimizer.step):
                        # time a host-bound GPU waits for (lowvram._bench.host_ops)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                steps.add(loss, X.numel())  # lesson: loss.item() of one micro-batch
                loop.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                # One optimizer step done: its values stay on the device (no wait for the GPU).
                # They are read at log steps and before every evaluation and save, where a
                # NaN or inf stops the run: up to log_interval steps late, never after a save.
                loop.step += 1
                steps.step(loop.step, epoch, lr=lr, grad_norm=grad_norm, loss_scale=scale)
                if loop.batches_in_epoch == batches_per_epoch:  # the epoch is complete
                    loop.epoch, loop.batches_in_epoch = epoch + 1, 0
                if loop.step >= total_steps:
                    break
                evaluate_now = _due(loop.step, train_config.eval_interval)
                save_now = _due(loop.step, train_config.checkpoint_interval)
                if evaluate_now or save_now or _due(loop.step, train_config.log_interval):
                    read_steps()  # lesson: loss.item() every 100 micro-steps
                if evaluate_now:
                    evaluate()
                if save_now:
                    checkpoint()
            # the end of an epoch, or of training. lesson: "... (Gün 27 və Gün 28-də öyrəniləcək)"
            read_steps()
            evaluate()
            checkpoint()
        steps.close()

        history["final_val_loss"] = history["val"][-1]["loss"]
        history["final_lr"] = scheduler.get_last_lr()[0]
        outputdir.save_model_and_history(accelerator, model, output_dir, history)
        return history
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        # raised below, outside this block: the traceback holds the frames that hold the
        # GPU memory (PyTorch FAQ), so the error raised there does not chain to it
        out_of_memory = out_of_memory_in(err)
        if out_of_memory is None:
            raise
    finally:
        lock.release()
        accelerator.end_training()
        if num_processes == 1:
            reset_accelerate_state()
    accelerator.free_memory()  # the model, optimizer and their memory: a retry can fit
    original, on_cpu = out_of_memory
    raise out_of_memory_error(original, model_config, train_config, precision, device,
                              cpu_allocator=on_cpu)


# ----------------------------------------------------------------------------- loop helpers


def _due(step: int, interval: int) -> bool:
    """Whether something done every ``interval`` optimizer steps is due at ``step`` (0: never)."""
    return interval > 0 and step % interval == 0

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
    # the memory planner's recipe options, spelled as in `python -m lowvram.memory`, so that a
    # plan row runs as printed; each maps onto the ModelConfig/TrainConfig field of its name
    parser.add_argument("--adamw-impl", choices=list(ADAMW_IMPLS),
                        help="torch AdamW's kernel: foreach, fused (no parameter-sized temporary) "
                             "or loop; default: torch's for the device (foreach on CUDA)")
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction,
                        help="share the token embedding with the lm head (vocab x n_embd fewer "
                             "parameters; a different model, so no resuming across it)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="recompute each block in backward: less activation memory, ~30%% "
                             "more compute")
    parser.add_argument("--loss-chunk-size", type=int, metavar="N",
                        help="lm head + loss over N tokens at a time, recomputed in backward: "
                             "no full logits (0: off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--checkpoint-every", type=int, dest="checkpoint_interval",
                        help="save_state every N optimizer steps")
    parser.add_argument(
        "--resume-from",
        help="a checkpoint directory to continue from, or 'latest' (the newest of this run)",
    )
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="a fresh run may replace another run's files in the output dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    problem = one_process_launch()
    if problem:
        warnings.warn(problem, UserWarning, stacklevel=1)
    model_config, train_config = get_preset(args.preset)
    given = {k: v for k, v in vars(args).items() if v is not None}  # the options named like fields

    def named_like(config: type) -> dict[str, Any]:
        return {f.name: given[f.name] for f in dataclasses.fields(config) if f.name in given}

    try:
        model_config = dataclasses.replace(model_config, **named_like(ModelConfig))
        train_config = train_config.replace(**named_like(TrainConfig))
    except ValueError as err:  # "field=value is not allowed: ..." -> "argument --option: ..."
        field = str(err).split("=", 1)[0]
        option = next((a.option_strings[0] for a in parser._actions
                       if a.dest == field and a.option_strings), None)
        parser.error(f"argument {option}: {err}" if option else str(err))
    try:
        history = train(model_config, train_config, resume_from=args.resume_from,
                        mixed_precision=args.mixed_precision,  # beats accelerate's and the preset's
                        overwrite_output_dir=args.overwrite_output_dir,
                        progress=not args.no_progress)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_message(Path(train_config.output_dir), argv), file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, NonFiniteLossError, torch.cuda.OutOfMemoryError) as err:
        # each message says what was wrong and what to do: a traceback would only hide it
        parser.exit(2, f"error: {type(err).__name__}: {err}\n")
    if history.get("precision_advice") and os.environ.get("RANK", "0") == "0":
        print(f"note: {history['precision_advice']}", file=sys.stderr)


if __name__ == "__main__":
    main()
