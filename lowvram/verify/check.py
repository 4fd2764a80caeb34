"""The check itself: the real ``train()`` on CUDA under a card-sized allocator cap, its peaks
next to the planner's prediction (:func:`verify_training`), and each fitting plan row so
(:func:`verify_plan`). The package's docstring (``lowvram.verify``) says how to use it.

Imports run one way: this module imports the memory planner's submodules (``report``,
``measure``, ``plan``), never ``lowvram.verify.cli`` nor ``lowvram.memory.cli``, which import it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
import time
import warnings
from typing import Any

import torch

from lowvram.config import ModelConfig, TrainConfig

__all__ = [
    "PLAN_TOLERANCE",
    "bitsandbytes_problem",
    "cap_fraction",
    "configs_for",
    "measure_context",
    "verify_plan",
    "verify_training",
    "warm_matmul_libraries",
]

MiB = 2**20
GiB = 2**30
PLAN_TOLERANCE = 0.03  # a plan row's measured allocated peak must be within 3% of its prediction


def _mib(n: int | float) -> str:
    return f"{n / MiB:,.0f}"


def _check_card(card_gib: object) -> None:
    ok = isinstance(card_gib, (int, float)) and not isinstance(card_gib, bool)
    if not (ok and 0 < card_gib <= 4096):  # type: ignore[operator]
        raise ValueError(f"card_gib={card_gib!r} is not allowed: give the card's memory in GiB "
                         "(0 < card_gib <= 4096), e.g. 4.0")


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes (8-bit AdamW) cannot be used here, or None if it can."""
    try:
        from lowvram.optim import _bitsandbytes

        _bitsandbytes()
    except Exception as err:  # ImportError, or a CUDA library that does not load
        return f"{type(err).__name__}: {err}"
    return None


# --------------------------------------------------------------------------- the cap


def cap_fraction(card_bytes: int, context_bytes: int, total_bytes: int) -> tuple[float, int]:
    """The allocator cap that makes a GPU of ``total_bytes`` behave like a card of ``card_bytes``
    whose context (and whatever else sits outside the allocator) takes ``context_bytes``.

    Returns ``(fraction, card)``: ``fraction`` for ``torch.cuda.set_per_process_memory_fraction``
    (the allocator may reserve ``card - context`` bytes) and the card size used, which is the GPU
    itself when ``card_bytes`` is larger than it (a learner's "4 GB" card has a little less).
    """
    for name, value in (("card_bytes", card_bytes), ("context_bytes", context_bytes),
                        ("total_bytes", total_bytes)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} is not allowed: give a number of bytes >= 0")
    if total_bytes == 0 or card_bytes == 0:
        raise ValueError(f"card_bytes={card_bytes}, total_bytes={total_bytes}: both must be > 0")
    card = min(card_bytes, total_bytes)
    if context_bytes >= card:
        raise ValueError(
            f"the memory outside the allocator ({_mib(context_bytes)} MiB: CUDA context, library "
            f"handles, other programs on the GPU) takes the whole card ({_mib(card)} MiB): close "
            "other programs that use the GPU (nvidia-smi lists them), or give a larger card_gib"
        )
    return (card - context_bytes) / total_bytes, card


