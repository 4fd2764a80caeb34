"""What a training run reports when it fails: NaN/inf losses and out-of-memory, with advice.

    from lowvram.failures import NonFiniteLossError, TrainingOutOfMemoryError

``lowvram.train.train`` raises these; each message says what happened, what was kept and what
to try. The OOM advice asks ``lowvram.memory``'s planner (imported only after an OOM: it
measures a few steps on fake tensors, about a second each for the lesson's model).
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowvram.config import ModelConfig, TrainConfig
from lowvram.outputdir import HISTORY_FILE, latest_checkpoint, write_history
from lowvram.precision import PRECISION_LABELS

__all__ = [
    "NonFiniteLossError",
    "TrainingOutOfMemoryError",
    "interrupted_message",
    "is_cpu_out_of_memory",
    "non_finite",
    "non_finite_message",
    "out_of_memory_error",
    "out_of_memory_in",
    "cpu_memory_limit",
    "planner_advice",
    "stop_non_finite",
]


class NonFiniteLossError(FloatingPointError):
    """Training stopped: an optimizer step's loss (or, without a GradScaler, its gradient
    norm) was NaN or inf. history.json holds the steps before it; nothing with the broken
    weights was saved, so the last checkpoint is the last good state."""


class TrainingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """The GPU (or the CPU's RAM) ran out of memory during ``train``; the message carries
    ``lowvram.memory``'s plan (micro-batch and accumulation that fit). Still a
    ``torch.OutOfMemoryError``."""


def non_finite(record: dict[str, Any]) -> str | None:
    """What is not finite in an optimizer step's record, or None. Under a GradScaler an inf
    gradient norm is an fp16 overflow that the scaler skipped (counted, not an error)."""
    if not math.isfinite(record["loss"]):
        return f"the loss is {record['loss']}"
    if not math.isfinite(record["grad_norm"]) and not record["skipped"]:
        return f"the gradient norm is {record['grad_norm']} (the loss was {record['loss']:.4f})"
    return None


def non_finite_message(
    record: dict[str, Any],
    problem: str,
    *,
    steps_done: int,
    last_checkpoint: str | None,
    history_file: str,
    precision: str,
    has_scaler: bool,
    max_lr: float,
) -> str:
    """The NonFiniteLossError message: where it stopped, what was kept, the likely causes."""
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else (
        "no checkpoint was saved yet")
    if record["lr"] > 0:
        lr_cause = (f"(1) the learning rate is too high (this step ran at lr={record['lr']:.2e}, "
                    f"max_lr={max_lr:g}): lower max_lr or warm up longer; ")
    else:  # lr 0 changes no weight: the learning rate is not what broke them
        lr_cause = (f"(1) not the learning rate: this step ran at lr={record['lr']:.2e}, so the "
                    "weights were already broken (a damaged checkpoint?) or the forward pass "
                    "overflowed; ")
    scaler = "with" if has_scaler else "without"
    return (
        f"training stopped at optimizer step {record['step']} (epoch {record['epoch']}): "
        f"{problem}. Nothing from this step was saved: {kept}, and {history_file} holds the "
        f"{steps_done} steps before it. Likely causes: {lr_cause}"
        f"(2) fp16 overflow (this run: precision={precision!r} {scaler} a GradScaler): fp16 "
        "holds values only up to 65504, and a GradScaler guards the gradients but not the "
        "forward pass; use bf16 or 'no' (fp32); "
        "(3) bad data in this step's batches (token ids are range-checked, so look for rows "
        "unlike the rest)"
    )


def stop_non_finite(accelerator, output_dir: Path, history: dict[str, Any], record: dict[str, Any],
                    problem: str, max_lr: float):
    """Write history.json with the steps done, then raise NonFiniteLossError. Called before
    the step is recorded or checkpointed, so no saved file holds the broken weights."""
    last = latest_checkpoint(output_dir)
    message = non_finite_message(
        record, problem, steps_done=len(history["steps"]),
        last_checkpoint=str(last) if last else None, history_file=str(output_dir / HISTORY_FILE),
        precision=history["precision"], has_scaler=accelerator.scaler is not None, max_lr=max_lr,
    )  # fmt: skip
    history["error"] = {"type": NonFiniteLossError.__name__, "step": record["step"], "message": message}
    if accelerator.is_main_process:
        write_history(output_dir, history)
    raise NonFiniteLossError(message)


def is_cpu_out_of_memory(err: BaseException) -> bool:
    """True for the CPU allocator's out-of-memory RuntimeError (torch raises no OOM class)."""
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text
        or "DefaultCPUAllocator: not enough memory" in text
    )


