"""``measure_step``: the memory of one optimizer step of ``train()``, measured on fake tensors.

Import it from ``lowvram.memory``. Layer 7 of the package: it imports ``report``, ``replay``,
``tracker`` and ``depth``, and chooses between recording a step (``tracker.record_fake``),
synthesizing a deep model's recording from two shallow ones (``depth.synthesize_depth``) and
replaying another micro-batch's recording (:func:`measure_fake`).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

from lowvram.config import ModelConfig
from lowvram.memory.depth import synthesize_depth
from lowvram.memory.replay import Recording, replay, sizes_at, with_workspace, workspace_bytes
from lowvram.memory.report import (
    RTX2050_CAPABILITY,
    TARGETS,
    MemoryReport,
    Recipe,
    check_choice,
    check_micro_batch,
)
from lowvram.memory.tracker import _recorded, record_fake

__all__ = [
    "BASE_MICRO_BATCHES", "RECORDED_CAPABILITY", "check_accumulation", "measure_fake", "measure_step",
    "measure_step_linear", "recipe_of",
]

# Steps are recorded at one GPU generation: another one's differs only in the cuBLAS
# workspace's bytes (with_workspace), so it replays the same recording.
RECORDED_CAPABILITY = (8, 6)
# A step of a deeper model is synthesized from its recordings at these two depths
# (depth.synthesize_depth; gradient checkpointing's recomputation makes the last layer's
# backward differ from the middle ones', so it needs a middle layer at each: 3 and 4), where
# that costs less than recording it (shallow_depths).
SHALLOW_DEPTHS = (2, 3)
SHALLOW_DEPTHS_CHECKPOINTED = (3, 4)
# A recording's cost in events (about 0.25 ms each on 2 cores), measured on rtx2050 with fp16:
# about 450 per layer, 80 per chunk of a chunked loss (their number grows with the micro-batch,
# and both shallow recordings have them all), and 1200 for the rest (the loop's other events,
# and building the fake model and optimizer: about 0.25 s).
_EVENTS_PER_LAYER, _EVENTS_PER_CHUNK, _EVENTS_FIXED = 450, 80, 1200
# Two micro-batches recorded once per step; every other micro-batch's report follows exactly
# (sizes_at). Not 1: a batch of one takes other paths (views that need no copy).
BASE_MICRO_BATCHES = (2, 3)


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
    _linear: bool = False,
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
        _linear: private (:func:`measure_step_linear`): always replay from the bases.
        **options: :class:`Recipe` fields that override ``recipe``'s, e.g. ``precision="fp16"``.
    """
    recipe = recipe_of(recipe, options)
    args = _recording_args(model_config, micro_batch, recipe, gradient_accumulation_steps, target,
                           max_grad_norm, cuda_capability)
    report = measure_fake(*args, linear=_linear)
    return dataclasses.replace(report, recipe=recipe,
                               gradient_accumulation_steps=gradient_accumulation_steps)


def measure_step_linear(model_config: ModelConfig, micro_batch: int,
                        recipe: Recipe | str | None = None, **kwargs: Any) -> MemoryReport:
    """:func:`measure_step`'s report, the same to the byte, computed from two recorded steps at
    :data:`BASE_MICRO_BATCHES` (every allocation's bytes are linear in the micro-batch, the ops
    the same): after those two, any micro-batch costs a replay (milliseconds) instead of a
    fake-tensor step (seconds). Where that is not exact (a chunked loss, a micro-batch below
    the bases) it measures the step itself. What :func:`lowvram.memory.plan` searches with;
    ``tests/test_memory_golden.py`` holds it against measured steps. Takes
    :func:`measure_step`'s arguments."""
    return measure_step(model_config, micro_batch, recipe, _linear=True, **kwargs)


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


