"""A deep model's recording synthesized from the same step at two small depths
(lowvram/memory/depth.py) is the recording itself: the same events and serials, sizes,
parameter count and classes, or no answer at all (issue 18, point 8: the plan in seconds).

Time: each case records the step at 2 and 3 layers (3 and 4 with checkpointing) and at the
compared depth. cpu-demo (4 layers, synthesized at 4, or 5 with checkpointing) covers every
recipe of the plan and of the ablation on both targets, accumulation 1 and 2 and
micro-batches 2 and 3, in a representative subset: each recipe at (cuda, 2 x 2), the plan's at
(cpu, 1 x 3) too, plus the other two combinations for fp16 and for checkpointing; chunked
losses at micro-batches 2 and 3 (cpu-demo: 1 chunk at 2 and 3 rows; rtx2050: 2 and 3 chunks). The full-size rtx2050 (12 layers) is compared for the lesson's fp16 step and
through measure_step against the answers recorded before (tests/data/memory_golden.json).
All 56 combinations were compared at full size on rtx2050 once (branch hdepth's report).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowvram.config import get_preset
from lowvram.memory import Recipe, measure, measure_step, plan
from lowvram.memory.depth import synthesize_depth
from lowvram.memory.measure import _recording_args, shallow_depths
from lowvram.memory.plan import DEFAULT_RECIPES, _ablation_recipes
from lowvram.memory.replay import Recording
from lowvram.memory.tracker import record_fake

DEMO, _ = get_preset("cpu-demo")
RTX, _ = get_preset("rtx2050")
GOLDEN = json.loads((Path(__file__).parent / "data" / "memory_golden.json").read_text())
FIELDS = [f.name for f in dataclasses.fields(Recording)]


def _at(cfg, n_layer: int, micro_batch: int, recipe: Recipe, accumulation: int,  # type: ignore[no-untyped-def]
        target: str) -> Recording:
    """record_fake's recording of the step at ``n_layer`` layers."""
    args = _recording_args(dataclasses.replace(cfg, n_layer=n_layer), micro_batch, recipe,
                           accumulation, target, 1.0, (8, 6))
    return record_fake(*args)


def _pair(recipe: Recipe) -> tuple[int, int]:
    return (3, 4) if recipe.apply(DEMO).gradient_checkpointing else (2, 3)


def _same(synthesized: Recording | None, recorded: Recording) -> None:
    assert synthesized is not None
    for name in FIELDS:
        assert getattr(synthesized, name) == getattr(recorded, name), name


def _key(recipe: Recipe) -> Recipe:
    return _recording_args(DEMO, 4, recipe, 4, "cuda", 1.0, (8, 6))[2]


# the ablation's recipes that are not the plan's own steps (8-bit AdamW with adamw_impl="fused"
# carried along: the same ops, another memo key)
ABLATION = [r for r in _ablation_recipes() if _key(r) not in {_key(d) for d in DEFAULT_RECIPES}]


CASES = [(r, "cuda", 2, 2) for r in (*DEFAULT_RECIPES, *ABLATION)] + [(r, "cpu", 1, 3) for r in DEFAULT_RECIPES] + [
    (r, target, accumulation, micro)
    for r in (DEFAULT_RECIPES[1], DEFAULT_RECIPES[6])
    for target, accumulation, micro in (("cuda", 1, 3), ("cpu", 2, 2))
]


@pytest.mark.parametrize(("recipe", "target", "accumulation", "micro_batch"), CASES,
                         ids=lambda v: v.name if isinstance(v, Recipe) else str(v))
def test_synthesized_recording_is_the_recorded_one(recipe: Recipe, target: str, accumulation: int,
                                                   micro_batch: int) -> None:
    low, high = _pair(recipe)
    first, second = (_at(DEMO, n, micro_batch, recipe, accumulation, target) for n in (low, high))
    depth = max(DEMO.n_layer, high + 1)  # at least one copy more than the pair has
    recorded = _at(DEMO, depth, micro_batch, recipe, accumulation, target)
    _same(synthesize_depth(first, second, depth), recorded)
    # the pair's own depths too (no copy added: the skeleton and rules give them back)
    _same(synthesize_depth(first, second, high), second)


