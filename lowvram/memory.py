"""How much GPU memory one training step needs, measured without a GPU.

Measure one steady-state step of the real ``GPTModel`` + its optimizer and ask whether it fits::

    from lowvram.config import get_preset
    from lowvram.memory import Recipe, measure_step, plan, ablation, plan_table, ablation_table
    model_cfg, _ = get_preset("rtx2050")
    report = measure_step(model_cfg, 4, Recipe(precision="fp16"))   # or precision="fp16"
    print(report.peak_bytes / 2**20, report.peak_phase, report.peak_op)
    print(report.fits(card_gib=4.0))         # inside the headroom: max(5%, 300 MiB) stays free
    print(plan_table(plan(model_cfg, card_gib=4.0, target_effective_batch=16)))
    print(ablation_table(ablation(model_cfg, micro_batch=4)))

From a shell (``--json`` for machines, ``--verify-gpu`` to hold the estimate against a real GPU)::

    python -m lowvram.memory --preset rtx2050 --json
    python -m lowvram.memory --preset rtx2050 --plan --ablation
    python -m lowvram.memory --preset rtx2050 --verify-gpu

A :class:`Recipe` names the options of a step: precision, optimizer ("adamw" or "adamw8bit", as
``TrainConfig.optimizer``), AdamW's kernel, and the model options ``tie_embeddings``,
``gradient_checkpointing`` and ``loss_chunk_size`` (as ``ModelConfig`` spells them).

How it measures. The model, optimizer and batch are fake tensors on the ``cpu`` device
(``FakeTensorMode``: shapes and dtypes, no data, no arithmetic), and a ``TorchDispatchMode`` sees
every ATen op of the step: it records each new untyped storage and, through a weakref finalizer,
the moment it dies (``lowvram/_memtrack.py``). Two whole steps run (forward, backward, gradient
clipping, optimizer step, ``zero_grad(set_to_none=True)``), in the order of the lesson's loop, and
the 2nd one is reported (AdamW creates its state lazily in the 1st). On the CPU allocator this
reproduces the real peak to a few bytes (``tests/test_memory.py`` checks it against
``torch.profiler``).

What ``target="cuda"`` (the default) adds, to predict a CUDA GPU instead of this CPU:

- AdamW's implementation is the one you choose (``foreach`` is the CUDA default; CPU's default is
  the per-parameter loop). ``foreach`` keeps a temporary as large as all parameters
  (``_foreach_sqrt``), ``fused`` does not. Gradient clipping uses ``foreach`` as on CUDA.
- 8-bit AdamW ("adamw8bit"): the state bitsandbytes' ``AdamW8bit`` allocates (uint8 moments and
  one fp32 scale per 256 values for tensors of >= 4096 elements, fp32 moments below that),
  updated in place as its CUDA kernel does (``_memtrack.Adam8bitLayout``).
- The loss under CUDA autocast: ``log_softmax`` runs in 16 bits and ``nll_loss`` (on CUDA's fp32
  list) keeps an fp32 copy of it for backward, so the step computes ``F.cross_entropy`` exactly
  that way; CPU autocast instead casts the logits to fp32 first.
- PyTorch's CUDA caching allocator, simulated block by block (``lowvram/_allocator.py``):
  sizes rounded up to 512 B, requests <= 1 MiB packed into 2 MiB segments, 1-10 MiB requests in
  20 MiB segments, larger ones rounded up to 2 MiB, best-fit reuse of cached blocks, splitting
  and coalescing. ``peak_bytes`` is then what ``torch.cuda.max_memory_allocated()`` reports and
  ``reserved_bytes`` what ``torch.cuda.max_memory_reserved()`` reports (cached segments are never
  given back, as on a card with room to spare).
- The cuBLAS workspace (8 MiB on an RTX 2050), allocated at the first matmul through the caching
  allocator, so it is part of ``max_memory_allocated`` since PyTorch 2.0 (pytorch#95668).
- Outside the allocator: the CUDA context (:data:`CUDA_CONTEXT_BYTES`). ``total_bytes`` is
  ``reserved_bytes`` plus the context; :meth:`MemoryReport.fits` holds it against the card minus
  a reserve of max(5%, 300 MiB) (:func:`reserve_bytes`, which says why).

Not modelled (each is small next to the terms above, or absent with the presets): fused
attention kernels' scratch buffers during backward (a few MiB, transient); the GradScaler of fp16
(a few scalars); dropout masks (``dropout > 0``: CPU keeps a 4-byte mask per element, CUDA a
1-byte one, so the estimate is high); other processes and the display on the same GPU (that is
what the reserve is for).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowvram._allocator import CachingAllocatorSim as _CachingAllocatorSim  # noqa: F401 (tests)
from lowvram._allocator import OutOfMemory as _OutOfMemory  # noqa: F401 (tests)
from lowvram._memreport import (
    ACTIVATION_PARTS,
    ADAMW_IMPLS,
    COMPONENTS,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    MAX_MICRO_BATCH,
    PHASES,
    RESERVE_FRACTION,
    RESERVE_MIN_BYTES,
    RTX2050_CAPABILITY,
    TARGETS,
    GiB,
    MemoryReport,
    MiB,
    Recipe,
    check_card,
    check_choice,
    check_micro_batch,
    reserve_bytes,
    usable_bytes,
)
from lowvram._memshow import ablation_table, format_report, plan_table, plot_budget
from lowvram._memtrack import make_optimizer, measure_fake, run_steps
from lowvram.config import OPTIMIZERS, ModelConfig
from lowvram.model import GPTModel

__all__ = [
    "ACTIVATION_PARTS",
    "ADAMW_IMPLS",
    "COMPONENTS",
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_RECIPES",
    "GiB",
    "MAX_MICRO_BATCH",
    "MiB",
    "OPTIMIZERS",
    "RESERVE_FRACTION",
    "RESERVE_MIN_BYTES",
    "TARGETS",
    "AblationRow",
    "MemoryReport",
    "PlanRow",
    "Recipe",
    "ablation",
    "ablation_table",
    "format_report",
    "main",
    "measure_step",
    "plan",
    "plan_table",
    "plot_budget",
    "real_cpu_peaks",
    "reserve_bytes",
    "usable_bytes",
    "verify_gpu",
]

LARGEST_SEARCH_FACTOR = 8  # plan(largest=True) looks up to 8 x the target micro-batch
_measure_cached = measure_fake  # the memo that `make bench` clears between timed runs


def _recipe(recipe: Recipe | str | None, options: dict[str, Any]) -> Recipe:
    """The recipe of a call: a Recipe, or a precision (the old positional spelling), plus any
    Recipe fields as keywords (``precision="fp16"``, ``tie_embeddings=True``, ...)."""
    if isinstance(recipe, str):
        options = {"precision": recipe, **options}
        recipe = None
    if recipe is None:
        return Recipe(**options)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lowvram.memory.Recipe, got {type(recipe).__name__}")
    return dataclasses.replace(recipe, **options) if options else recipe


def measure_step(
    model_config: ModelConfig,
    micro_batch: int,
    recipe: Recipe | str | None = None,
    *,
    target: str = "cuda",
    max_grad_norm: float | None = 1.0,
    cuda_capability: tuple[int, int] = RTX2050_CAPABILITY,
    **options: Any,
) -> MemoryReport:
    """Measure the 2nd training step of ``GPTModel(model_config)`` (no GPU needed; about a second
    for the 134M-parameter seed model, since fake tensors do no arithmetic).

    Args:
        model_config: the model's shape; each sequence has ``block_size`` tokens.
        micro_batch: sequences per forward/backward (the per-device batch).
        recipe: the step's options (:class:`Recipe`); a string is taken as its precision.
        target: "cuda" predicts a CUDA GPU (see the module docstring for what that adds);
            "cpu" reports the CPU allocator's numbers (what the tests check).
        max_grad_norm: clip gradients as the seed does (None: no clipping).
        cuda_capability: the GPU's compute capability: it sets the cuBLAS workspace size.
        **options: :class:`Recipe` fields that override ``recipe``'s, e.g. ``precision="fp16"``.
    """
    recipe = _recipe(recipe, options)
    check_micro_batch(micro_batch)
    check_choice("target", target, TARGETS)
    cfg = recipe.apply(model_config)
    key = Recipe(
        "", recipe.precision, recipe.optimizer, recipe.adamw_impl, cfg.tie_embeddings,
        cfg.gradient_checkpointing, cfg.loss_chunk_size, recipe.keep_logits,
    )  # one memo entry per measured step, whatever the recipe is called
    return measure_fake(cfg, micro_batch, key, target, max_grad_norm, tuple(cuda_capability))


# --------------------------------------------------------------------------- planner


DEFAULT_RECIPES = (
    Recipe("fp32 (lesson baseline)", tie_embeddings=False, gradient_checkpointing=False),
    Recipe("fp16 (the lesson's choice)", "fp16", tie_embeddings=False, gradient_checkpointing=False),
    Recipe("fp16 + fused AdamW", "fp16", adamw_impl="fused", tie_embeddings=False,
           gradient_checkpointing=False),
    Recipe("fp16 + fused + chunked loss", "fp16", adamw_impl="fused", tie_embeddings=False,
           gradient_checkpointing=False, loss_chunk_size=256),
    Recipe("fp16 + chunked loss + 8-bit AdamW", "fp16", "adamw8bit", tie_embeddings=False,
           gradient_checkpointing=False, loss_chunk_size=256),
    Recipe("fp16 + chunked + 8-bit + tied", "fp16", "adamw8bit", tie_embeddings=True,
           gradient_checkpointing=False, loss_chunk_size=256),
    Recipe("fp16 + chunked + 8-bit + tied + checkpointing", "fp16", "adamw8bit",
           tie_embeddings=True, gradient_checkpointing=True, loss_chunk_size=256),
)  # fmt: skip


@dataclass(frozen=True)
class PlanRow:
    """The largest micro-batch of one recipe that divides the target effective batch and fits,
    the accumulation it then needs, and (when searched) the largest micro-batch that fits at all."""

    recipe: Recipe
    micro_batch: int  # 0: not even one sequence fits
    accumulation: int  # target_effective_batch // micro_batch
    effective_batch: int  # micro_batch x accumulation == the target
    report: MemoryReport | None  # the measurement at micro_batch
    largest_micro_batch: int | None = None  # plan(..., largest=True): exact or not
    largest_limit: int | None = None  # the search's cap: largest_micro_batch == it means ">="

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def plan(
    model_config: ModelConfig,
    card_gib: float = 4.0,
    target_effective_batch: int = 16,
    recipes: Sequence[Recipe] = DEFAULT_RECIPES,
    *,
    largest: bool = False,
    free_bytes: int | None = None,
) -> list[PlanRow]:
    """For each recipe, the largest micro-batch that divides ``target_effective_batch`` and fits
    the card inside the headroom (:meth:`MemoryReport.fits`); the accumulation is the quotient,
    so every row trains at exactly the target (4 x 4, 8 x 2, 16 x 1 for 16).

    ``largest=True`` also searches the largest micro-batch that fits at all, up to
    ``LARGEST_SEARCH_FACTOR`` (8) times the target (slower: it measures beyond the target). ``free_bytes``: plan for what ``torch.cuda.mem_get_info()`` says is free.
    """
    check_card(card_gib)
    ok = isinstance(target_effective_batch, int) and not isinstance(target_effective_batch, bool)
    if not (ok and 0 < target_effective_batch <= MAX_MICRO_BATCH):
        raise ValueError(
            f"target_effective_batch={target_effective_batch!r} is not allowed: it must be an "
            f"integer in [1, {MAX_MICRO_BATCH}], e.g. 16"
        )
    rows = []
    for recipe in recipes:
        def fits(micro: int, recipe: Recipe = recipe) -> MemoryReport | None:
            r = measure_step(model_config, micro, recipe)
            return r if r.fits(card_gib, free_bytes) else None

        divisors = [d for d in range(1, target_effective_batch + 1) if target_effective_batch % d == 0]
        micro, report = _largest(divisors, fits)
        most = cap = None
        if largest:
            cap = LARGEST_SEARCH_FACTOR * target_effective_batch
            most = _largest_at_all(fits, start=micro, cap=cap)
        if report is None:
            rows.append(PlanRow(recipe, 0, 0, 0, None, most, cap))
        else:
            accumulation = target_effective_batch // micro
            rows.append(PlanRow(recipe, micro, accumulation, target_effective_batch, report, most, cap))
    return rows


def _largest(
    candidates: Sequence[int], fits: Callable[[int], MemoryReport | None]
) -> tuple[int, MemoryReport | None]:
    """The largest candidate (ascending list) that fits, by bisection (memory grows with the
    micro-batch), trying the largest first (the answer on a roomy card)."""
    best: tuple[int, MemoryReport | None] = (0, None)
    lo, hi = 0, len(candidates) - 1
    first = True
    while lo <= hi:
        mid = hi if first else (lo + hi) // 2
        first = False
        r = fits(candidates[mid])
        if r is not None:
            best, lo = (candidates[mid], r), mid + 1
        else:
            hi = mid - 1
    return best


def _largest_at_all(fits: Callable[[int], MemoryReport | None], start: int, cap: int) -> int:
    """The largest micro-batch up to ``cap`` that fits: double from ``start`` (which fits)
    until one does not, then bisect."""
    if start == 0:
        return 0
    lo, hi = start, min(start * 2, cap)
    while hi > lo and fits(hi) is not None:
        lo, hi = hi, min(hi * 2, cap)
    if hi == lo:  # the cap fits
        return lo
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid)
    return lo


@dataclass(frozen=True)
class AblationRow:
    """One step of the ablation: a recipe, its measurement and the change from the row above."""

    name: str
    recipe: Recipe
    report: MemoryReport
    peak_change: int  # bytes, vs the previous row (0 for the first)
    total_change: int


def _ablation_recipes() -> list[Recipe]:
    base = {"tie_embeddings": False, "gradient_checkpointing": False, "loss_chunk_size": 0}
    steps = [
        ("lesson baseline: fp32, untied, foreach AdamW", {}),
        ("fp16 autocast", {"precision": "fp16"}),
        ("+ fused AdamW", {"adamw_impl": "fused"}),
        ("+ chunked loss (no full logits)", {"loss_chunk_size": 256}),
        ("+ 8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}),
        ("+ tied embeddings", {"tie_embeddings": True}),
        ("+ gradient checkpointing", {"gradient_checkpointing": True}),
    ]
    recipes = []
    for name, change in steps:
        base = {**base, **change}
        recipes.append(Recipe(name, **base))
    return recipes


def ablation(model_config: ModelConfig, micro_batch: int = 4, card_gib: float = 4.0) -> list[AblationRow]:
    """From the lesson's baseline to the leanest recipe, one option at a time, at ``micro_batch``."""
    check_card(card_gib)
    rows: list[AblationRow] = []
    for recipe in _ablation_recipes():
        r = measure_step(model_config, micro_batch, recipe)
        prev = rows[-1].report if rows else r
        rows.append(AblationRow(
            recipe.name, recipe, r, r.peak_bytes - prev.peak_bytes, r.total_bytes - prev.total_bytes,
        ))
    return rows