def measure_context(device: torch.device | None = None) -> int:
    """Bytes the GPU holds outside PyTorch's caching allocator, once CUDA, cuBLAS and cuBLASLt
    are initialised: ``total - free - memory_reserved`` from ``torch.cuda.mem_get_info``.

    It counts the CUDA context, the libraries' handles and every other process on the GPU (on a
    learner's laptop: the display). Kernels that load lazily during training add a little more:
    :func:`verify_training` measures again after the run.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    warm_matmul_libraries(device)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def warm_matmul_libraries(device: torch.device) -> None:
    """A Linear with bias, forward and backward, in fp32 and under fp16 autocast: the cuBLAS and
    cuBLASLt handles train() will use exist afterwards (one per thread: backward runs in
    autograd's own), with their workspaces, which go through the caching allocator."""
    layer = torch.nn.Linear(64, 64, device=device)
    x = torch.randn(8, 64, device=device)
    layer(x).sum().backward()
    with torch.autocast("cuda", dtype=torch.float16):
        layer(x).float().sum().backward()


# --------------------------------------------------------------------------- the prediction


def _adamw_impl(train_config: TrainConfig) -> str:
    """The AdamW kernel train() runs on CUDA: the config's (h18cli's ``adamw_impl``), else
    torch's default there, ``foreach``."""
    return getattr(train_config, "adamw_impl", None) or "foreach"


def _predict(model_config: ModelConfig, train_config: TrainConfig, precision: str,
             capability: tuple[int, int]) -> tuple[Any, bool]:
    """``measure_step``'s report for this run's optimizer step (its accumulation included), and
    True: the accumulation is modelled (the key stays in the result for older readers)."""
    from lowvram.memory.measure import measure_step
    from lowvram.memory.report import Recipe

    recipe = Recipe("verify", precision=precision, optimizer=train_config.optimizer,
                           adamw_impl=_adamw_impl(train_config))
    report = measure_step(
        model_config, train_config.per_device_train_batch_size, recipe, target="cuda",
        max_grad_norm=train_config.max_grad_norm, cuda_capability=capability,
        gradient_accumulation_steps=train_config.gradient_accumulation_steps,
    )
    return report, True


# --------------------------------------------------------------------------- the check


def _no_cuda_message() -> str:
    return (
        f"--verify-gpu needs a CUDA GPU, but torch.cuda.is_available() is False (torch "
        f"{torch.__version__}): run it where an NVIDIA GPU and a CUDA build of torch are installed"
    )


def verify_training(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    card_gib: float = 4.0,
    steps: int = 2,
    context_bytes: int | None = None,
) -> dict[str, Any]:
    """The real ``train()`` for ``steps`` optimizer steps on random rows, on CUDA, with the
    caching allocator capped like a card of ``card_gib`` GiB; the measured peaks next to the
    planner's prediction.

    Args:
        model_config, train_config: the run to verify (precision, batch, accumulation, optimizer,
            model options); its output_dir is not touched (a temporary one is used).
        card_gib: the card to emulate. On a GPU smaller than that, the GPU itself.
        steps: optimizer steps (2-3: AdamW creates its state in the 1st; the 2nd is steady).
        context_bytes: what the card holds outside the allocator; None measures it here
            (:func:`measure_context`).

    Returns:
        A dict of plain values: ``outcome`` ("fits" or "ran out of memory"), ``fits``,
        ``predicted_allocated_bytes``/``predicted_reserved_bytes`` (``measure_step``; the
        reserved peak uncapped), ``predicted_capped_reserved_bytes`` (the smallest cap the
        planner's run fits under: what ``fits`` judges), ``predicted_fits`` (the planner's
        verdict for the card, headroom kept), ``predicted_runs_under_cap`` (that need <= this
        run's cap),
        ``measured_allocated_bytes``/``measured_reserved_bytes`` (the run's peaks),
        ``allocated_error``/``reserved_error`` (predicted / measured - 1), ``context_bytes``
        (used for the cap), ``context_after_bytes`` (measured after the run), ``cap_bytes``,
        ``card_bytes``, the run's settings, its losses and loss scales, and ``error`` (the
        out-of-memory message's first line, else None).

    Raises:
        RuntimeError: no CUDA GPU. ValueError: bad card_gib or steps, or a context that takes
        the whole card.
    """
    from lowvram.data import random_rows
    from lowvram.precision import resolve_precision
    from lowvram.train import train

    if not torch.cuda.is_available():
        raise RuntimeError(_no_cuda_message())
    _check_card(card_gib)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100:
        raise ValueError(f"steps={steps!r} is not allowed: give optimizer steps in [1, 100], e.g. 2")
    # with its index: set_per_process_memory_fraction refuses a bare "cuda" (checked on an H200)
    device = torch.device("cuda", torch.cuda.current_device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        precision, _ = resolve_precision(train_config.mixed_precision, device)
    capability = torch.cuda.get_device_capability(device)
    t0 = time.perf_counter()
    report, accumulation_modelled = _predict(model_config, train_config, precision, capability)
    predict_s = time.perf_counter() - t0

    gc.collect()
    torch.cuda.empty_cache()
    measured_context = measure_context(device)
    context = measured_context if context_bytes is None else context_bytes
    _, total = torch.cuda.mem_get_info(device)
    fraction, card = cap_fraction(int(card_gib * GiB), context, total)

    rows = steps * train_config.effective_batch_size
    train_data = random_rows(model_config, rows, seed=0)
    val_data = random_rows(model_config, train_config.per_device_eval_batch_size, seed=1)
    losses: list[float] = []
    error = None
    log = io.StringIO()
    history: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowvram-verify-") as out:
        config = train_config.replace(
            max_steps=steps, num_epochs=1, eval_interval=0, eval_max_batches=1,
            checkpoint_interval=0, keep_checkpoints=1, log_interval=10**6, output_dir=out,
        )  # fmt: skip
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)  # the cuBLAS workspace, and leftovers
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = train(model_config, config, train_data=train_data, val_data=val_data,
                                progress=False, cpu=False, overwrite_output_dir=True)
        except torch.cuda.OutOfMemoryError as err:  # TrainingOutOfMemoryError is one
            error = (str(err).strip().splitlines() or ["out of memory"])[0]
        finally:
            torch.cuda.synchronize(device)
            allocated = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            run_s = time.perf_counter() - t0
            gc.collect()
            free, total = torch.cuda.mem_get_info(device)
            context_after = total - free - torch.cuda.memory_reserved(device)
            torch.cuda.empty_cache()
    losses = [s["loss"] for s in history.get("steps", [])]
    fits = error is None
    return {
        "outcome": "fits" if fits else "ran out of memory",
        "fits": fits,
        "error": error,
        "device": torch.cuda.get_device_name(device),
        "capability": list(capability),
        "gpu_total_bytes": total,
        "card_gib": card_gib,
        "card_bytes": card,
        "card_is_the_gpu": card < int(card_gib * GiB),
        "context_bytes": context,
        "context_measured_bytes": measured_context,
        "context_after_bytes": context_after,
        "cap_fraction": fraction,
        "cap_bytes": int(fraction * total),
        "baseline_allocated_bytes": baseline,
        "predicted_allocated_bytes": report.peak_bytes,
        "predicted_reserved_bytes": report.reserved_bytes,
        "predicted_capped_reserved_bytes": report.capped_reserved_bytes,
        # the planner's own verdict (its headroom kept) and whether it expects this very cap
        # (no headroom) to hold the run: both on what the run needs under a cap
        "predicted_fits": report.fits(card_gib),
        "predicted_runs_under_cap": report.capped_reserved_bytes <= int(fraction * total),
        "accumulation_modelled": accumulation_modelled,
        "measured_allocated_bytes": allocated,
        "measured_reserved_bytes": reserved,
        "allocated_error": report.peak_bytes / allocated - 1,
        "reserved_error": report.reserved_bytes / reserved - 1,
        "precision": precision,
        "micro_batch": train_config.per_device_train_batch_size,
        "gradient_accumulation_steps": train_config.gradient_accumulation_steps,
        "optimizer": train_config.optimizer,
        "adamw_impl": _adamw_impl(train_config) if train_config.optimizer == "adamw" else None,
        "tie_embeddings": model_config.tie_embeddings,
        "gradient_checkpointing": model_config.gradient_checkpointing,
        "loss_chunk_size": model_config.loss_chunk_size,
        "steps": steps,
        "steps_run": len(losses),
        "losses": losses,
        "loss_scales": [s.get("loss_scale") for s in history.get("steps", [])],
        "skipped_steps": history.get("skipped_steps"),
        "predict_s": predict_s,
        "run_s": run_s,
    }


# --------------------------------------------------------------------------- plan rows


def configs_for(model_config: ModelConfig, train_config: TrainConfig, recipe: Any,
                micro_batch: int, gradient_accumulation_steps: int) -> tuple[ModelConfig, TrainConfig]:
    """The configs that train a ``lowvram.memory.Recipe`` at this micro-batch and accumulation:
    the recipe's model options on ``model_config``, its precision and optimizer on
    ``train_config``. ValueError if TrainConfig cannot say the recipe's AdamW kernel."""
    changes: dict[str, Any] = {
        "mixed_precision": recipe.precision, "optimizer": recipe.optimizer,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }  # fmt: skip
    # bitsandbytes' AdamW8bit has its own kernel: TrainConfig refuses an AdamW kernel with it
    changes["adamw_impl"] = recipe.adamw_impl if recipe.optimizer == "adamw" else None
    return recipe.apply(model_config), train_config.replace(**changes)


def verify_plan(model_config: ModelConfig, train_config: TrainConfig, *, card_gib: float = 4.0,
                target_effective_batch: int = 16, steps: int = 2,
                tolerance: float = PLAN_TOLERANCE, context_bytes: int | None = None) -> list[dict[str, Any]]:
    """Each row of ``lowvram.memory.plan(model_config, card_gib, target_effective_batch)`` that
    the planner marks as fitting, trained for real (:func:`verify_training`).

    Each result gains ``recipe``, ``passed`` (no out-of-memory and the measured allocated peak
    within ``tolerance`` of the prediction) and ``note`` (why not, or why it was skipped:
    bitsandbytes missing, an AdamW kernel TrainConfig cannot say yet).
    """
    from lowvram.memory.plan import plan

    results = []
    for row in plan(model_config, card_gib, target_effective_batch):
        accumulation = getattr(row, "gradient_accumulation_steps", None) or row.accumulation
        head = {"recipe": row.recipe.name, "micro_batch": row.micro_batch,
                "gradient_accumulation_steps": accumulation, "planned_fits": row.fits}
        if not row.fits:
            results.append({**head, "passed": None, "note": "the plan says it does not fit"})
            continue
        try:
            model_cfg, train_cfg = configs_for(model_config, train_config, row.recipe,
                                               row.micro_batch, accumulation)
        except ValueError as err:
            results.append({**head, "passed": None, "note": f"skipped: {err}"})
            continue
        problem = bitsandbytes_problem() if row.recipe.optimizer == "adamw8bit" else None
        if problem:
            results.append({**head, "passed": None, "note": f"skipped: {problem}"})
            continue
        try:
            result = verify_training(model_cfg, train_cfg, card_gib=card_gib, steps=steps,
                                     context_bytes=context_bytes)
        except Exception as err:  # one row's failure is that row's result, not the plan's end
            results.append({**head, "passed": False,
                            "note": f"failed: {type(err).__name__}: {str(err)[:300]}"})
            continue
        within = abs(result["allocated_error"]) <= tolerance
        passed = result["fits"] and within
        if not result["fits"]:
            note = f"ran out of memory under the cap: {result['error']}"
        elif not within:
            note = (f"allocated peak off by {result['allocated_error']:+.1%} "
                    f"(tolerance {tolerance:.0%})")
        else:
            note = ""
        results.append({**head, **result, "passed": passed, "note": note})
    return results
