"""The planner and the ablation: which micro-batch and accumulation fit a card, and what each
memory option saves.

Import these names from ``lowvram.memory``. Layer 8 of the package: it imports ``report``,
``tracker`` (the memo its worker processes fill) and ``measure``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.config import ModelConfig, get_preset
from lowvram.memory.measure import (
    RECORDED_CAPABILITY,
    check_accumulation,
    measure_step,
    measure_step_linear,
)
from lowvram.memory.report import (
    MAX_MICRO_BATCH,
    MemoryReport,
    Recipe,
    check_card,
)
from lowvram.memory.tracker import _recorded, _shipped, record_fake

__all__ = ["DEFAULT_RECIPES", "AblationRow", "PlanRow", "ablation", "plan"]

LARGEST_SEARCH_FACTOR = 8  # plan(largest=True) looks up to 8 x the target micro-batch
MAX_WORKERS = 4  # plan()'s recording processes at most (each holds torch: ~0.5 GB of RAM)

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
    """The largest micro-batch of one recipe that divides the target effective batch and fits
    (measured with its own accumulation), the accumulation it then needs, and (when searched)
    the largest micro-batch that fits at all."""

    recipe: Recipe
    micro_batch: int  # 0: not even one sequence fits
    accumulation: int  # target_effective_batch // micro_batch
    effective_batch: int  # micro_batch x accumulation == the target
    report: MemoryReport | None  # the measurement at micro_batch x accumulation
    largest_micro_batch: int | None = None  # plan(..., largest=True): exact or not
    largest_limit: int | None = None  # the search's cap: largest_micro_batch == it means ">="

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0

    @property
    def gradient_accumulation_steps(self) -> int:
        """``accumulation``, spelled as ``TrainConfig`` and the train command line spell it."""
        return self.accumulation

    def train_command(self, preset: str = "rtx2050") -> str:
        """The ``python -m lowvram.train`` command that trains this row's step on ``preset``:
        its micro-batch, accumulation, precision and every option where the recipe differs
        from the preset (``adamw_impl`` when it is not CUDA's default, foreach)."""
        if self.report is None:
            raise ValueError(
                f"the row {self.recipe.name!r} has no step that fits (micro_batch=0): there is "
                "no command to run; use a leaner recipe or a larger card"
            )
        model_cfg, train_cfg = get_preset(preset)
        cfg = self.report.model_config  # the preset's model with the recipe applied
        if dataclasses.replace(cfg, tie_embeddings=model_cfg.tie_embeddings,
                               gradient_checkpointing=model_cfg.gradient_checkpointing,
                               loss_chunk_size=model_cfg.loss_chunk_size) != model_cfg:
            raise ValueError(
                f"this row was planned for another model than preset {preset!r}: pass the "
                "preset whose ModelConfig the plan measured"
            )
        recipe = self.recipe
        parts = [
            f"python -m lowvram.train --preset {preset}",
            f"--per-device-train-batch-size {self.micro_batch}",
            f"--gradient-accumulation-steps {self.accumulation}",
            f"--mixed-precision {recipe.precision}",
        ]
        if recipe.optimizer != train_cfg.optimizer:
            parts.append(f"--optimizer {recipe.optimizer}")
        if recipe.optimizer == "adamw" and recipe.adamw_impl != "foreach":
            parts.append(f"--adamw-impl {recipe.adamw_impl}")
        if cfg.loss_chunk_size != model_cfg.loss_chunk_size:
            parts.append(f"--loss-chunk-size {cfg.loss_chunk_size}")
        for field in ("tie_embeddings", "gradient_checkpointing"):
            value = getattr(cfg, field)
            if value != getattr(model_cfg, field):
                parts.append(f"--{'' if value else 'no-'}{field.replace('_', '-')}")
        return " ".join(parts)


def plan(
    model_config: ModelConfig,
    card_gib: float = 4.0,
    target_effective_batch: int = 16,
    recipes: Sequence[Recipe] = DEFAULT_RECIPES,
    *,
    largest: bool = False,
    free_bytes: int | None = None,
    workers: int | None = None,
) -> list[PlanRow]:
    """For each recipe, the largest micro-batch that divides ``target_effective_batch`` and fits
    the card inside the headroom (:meth:`MemoryReport.fits`), each candidate measured with its
    own accumulation (the quotient), so every row trains at exactly the target (4 x 4, 8 x 2,
    16 x 1 for 16) and its report is that step's.

    ``largest=True`` also finds the largest micro-batch that fits at all (with accumulation
    >= 2 below the target, 1 from it on), up to ``LARGEST_SEARCH_FACTOR`` (8) times the target.
    ``free_bytes``: plan for what ``torch.cuda.mem_get_info()`` says is free.

    Fast: within one recipe every allocation's bytes are linear in the micro-batch (at a fixed
    accumulation regime), so two recorded steps give every candidate's report exactly
    (:func:`~lowvram.memory.measure.measure_step_linear`); a line through two of them predicts
    the answer, and the answer and the next one up are checked (:class:`_Search`). With a
    chunked loss (ops that grow with the micro-batch) those checks are measured steps.

    ``workers``: record the recipes' steps in that many Python processes at once (each recipe's
    recordings are independent of the others'); the search then runs here on their recordings,
    so the rows are the same to the byte. Default: 1 (here, one recipe after another) on a
    machine with 2 cores or fewer, else up to ``MAX_WORKERS`` (one core left free); the
    environment variable ``LOWVRAM_PLAN_WORKERS`` overrides the default. If the processes
    fail, a warning says why and the steps are recorded here.
    """
    check_card(card_gib)
    ok = isinstance(target_effective_batch, int) and not isinstance(target_effective_batch, bool)
    if not (ok and 0 < target_effective_batch <= MAX_MICRO_BATCH):
        raise ValueError(
            f"target_effective_batch={target_effective_batch!r} is not allowed: it must be an "
            f"integer in [1, {MAX_MICRO_BATCH}], e.g. 16"
        )
    _record_in_workers(model_config, card_gib, target_effective_batch, recipes, largest, free_bytes,
                       _worker_count(workers, len(recipes)))
    rows = []
    for recipe in recipes:
        search = _Search(model_config, recipe, card_gib, free_bytes, target_effective_batch)
        micro, report = search.largest_divisor()
        most = cap = None
        if largest:
            cap = LARGEST_SEARCH_FACTOR * target_effective_batch
            most = search.largest_at_all(cap)
        if report is None:
            rows.append(PlanRow(recipe, 0, 0, 0, None, most, cap))
        else:
            accumulation = target_effective_batch // micro
            rows.append(PlanRow(recipe, micro, accumulation, target_effective_batch, report, most, cap))
    _shipped.clear()  # any the search here did not ask for (none, as it is the same search)
    return rows


def _worker_count(workers: int | None, tasks: int) -> int:
    """How many recording processes plan() starts (1: none, it records here)."""
    if workers is None:
        env = os.environ.get("LOWVRAM_PLAN_WORKERS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"LOWVRAM_PLAN_WORKERS={env!r} is not allowed: it must be a "
                                 "positive integer (1: record in this process)")
            workers = int(env)
        else:
            cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)  # fmt: skip
            workers = 1 if cores <= 2 else min(cores - 1, MAX_WORKERS)
    ok = isinstance(workers, int) and not isinstance(workers, bool)
    if not (ok and workers >= 1):
        raise ValueError(f"workers={workers!r} is not allowed: it must be a positive integer "
                         "(1: record in this process), or None for the machine's default")
    return min(workers, tasks)