# --------------------------------------------------------------------------- real runs


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
    model_config: ModelConfig, micro_batch: int, recipe: Recipe | str | None = None, **options: Any
) -> dict[str, int]:
    """Run the same two steps for real on this CPU; the CPU allocator's peak in each phase of
    the 2nd step (bytes), from ``torch.profiler`` with ``profile_memory=True``.

    The reference that ``measure_step(..., target="cpu")`` is tested against. Real arithmetic:
    use a small model. ``recipe``/``options`` as for :func:`measure_step`.
    """
    import os

    import torch._C._profiler as _prof
    from torch.profiler import ProfilerActivity, profile, record_function

    recipe = _recipe(recipe, options)
    open_ranges: list[record_function] = []

    def on_phase(step: int, phase: str) -> None:
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
                keep_logits=recipe.keep_logits, max_grad_norm=1.0, foreach_clip=False,
                on_phase=on_phase,
            )
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)
    events: list[tuple[int, int, int]] = []  # (time, total allocated after it, its size)
    windows: dict[str, tuple[int, int]] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, _prof._ExtraFields_Allocation):
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name.startswith("lowvram.measured:"):
            windows[node.name.split(":")[1]] = (node.start_time_ns, node.end_time_ns)
        stack.extend(node.children)
    # The reporter's total is process-wide: storages from an earlier profiled run that died
    # after it stopped are still counted. What was live before is the first event's total
    # minus its own size.
    events.sort()
    before = events[0][1] - events[0][2]
    return {
        phase: max(total for t, total, _ in events if start <= t <= end) - before
        for phase, (start, end) in sorted(windows.items(), key=lambda kv: PHASES.index(kv[0]))
    }