def out_of_memory_in(err: BaseException) -> tuple[str, bool] | None:
    """For an out-of-memory error: (its first line, True if the CPU's RAM ran out); else None."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        on_cpu = False
    elif is_cpu_out_of_memory(err):
        on_cpu = True
    else:
        return None
    return (str(err).strip().splitlines() or ["out of memory"])[0], on_cpu


def _recipes(model_config: ModelConfig, train_config: TrainConfig, precision: str,
             on_cpu: bool) -> list:
    """The run's own recipe (its optimizer, AdamW kernel and model options) at its precision,
    and at the precision that saves memory where it runs: fp16 on a GPU; on a CPU, where
    accelerate runs fp16 as fp32, bf16 (which a CPU does run) and fp32."""
    from lowvram.memory.report import Recipe  # lazily: only after an OOM

    if on_cpu:
        precisions = [precision if precision != "fp16" else "no", "bf16"]
    else:
        precisions = [precision, "fp16"]
    impl = getattr(train_config, "adamw_impl", None) or ("loop" if on_cpu else "foreach")
    return [
        Recipe(p, precision=p, optimizer=train_config.optimizer, adamw_impl=impl,
               tie_embeddings=model_config.tie_embeddings,
               gradient_checkpointing=model_config.gradient_checkpointing,
               loss_chunk_size=model_config.loss_chunk_size)
        for p in dict.fromkeys(precisions)
    ]  # fmt: skip


def planner_advice(
    model_config: ModelConfig, train_config: TrainConfig, precision: str, card_gib: float,
    *, on_cpu: bool = False, limit: str | None = None,
) -> str:
    """``lowvram.memory``'s plan for this run's recipe within ``card_gib``: the largest
    micro-batch that fits, at this run's precision and at one that saves memory where it runs
    (``on_cpu``: bf16, never fp16). ``limit`` names the CPU's limit. Computed only after an OOM."""
    from lowvram.memory.plan import plan  # lazily: only after an OOM

    recipes = _recipes(model_config, train_config, precision, on_cpu)
    try:
        rows = plan(model_config, card_gib, train_config.effective_batch_size, recipes)
    except Exception as err:  # advice only: never hide the OOM behind the planner's failure
        return f"(lowvram.memory's planner failed: {type(err).__name__}: {err})"
    optimizer = train_config.optimizer
    extra = f" --optimizer {optimizer}" if optimizer != "adamw" else ""
    advice = []
    for row in rows:
        p = row.recipe.precision
        name = PRECISION_LABELS[p]
        if not row.fits:
            advice.append(
                f"with {name} not even a micro-batch of 1 fits: turn on gradient_checkpointing "
                "and tie_embeddings in the ModelConfig, or use a smaller model or block_size"
                + ("" if on_cpu or optimizer == "adamw8bit" else ", or --optimizer adamw8bit")
            )
            continue
        advice.append(
            f"with {name} micro-batch <= {row.micro_batch}, accumulation {row.accumulation} "
            f"(effective batch {row.effective_batch}): try --per-device-train-batch-size "
            f"{row.micro_batch} --gradient-accumulation-steps {row.accumulation} "
            f"--mixed-precision {p}{extra} (in Python: train_config.replace(per_device_train_batch_size="
            f"{row.micro_batch}, gradient_accumulation_steps={row.accumulation}, "
            f"mixed_precision={p!r}))"
        )
    where = (f"within the CPU's limit of {card_gib:.1f} GiB ({limit})" if on_cpu
             else f"on a {card_gib:.1f} GiB card")
    return (
        f"The memory planner (lowvram.memory) says, for this model with optimizer={optimizer!r} "
        f"{where}: " + "; ".join(advice)
    )