def measure_fake(
    cfg: ModelConfig,
    micro_batch: int,
    recipe: Recipe,
    target: str,
    max_grad_norm: float | None,
    cuda_capability: tuple[int, int],
    accumulation: int = 1,
    shortcut: bool = True,
    *,
    linear: bool = False,
) -> MemoryReport:
    """The report of the step :func:`record_fake` records, from its recording or, where that
    is exact (:func:`sizes_at`), replayed from the recordings at :data:`BASE_MICRO_BATCHES`:
    always with ``linear=True`` (what the planner's search uses), else when those two are
    recorded already. The same bytes either way; a replay costs milliseconds, a recording
    seconds."""
    args = (recipe, target, max_grad_norm, RECORDED_CAPABILITY, accumulation, shortcut)
    sizes = None
    pair = _replay_pair(cfg, micro_batch, args, linear) if shortcut and not cfg.loss_chunk_size else None
    if pair is not None:
        recording, second = (recording_of(cfg, m, *args) for m in pair)
        sizes = sizes_at(recording, second, micro_batch)
    if sizes is None:
        recording = recording_of(cfg, micro_batch, *args)
        sizes = recording.sizes
    if target == "cuda":
        sizes = with_workspace(recording, sizes, workspace_bytes(cuda_capability))
    return replay(recording, sizes, micro_batch)


def shallow_depths(cfg: ModelConfig, micro_batch: int) -> tuple[int, int] | None:
    """The two depths :func:`recording_of` records ``cfg``'s step at, or None: record it at
    ``cfg``'s own depth, where that costs less than the two (a shallow model, or a chunked
    loss of many chunks: rtx2050 synthesizes up to a micro-batch of 24, 13 with checkpointing)."""
    pair = SHALLOW_DEPTHS_CHECKPOINTED if cfg.gradient_checkpointing else SHALLOW_DEPTHS
    chunks = -(-micro_batch * cfg.block_size // cfg.loss_chunk_size) if cfg.loss_chunk_size else 0
    saved = _EVENTS_PER_LAYER * (cfg.n_layer - sum(pair))
    return pair if saved > _EVENTS_FIXED + _EVENTS_PER_CHUNK * chunks else None


def recording_of(cfg: ModelConfig, micro_batch: int, *args: Any) -> Recording:
    """``record_fake(cfg, micro_batch, *args)``'s recording: for a deep model synthesized from
    the same step recorded at :func:`shallow_depths` (``depth.synthesize_depth``: the same
    events, serials, sizes and classes), where the two shallow ones show the regular structure
    that makes that exact; else recorded at full depth."""
    pair = shallow_depths(cfg, micro_batch)
    if pair is not None:
        first, second = (record_fake(dataclasses.replace(cfg, n_layer=n), micro_batch, *args)
                         for n in pair)  # fmt: skip
        synthesized = _synthesize(first, second, cfg.n_layer)
        if synthesized is not None:
            return synthesized
    return record_fake(cfg, micro_batch, *args)


@lru_cache(maxsize=256)
def _synthesize(first: Recording, second: Recording, n_layer: int) -> Recording | None:
    """``synthesize_depth``, memoised by the two recordings (record_fake's memoised objects)."""
    return synthesize_depth(first, second, n_layer)


def _available(cfg: ModelConfig, micro_batch: int, args: tuple[Any, ...]) -> bool:
    """Whether :func:`recording_of` has this step's recordings already (no new recording)."""
    if (cfg, micro_batch, *args) in _recorded:
        return True
    pair = shallow_depths(cfg, micro_batch)
    return pair is not None and all(
        (dataclasses.replace(cfg, n_layer=n), micro_batch, *args) in _recorded for n in pair)


def _replay_pair(cfg: ModelConfig, micro_batch: int, args: tuple[Any, ...],
                 linear: bool) -> tuple[int, int] | None:
    """The two recorded micro-batches (>= 2) that :func:`measure_fake` replays ``micro_batch``
    from (:func:`sizes_at`), or None: record it. With ``linear``, or where both are recorded,
    :data:`BASE_MICRO_BATCHES`; else, where this micro-batch is not recorded itself, the two
    smallest recorded ones (the smaller below it): a notebook that measures 4, 8 and 16 records
    two steps, not three. The same bytes as its own recording (tests/test_memory_golden.py)."""
    if micro_batch <= max(BASE_MICRO_BATCHES) or _available(cfg, micro_batch, args) and not linear:
        return None  # a base itself, or below them (a batch of 1 takes other paths), or recorded
    if linear or all(_available(cfg, m, args) for m in BASE_MICRO_BATCHES):
        return BASE_MICRO_BATCHES
    recorded = sorted({key[1] for key in _recorded if key[2:] == args and key[1] >= 2
                       and _available(cfg, key[1], args)})
    return (recorded[0], recorded[1]) if len(recorded) >= 2 and recorded[0] < micro_batch else None