def verify_gpu(
    model_config: ModelConfig, micro_batch: int, recipe: Recipe | str | None = None, **options: Any
) -> dict[str, int]:
    """Run the same two steps for real on CUDA; return the estimate next to the measurement.

    Keys: ``free_at_start`` and ``total_at_start`` (``torch.cuda.mem_get_info()`` before the
    step: what the card really has free for it), ``fits_free_at_start`` (1 if the estimate
    fits that free memory with the plan's reserve, else 0), ``estimated_allocated``,
    ``max_memory_allocated``, ``estimated_reserved``, ``max_memory_reserved``,
    ``estimated_context``, ``measured_outside_allocator`` (the device's used memory minus what
    PyTorch reserved: the context and anything else on the card). Each check of the card is a
    small step here, so more (e.g. of the torch build) can be added before the run.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"--verify-gpu needs a CUDA GPU, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}): run it on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    recipe = _recipe(recipe, options)
    device = torch.device("cuda")
    free_at_start, total_at_start = torch.cuda.mem_get_info(device)  # creates the context
    estimate = measure_step(
        model_config, micro_batch, recipe, cuda_capability=torch.cuda.get_device_capability(device)
    )
    model, opt, batch = _real_setup(model_config, micro_batch, recipe, device)

    def on_phase(step: int, phase: str) -> None:
        if step == 1 and phase == "forward":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    run_steps(
        model, opt, batch, precision=recipe.precision, device_type="cuda", cuda_loss=False,
        keep_logits=recipe.keep_logits, max_grad_norm=1.0, foreach_clip=True, on_phase=on_phase,
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowvram.memory``: see ``--help``."""
    from lowvram._memcli import run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