def _read_int(path: str, field: str | None = None) -> int | None:
    """An integer from a /proc or /sys file (``field``: the line that starts with it), or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if field is not None:
        line = next((ln for ln in text.splitlines() if ln.startswith(field)), None)
        if line is None:
            return None
        parts = line.split()
        return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    text = text.strip()
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cpu_memory_limit() -> tuple[int, str]:
    """What a training on the CPU can still allocate, in bytes, and which limit that is.

    The smallest of: the free RAM (``MemAvailable``), the cgroup's ``memory.max`` minus its
    usage (a container, a systemd slice), and the process's address-space limit ``RLIMIT_AS``
    (``ulimit -v``) minus what it maps now. Physical RAM where none of these can be read.
    """
    limits = []
    available = _read_int("/proc/meminfo", "MemAvailable:")
    if available is not None:
        limits.append((available, f"free RAM (MemAvailable) {available / 2**30:.1f} GiB"))
    for max_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                 "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        cap, used = _read_int(max_file), _read_int(used_file)
        if cap is not None and cap < 2**60:
            left = cap - (used or 0)
            limits.append((left, f"the cgroup's memory limit {cap / 2**30:.1f} GiB, "
                                 f"{left / 2**30:.1f} GiB of it left"))
            break
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            mapped = _read_int("/proc/self/status", "VmSize:") or 0
            # address space, not memory: malloc's per-thread arenas, thread stacks and freed
            # but still mapped blocks count too. Measured (cpu-demo, ulimit -v 6000000): a
            # step the planner put at 4.0 GiB did not fit 4.7 GiB left; keep a quarter free
            left = int(0.75 * (soft - mapped))
            limits.append((left, f"the process limit RLIMIT_AS (ulimit -v) {soft / 2**30:.1f} "
                                 f"GiB, {mapped / 2**30:.1f} GiB of it mapped already, a quarter "
                                 "of the rest kept free for what address space costs besides "
                                 "tensors"))
    except (ImportError, ValueError, OSError):  # not POSIX
        pass
    if not limits:
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX
            ram = 4 * 2**30
        limits.append((ram, f"physical RAM {ram / 2**30:.1f} GiB"))
    return min(limits)


def out_of_memory_error(
    original: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    precision: str,
    device: torch.device,
    cpu_allocator: bool = False,
) -> TrainingOutOfMemoryError:
    """The OOM error a learner can act on: what ran, and what the planner says would fit.

    ``cpu_allocator``: the CPU's RAM ran out: planned within the CPU's real limit
    (:func:`cpu_memory_limit`) and for precisions a CPU runs; otherwise CUDA's memory
    (planned for the card; on a CPU device, a test's artificial OOM: the course's 4 GB).
    """
    if cpu_allocator:
        what = "The CPU ran out of memory (host RAM, or the process's limit)"
        limit_bytes, limit = cpu_memory_limit()
        card_gib = min(max(limit_bytes / 2**30, 0.5), 4096.0)
        advice = planner_advice(model_config, train_config, precision, card_gib, on_cpu=True,
                                limit=limit)
        others = "Also close other programs that use much RAM."
    else:
        what = "CUDA ran out of memory"
        card_gib = (torch.cuda.get_device_properties(device).total_memory / 2**30
                    if device.type == "cuda" else 4.0)  # fmt: skip
        advice = planner_advice(model_config, train_config, precision, card_gib)
        others = "Also close other programs that use the GPU (nvidia-smi lists them)."
    return TrainingOutOfMemoryError(
        f"{what} during training ({original}). This run: "
        f"per_device_train_batch_size={train_config.per_device_train_batch_size}, "
        f"gradient_accumulation_steps={train_config.gradient_accumulation_steps}, "
        f"precision={precision!r}, optimizer={train_config.optimizer!r}, "
        f"block_size={model_config.block_size}. {advice}. {others}"
    )


def interrupted_message(output_dir: Path, argv: Sequence[str], num_processes: int | None = None) -> str:
    """The Ctrl-C line of ``python -m lowvram.train ARGV``: what was saved, and the command
    that resumes (the same command without its --resume-from / --overwrite-output-dir; under
    ``accelerate launch`` with ``num_processes`` > 1, default ``$WORLD_SIZE``, the same launch)."""
    last = latest_checkpoint(output_dir)
    if last is None:
        return f"interrupted: no checkpoint was saved yet in {output_dir}; start again with the same command"
    keep, skip = [], False
    for a in argv:
        if skip or a == "--overwrite-output-dir":
            skip = False
            continue
        if a == "--resume-from":
            skip = True
            continue
        if not a.startswith("--resume-from="):
            keep.append(a)
    processes = num_processes if num_processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    # a data-parallel run resumes only with as many processes (the checkpoint holds each one's
    # data position and RNG state): the same launcher, not plain python
    launcher = (["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
                if processes > 1 else ["python"])  # fmt: skip
    command = shlex.join([*launcher, "-m", "lowvram.train", *keep, "--resume-from", "latest"])
    return f"interrupted: the last checkpoint is {last}; resume with: {command}"
