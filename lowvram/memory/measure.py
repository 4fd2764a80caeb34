"""``measure_step``: the memory of one optimizer step of ``train()``, measured on fake tensors.

Import it from ``lowvram.memory``. Layer 4 of the package: it imports ``report`` and ``tracker``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowvram.config import ModelConfig
from lowvram.memory.report import (
    RTX2050_CAPABILITY,
    TARGETS,
    MemoryReport,
    Recipe,
    check_choice,
    check_micro_batch,
)
from lowvram.memory.tracker import BASE_MICRO_BATCHES, measure_fake

__all__ = ["BASE_MICRO_BATCHES", "check_accumulation", "measure_step", "measure_step_linear", "recipe_of"]


def recipe_of(recipe: Recipe | str | None, options: dict[str, Any]) -> Recipe:
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


def check_accumulation(steps: object) -> None:
    ok = isinstance(steps, int) and not isinstance(steps, bool)
    if not (ok and 0 < steps <= 65536):  # type: ignore[operator]
        raise ValueError(
            f"gradient_accumulation_steps={steps!r} is not allowed: it must be an integer in "
            "[1, 65536] (micro-batches per optimizer step, e.g. 4)"
        )


def measure_step(
    model_config: ModelConfig,
    micro_batch: int,
    recipe: Recipe | str | None = None,
    *,
    gradient_accumulation_steps: int = 1,
    target: str = "cuda",
    max_grad_norm: float | None = 1.0,
    cuda_capability: tuple[int, int] = RTX2050_CAPABILITY,
    **options: Any,
) -> MemoryReport:
    """Measure a steady optimizer step of ``train()`` on ``GPTModel(model_config)`` (no GPU
    needed; a few seconds for the 134M-parameter lesson model, since fake tensors do no
    arithmetic; milliseconds once the same step was recorded at :data:`BASE_MICRO_BATCHES`,
    e.g. by :func:`~lowvram.memory.plan`, which it then replays: the same bytes).

    Args:
        model_config: the model's shape; each sequence has ``block_size`` tokens.
        micro_batch: sequences per forward/backward (the per-device batch).
        recipe: the step's options (:class:`Recipe`); a string is taken as its precision.
        gradient_accumulation_steps: micro-batches per optimizer step. From the 2nd on, backward
            runs with the accumulated gradients alive (4 bytes per parameter): any value >= 2
            has the same peak, and a higher one than 1.
        target: "cuda" predicts a CUDA GPU (see the package docstring for what that adds);
            "cpu" reports the CPU allocator's numbers (what the tests check).
        max_grad_norm: clip gradients as ``train()`` does (None: no clipping).
        cuda_capability: the GPU's compute capability: it sets the cuBLAS workspace size.
        **options: :class:`Recipe` fields that override ``recipe``'s, e.g. ``precision="fp16"``.
    """
    recipe = recipe_of(recipe, options)
    args = _recording_args(model_config, micro_batch, recipe, gradient_accumulation_steps, target,
                           max_grad_norm, cuda_capability)
    report = measure_fake(*args)
    return dataclasses.replace(report, recipe=recipe,
                               gradient_accumulation_steps=gradient_accumulation_steps)


def measure_step_linear(
    model_config: ModelConfig,
    micro_batch: int,
    recipe: Recipe | str | None = None,
    *,
    gradient_accumulation_steps: int = 1,
    target: str = "cuda",
    max_grad_norm: float | None = 1.0,
    cuda_capability: tuple[int, int] = RTX2050_CAPABILITY,
    **options: Any,
) -> MemoryReport:
    """:func:`measure_step`'s report, the same to the byte, computed from two recorded steps at
    :data:`BASE_MICRO_BATCHES` (every allocation's bytes are linear in the micro-batch, the ops
    the same): after those two, any micro-batch costs a replay (milliseconds) instead of a
    fake-tensor step (seconds). Where that is not exact (a chunked loss, a micro-batch below
    the bases) it measures the step itself. What :func:`lowvram.memory.plan` searches with;
    ``tests/test_memory_golden.py`` holds it against measured steps."""
    recipe = recipe_of(recipe, options)
    args = _recording_args(model_config, micro_batch, recipe, gradient_accumulation_steps, target,
                           max_grad_norm, cuda_capability)
    report = measure_fake(*args, linear=True)
    return dataclasses.replace(report, recipe=recipe,
                               gradient_accumulation_steps=gradient_accumulation_steps)


def _recording_args(
    model_config: ModelConfig, micro_batch: int, recipe: Recipe, gradient_accumulation_steps: int,
    target: str, max_grad_norm: float | None, cuda_capability: tuple[int, int],
) -> tuple[Any, ...]:
    """Check the options; the arguments of ``record_fake`` for them."""
    check_micro_batch(micro_batch)
    check_accumulation(gradient_accumulation_steps)
    check_choice("target", target, TARGETS)
    cfg = recipe.apply(model_config)
    key = Recipe(
        "", recipe.precision, recipe.optimizer, recipe.adamw_impl, cfg.tie_embeddings,
        cfg.gradient_checkpointing, cfg.loss_chunk_size, recipe.keep_logits,
    )  # one memo entry per measured step, whatever the recipe is called
    # any accumulation >= 2 has the same peak: the 2nd micro-batch's state repeats
    return (cfg, micro_batch, key, target, max_grad_norm, tuple(cuda_capability),
            min(gradient_accumulation_steps, 2))