def _search_recordings(model_config: ModelConfig, card_gib: float, target: int,
                       recipes: Sequence[Recipe], largest: bool,
                       free_bytes: int | None) -> list[tuple[tuple[Any, ...], Any]]:
    """Run plan()'s search for ``recipes`` (in a worker process): the steps it recorded, as
    ``(record_fake's arguments, Recording)``, for the parent's memo."""
    before = set(_recorded)
    for recipe in recipes:
        search = _Search(model_config, recipe, card_gib, free_bytes, target)
        search.largest_divisor()
        if largest:
            search.largest_at_all(LARGEST_SEARCH_FACTOR * target)
    return [(key, record_fake(*key)) for key in _recorded - before]


def _record_in_workers(model_config: ModelConfig, card_gib: float, target: int,
                       recipes: Sequence[Recipe], largest: bool, free_bytes: int | None,
                       workers: int) -> None:
    """Record the recipes' steps in ``workers`` processes (``python -m
    lowvram.memory._plan_worker``: a fresh interpreter, so it works in a Jupyter kernel and in a
    script without a ``__main__`` guard) and hand their recordings to ``record_fake``'s memo.
    Nothing to do for 1 worker, or when the recipes' steps were recorded here already."""
    if workers < 2:
        return
    todo = [r for r in recipes if not _recorded_here(model_config, r, target)]
    if len(todo) < 2:
        return
    groups = [todo[i::workers] for i in range(min(workers, len(todo)))]
    try:
        with ThreadPoolExecutor(len(groups)) as pool:
            results = list(pool.map(
                lambda group: _run_worker((model_config, card_gib, target, group, largest, free_bytes)),
                groups))  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- any failure: record here instead, and say why
        warnings.warn(f"plan(): recording in {len(groups)} worker processes failed ({e}); "
                      "recording here instead, one recipe after another (set "
                      "LOWVRAM_PLAN_WORKERS=1 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return
    for pairs in results:
        _shipped.update(pairs)


def _recorded_here(model_config: ModelConfig, recipe: Recipe, target: int) -> bool:
    """Whether this process recorded the recipe's first step of the search (then the search's
    other steps are most likely memoised too: a worker would save nothing)."""
    from lowvram.memory.measure import _available, _recording_args

    key = _recording_args(model_config, target, recipe, 1, "cuda", 1.0, RECORDED_CAPABILITY)
    return _available(key[0], key[1], (*key[2:], True))


def _run_worker(task: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds lowvram/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    with tempfile.TemporaryDirectory(prefix="lowvram-plan-") as tmp:
        task_path, out_path = Path(tmp, "task.pkl"), Path(tmp, "out.pkl")
        task_path.write_bytes(pickle.dumps(task))
        done = subprocess.run(
            [sys.executable, "-m", "lowvram.memory._plan_worker", str(task_path), str(out_path)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0 or not out_path.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"exit status {done.returncode}: {tail[0]}")
        return pickle.loads(out_path.read_bytes())


class _Search:
    """One recipe's search. ``margin(m)``: the bytes left under the limit by micro-batch ``m``
    (>= 0: fits), measured or predicted. Memory is linear in ``m`` within a regime: accumulation
    1, or accumulation >= 2 (which all have the same peak: the gradients alive in backward).
    A micro-batch below the target needs accumulation >= 2, the target itself 1."""

    def __init__(self, model_config: ModelConfig, recipe: Recipe, card_gib: float,
                 free_bytes: int | None, target: int) -> None:
        self.model_config, self.recipe, self.target = model_config, recipe, target
        self.card_gib, self.free_bytes = card_gib, free_bytes
        self.measured: dict[tuple[int, int], MemoryReport] = {}

    def _accumulation(self, micro: int) -> int:
        return max(1, self.target // micro) if micro <= self.target else 1

    def report(self, micro: int, accumulation: int | None = None, *,
               linear: bool = True) -> MemoryReport:
        """The step's report (exact either way): replayed from the regime's two recorded
        micro-batches (``linear``: worth it where the search needs several), or its own."""
        accumulation = self._accumulation(micro) if accumulation is None else accumulation
        key = (micro, min(accumulation, 2))
        if key not in self.measured:
            measure = measure_step_linear if linear else measure_step
            self.measured[key] = measure(self.model_config, micro, self.recipe,
                                         gradient_accumulation_steps=accumulation)
        return self.measured[key]

    def margin(self, report: MemoryReport) -> int:
        """Bytes left under the limit (>= 0 exactly when ``report.fits``; exact near it:
        :meth:`MemoryReport.margin_bytes`, which computes the capped need only there)."""
        return report.margin_bytes(self.card_gib, self.free_bytes)

    def fits(self, micro: int, accumulation: int | None = None) -> bool:
        return self.margin(self.report(micro, accumulation)) >= 0

    def _line(self, regime: int, points: tuple[int, int]) -> Callable[[int], float]:
        """Predicted margin(m) in a regime (1, or 2 for accumulation >= 2): linear through two
        micro-batches of the full model. Without a chunked loss both are exact replays
        (:func:`measure_step_linear`), so the prediction costs nothing; with one, the points
        are chosen among those the search measures anyway, or small (few chunks: cheap)."""
        (m1, m2) = points
        y1, y2 = (self.margin(self.report(m, regime)) for m in points)
        slope = (y2 - y1) / (m2 - m1) if m2 != m1 else 0.0
        return lambda m: y1 + slope * (m - m1)

    def _confirm(self, candidates: Sequence[int], predict: Callable[[int], float],
                 accumulation: Callable[[int], int]) -> int:
        """The largest candidate that fits (0 if none), measured: start at the predicted one,
        step down while it does not fit; then measure the next one up, and go on up while that
        fits (a prediction that was too low costs one measurement per candidate it missed)."""
        if not candidates:
            return 0
        i = max((k for k, m in enumerate(candidates) if predict(m) >= 0), default=0)
        while i >= 0 and not self.fits(candidates[i], accumulation(candidates[i])):
            i -= 1
        while i + 1 < len(candidates) and self.fits(candidates[i + 1], accumulation(candidates[i + 1])):
            i += 1
        return candidates[i] if i >= 0 else 0

    def largest_divisor(self) -> tuple[int, MemoryReport | None]:
        target = self.target
        divisors = [d for d in range(1, target + 1) if target % d == 0]
        # the only accumulation-1 candidate (the answer on a roomy card): one step, measured
        if self.margin(self.report(target, 1, linear=False)) >= 0:
            return target, self.report(target, 1)
        below = divisors[:-1]
        if not below:
            return 0, None
        # the largest candidate below the target: where it fits it is the answer (memory grows
        # with the micro-batch), without the line's other point (with a chunked loss a step of
        # its own; without one the line's steps are replays of the same two recordings)
        if self.fits(below[-1]):
            return below[-1], self.report(below[-1])
        line = self._line(2, (min(2, below[-1]), below[-1]))
        micro = self._confirm(below, line, self._accumulation)
        return (micro, self.report(micro)) if micro else (0, None)

    def largest_at_all(self, cap: int) -> int:
        """The largest micro-batch up to ``cap`` that fits (accumulation >= 2 below the target,
        1 from it on)."""
        target = self.target
        if self.fits(target, 1):
            line = self._line(1, (2, target) if target > 2 else (target, 2 * target))
            candidates = list(range(target, cap + 1))
            return self._confirm(candidates, line, lambda m: 1)
        if target == 1:
            return 0
        below = list(range(1, target))
        line = self._line(2, (min(2, target // 2), max(2, target // 2)))
        return self._confirm(below, line, lambda m: 2)


def _largest(
    candidates: Sequence[int], fits: Callable[[int], MemoryReport | None]
) -> tuple[int, MemoryReport | None]:
    """The largest candidate (ascending list) that fits, by bisection, trying the largest first
    (kept for callers that plan with their own ``fits``; :func:`plan` extrapolates instead)."""
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


def ablation(model_config: ModelConfig, micro_batch: int = 4, card_gib: float = 4.0, *,
             gradient_accumulation_steps: int = 4) -> list[AblationRow]:
    """From the lesson's baseline to the leanest recipe, one option at a time, at
    ``micro_batch`` x ``gradient_accumulation_steps`` (default the lesson's 4 x 4)."""
    check_card(card_gib)
    check_accumulation(gradient_accumulation_steps)
    rows: list[AblationRow] = []
    for recipe in _ablation_recipes():
        r = measure_step(model_config, micro_batch, recipe,
                         gradient_accumulation_steps=gradient_accumulation_steps)
        prev = rows[-1].report if rows else r
        rows.append(AblationRow(
            recipe.name, recipe, r, r.peak_bytes - prev.peak_bytes, r.total_bytes - prev.total_bytes,
        ))
    return rows