def test_the_lessons_model_at_full_depth() -> None:
    """rtx2050, 12 layers, fp16 with foreach AdamW at 2 x 2 (the shape the plan searches):
    synthesized from 2 and 3 layers, it is the 12-layer recording."""
    recipe = DEFAULT_RECIPES[1]
    first, second = (_at(RTX, n, 2, recipe, 2, "cuda") for n in (2, 3))
    recorded = _at(RTX, 12, 2, recipe, 2, "cuda")
    _same(synthesize_depth(first, second, 12), recorded)
    assert len(recorded.events) > 2 * len(second.events)


@pytest.mark.parametrize(
    "case", [c for c in GOLDEN["steps"] if c["preset"] == "rtx2050"],
    ids=lambda c: f"N{c['accumulation']}-{'-'.join(f'{k}={v}' for k, v in c['options'].items())}",
)
def test_measure_step_on_the_lessons_model_gives_the_recorded_answers(case: dict) -> None:
    """measure_step on rtx2050 now synthesizes its 12-layer step (nothing recorded at 12):
    the answers recorded before, to the byte."""
    recipe = Recipe("", **case["options"])
    args = _recording_args(RTX, case["micro_batch"], recipe, case["accumulation"], "cuda", 1.0,
                           (8, 6))
    assert shallow_depths(args[0], case["micro_batch"]) is not None
    r = measure_step(RTX, case["micro_batch"], recipe,
                     gradient_accumulation_steps=case["accumulation"], target=case["target"])
    d = r.to_dict()
    assert {k: d[k] for k in case["report"]} == case["report"]


def test_plan_rows_are_the_same_with_and_without_synthesis(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan() on cpu-demo deepened to 8 layers (deep enough to synthesize), recording every
    step at full depth and synthesizing them: the same rows, reports included."""
    from lowvram.memory import tracker

    deep = dataclasses.replace(DEMO, n_layer=8)
    recipes = (DEFAULT_RECIPES[1],)
    assert shallow_depths(recipes[0].apply(deep), 4) == (2, 3)
    tracker.record_fake.cache_clear()
    synthesized = plan(deep, 4.0, 4, recipes, workers=1)
    assert all(key[0].n_layer < 8 for key in tracker._recorded)  # nothing recorded at 8 layers
    monkeypatch.setattr(measure, "shallow_depths", lambda cfg, micro_batch: None)
    recorded = plan(deep, 4.0, 4, recipes, workers=1)
    assert synthesized == recorded
    assert any(key[0].n_layer == 8 for key in tracker._recorded)


def test_an_irregular_pair_is_refused() -> None:
    """What the pair does not show to be regular gives None (the caller then records): a layer
    with other bytes than the others, an op that is not in the other recording, a free that
    does not follow the layer; and a pair that is not L and L + 1 layers is an error."""
    recipe = DEFAULT_RECIPES[1]
    first, second = (_at(DEMO, n, 2, recipe, 1, "cuda") for n in (2, 3))
    assert synthesize_depth(first, second, 6) is not None
    # one layer's parameter with twice the bytes (the 3rd layer's first parameter)
    per_layer = len(second.params) - len(first.params)
    third = sorted(second.params)[2 + 2 * per_layer]
    k = [e[1] for e in second.events if e[0] == "a"].index(third)
    sizes = list(second.sizes)
    sizes[k] *= 2
    assert synthesize_depth(first, dataclasses.replace(second, sizes=tuple(sizes)), 6) is None
    # an op renamed in the middle of the deeper step
    events = list(second.events)
    i = next(i for i in range(len(events) // 2, len(events)) if events[i][0] == "a")
    events[i] = (*events[i][:2], "unknown_op", events[i][3])
    assert synthesize_depth(first, dataclasses.replace(second, events=tuple(events)), 6) is None
    # the last free of the deeper step frees another (alive) allocation than before
    events = list(second.events)
    frees = [i for i, e in enumerate(events) if e[0] == "f"]
    freed = {events[i][1] for i in frees}
    alive = [e[1] for e in events if e[0] == "a" and e[1] not in freed]
    events[frees[-1]] = ("f", alive[-1])
    assert synthesize_depth(first, dataclasses.replace(second, events=tuple(events)), 6) is None
    with pytest.raises(ValueError, match="at L and L \\+ 1 layers"):
        synthesize_depth(first, _at(DEMO, 4, 2, recipe, 1, "cuda"), 6)
    with pytest.raises(ValueError, match="same step"):
        synthesize_depth(first, _at(DEMO, 3, 3, recipe, 1, "cuda"), 6)
