"""The same step run for real: on this CPU under ``torch.profiler`` (what the tests hold the
fake-tensor measurement against) and on a CUDA GPU (``--verify-gpu``).

Import these names from ``lowvram.memory``. Layer 10 of the package: it imports ``report``,
``tracker`` and ``measure``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lowvram.config import ModelConfig
from lowvram.memory.measure import check_accumulation, measure_step, recipe_of
from lowvram.memory.report import CUDA_CONTEXT_BYTES, PHASES, GiB, Recipe, check_micro_batch
from lowvram.memory.tracker import make_optimizer, run_steps
from lowvram.model import GPTModel

__all__ = ["real_cpu_peaks", "verify_gpu"]


def _real_setup(
    model_config: ModelConfig, micro_batch: int, recipe: Recipe, device: torch.device
) -> tuple[GPTModel, torch.optim.Optimizer, torch.Tensor]:
    """The real model, optimizer and batch of a recipe (the lesson's set-up, seeded)."""
    from lowvram.config import TrainConfig
    from lowvram.optim import build_optimizer

    check_micro_batch(micro_batch)
    cfg = recipe.apply(model_config)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device)
    if recipe.optimizer == "adamw":
        opt = make_optimizer(model, recipe)
    else:
        opt = build_optimizer(model.parameters(), TrainConfig(optimizer=recipe.optimizer))
    batch = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.block_size + 1), device=device)
    return model, opt, batch


def real_cpu_peaks(
    model_config: ModelConfig,
    micro_batch: int,
    recipe: Recipe | str | None = None,
    *,
    gradient_accumulation_steps: int = 1,
    **options: Any,
) -> dict[str, int]:
    """Run the same two optimizer steps for real on this CPU (``gradient_accumulation_steps``
    micro-batches each, as ``train()`` runs them); the CPU allocator's peak in each phase of
    the 2nd step (bytes, over all its micro-batches), from ``torch.profiler`` with
    ``profile_memory=True``.

    The reference that ``measure_step(..., target="cpu")`` is tested against. Real arithmetic:
    use a small model. ``recipe``/``options`` as for :func:`measure_step`.
    """
    import torch._C._profiler as _prof
    from torch.profiler import ProfilerActivity, profile, record_function

    recipe = recipe_of(recipe, options)
    check_accumulation(gradient_accumulation_steps)
    open_ranges: list[record_function] = []

    def on_phase(step: int, phase: str, micro: int) -> None:
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)
        if step == 1:
            open_ranges.append(record_function(f"lowvram.measured:{phase}"))
            open_ranges[-1].__enter__()

    # torch's profiler (kineto) writes "USDT: ... profiler_start" / "profiler_stop" straight to
    # file descriptor 2, past sys.stderr: JupyterLab shows them as a pink stderr box. Point fd 2
    # at /dev/null for the profiled region only (KINETO_LOG_LEVEL / TORCH_CPP_LOG_LEVEL do not
    # silence them); an error raised inside still reaches Python as an exception.
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, opt, batch = _real_setup(model_config, micro_batch, recipe, torch.device("cpu"))
            run_steps(
                model, opt, batch, precision=recipe.precision, device_type="cpu", cuda_loss=False,
                keep_logits=recipe.keep_logits, max_grad_norm=1.0, foreach_clip=True,
                on_phase=on_phase, accumulation=gradient_accumulation_steps,
            )
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)
    return _phase_peaks(prof, _prof)


def _phase_peaks(prof: Any, _prof: Any) -> dict[str, int]:
    """Each ``lowvram.measured:PHASE`` range's peak allocated bytes (repeated ranges merged),
    above what was live when the profile started."""
    events: list[tuple[int, int, int]] = []  # (time, total allocated after it, its size)
    windows: dict[str, list[tuple[int, int]]] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, _prof._ExtraFields_Allocation):
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name.startswith("lowvram.measured:"):
            windows.setdefault(node.name.split(":")[1], []).append(
                (node.start_time_ns, node.end_time_ns))
        stack.extend(node.children)
    # The reporter's total is process-wide: storages from an earlier profiled run that died
    # after it stopped are still counted. What was live before is the first event's total
    # minus its own size.
    events.sort()
    before = events[0][1] - events[0][2]
    peaks = {}
    for phase in sorted(windows, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES)):
        peaks[phase] = max(
            total for t, total, _ in events if any(s <= t <= e for s, e in windows[phase])
        ) - before
    return peaks


def verify_gpu(
    model_config: ModelConfig,
    micro_batch: int,
    recipe: Recipe | str | None = None,
    *,
    gradient_accumulation_steps: int = 1,
    **options: Any,
) -> dict[str, int]:
    """Run the planner's own loop (``run_steps``, the shape of ``train()``) for real on CUDA;
    return the estimate next to the measurement. (``lowvram.verify`` runs ``train()`` itself.)

    Keys: ``free_at_start`` and ``total_at_start`` (``torch.cuda.mem_get_info()`` before the
    step: what the card really has free for it), ``fits_free_at_start`` (1 if the estimate
    fits that free memory with the plan's reserve, else 0), ``estimated_allocated``,
    ``max_memory_allocated``, ``estimated_reserved``, ``max_memory_reserved``,
    ``estimated_context``, ``measured_outside_allocator`` (the device's used memory minus what
    PyTorch reserved: the context and anything else on the card).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"--verify-gpu needs a CUDA GPU, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}): run it on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    recipe = recipe_of(recipe, options)
    check_accumulation(gradient_accumulation_steps)
    device = torch.device("cuda")
    free_at_start, total_at_start = torch.cuda.mem_get_info(device)  # creates the context
    estimate = measure_step(
        model_config, micro_batch, recipe, gradient_accumulation_steps=gradient_accumulation_steps,
        cuda_capability=torch.cuda.get_device_capability(device),
    )
    model, opt, batch = _real_setup(model_config, micro_batch, recipe, device)

    def on_phase(step: int, phase: str, micro: int) -> None:
        if (step, phase, micro) == (1, "forward", 0):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    run_steps(
        model, opt, batch, precision=recipe.precision, device_type="cuda", cuda_loss=False,
        keep_logits=recipe.keep_logits, max_grad_norm=1.0, foreach_clip=True, on_phase=on_phase,
        accumulation=gradient_accumulation_steps,
    )
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "free_at_start": free_at_start,
        "total_at_start": total_at_start,
        # the plan's question against what is really free: reserved + reserve <= free
        "fits_free_at_start": int(estimate.fits(total_at_start / GiB, free_bytes=free_at_start)),
        "estimated_allocated": estimate.peak_bytes,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device),
        "estimated_reserved": estimate.reserved_bytes,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        "estimated_context": CUDA_CONTEXT_BYTES,
        "measured_outside_allocator": total - free - torch.cuda.memory_reserved(device),
    }
