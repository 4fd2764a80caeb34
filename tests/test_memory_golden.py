"""The planner's speed-up (issue 18) changed how it measures, not what: its answers against
those recorded before it (tests/data/memory_golden.json), and the replay that makes it fast
against direct measurements."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowvram.config import get_preset
from lowvram.memory import Recipe, measure_step
from lowvram.memory.measure import BASE_MICRO_BATCHES, _recording_args, measure_step_linear
from lowvram.memory.plan import DEFAULT_RECIPES
from lowvram.memory.replay import replay
from lowvram.memory.tracker import record_fake

GOLDEN = json.loads((Path(__file__).parent / "data" / "memory_golden.json").read_text())
DEMO, _ = get_preset("cpu-demo")


def _compared(report) -> dict:  # type: ignore[no-untyped-def]
    d = report.to_dict()
    return {k: d[k] for k in GOLDEN["steps"][0]["report"]}


@pytest.mark.parametrize(
    "case", [c for c in GOLDEN["steps"] if c["preset"] == "cpu-demo" and (
        len(c["options"]) > 1 or c["options"]["precision"] == ("fp16" if c["target"] == "cuda" else "bf16"))],
    ids=lambda c: f"{c['target']}-N{c['accumulation']}-{'-'.join(f'{k}={v}' for k, v in c['options'].items())}",
)
def test_measure_step_gives_the_recorded_answers(case: dict) -> None:
    r = measure_step(DEMO, case["micro_batch"], Recipe("", **case["options"]),
                     gradient_accumulation_steps=case["accumulation"], target=case["target"])
    assert _compared(r) == case["report"]


@pytest.mark.parametrize(("accumulation", "target"), [(1, "cuda"), (4, "cuda"), (2, "cpu")])
@pytest.mark.parametrize("recipe", [DEFAULT_RECIPES[0], DEFAULT_RECIPES[2]] + [
    Recipe("bf16, tied, checkpointing, 8-bit, no logits", "bf16", "adamw8bit", tie_embeddings=True,
           gradient_checkpointing=True, keep_logits=False),
    Recipe("fp32 loop AdamW", adamw_impl="loop"),
], ids=lambda r: r.name)
def test_replayed_micro_batches_equal_measured_ones(recipe: Recipe, accumulation: int, target: str) -> None:
    """What makes the plan fast is exact: the report at any micro-batch, replayed from the two
    recorded ones, equals that micro-batch measured, to the byte (allocator simulation too)."""
    kwargs = {"gradient_accumulation_steps": accumulation, "target": target}
    replayed = measure_step_linear(DEMO, 6, recipe, **kwargs)
    # measured: its own fake-tensor step (measure_step would replay too, bases recorded)
    args = _recording_args(DEMO, 6, recipe, accumulation, target, 1.0, (8, 6))
    measured = replay(record_fake(*args))
    assert replayed.peak_bytes > measure_step_linear(DEMO, 5, recipe, **kwargs).peak_bytes
    assert dataclasses.replace(replayed, recipe=args[2], gradient_accumulation_steps=args[6]) == measured


def test_another_gpu_generation_replays_the_same_recording() -> None:
    """Hopper's 32 MiB cuBLAS workspace instead of 8: the recording at (8, 6) replayed with that
    size equals a step recorded at (9, 0)."""
    args = _recording_args(DEMO, 4, Recipe("", "fp16"), 2, "cuda", 1.0, (9, 0))
    hopper = measure_step(DEMO, 4, "fp16", gradient_accumulation_steps=2, cuda_capability=(9, 0))
    measured = replay(record_fake(*args))
    assert dataclasses.replace(hopper, recipe=args[2], gradient_accumulation_steps=2) == measured
    ampere = measure_step(DEMO, 4, "fp16", gradient_accumulation_steps=2)
    assert hopper.at_peak["cublas_workspace"] > ampere.at_peak["cublas_workspace"]


def test_replay_refuses_where_it_would_not_be_exact() -> None:
    """A chunked loss (cpu-demo: 64 tokens a row, 256 a chunk: 1 chunk at 2 and 3 rows, 2 at 5)
    and a micro-batch below the recorded ones are measured, not replayed."""
    from lowvram.memory.replay import at_micro_batch

    chunked = Recipe("", "fp16", loss_chunk_size=256)
    assert measure_step_linear(DEMO, 5, chunked) == measure_step(DEMO, 5, chunked)
    assert measure_step_linear(DEMO, 1, "no") == measure_step(DEMO, 1, "no")
    key = Recipe("", "no", tie_embeddings=DEMO.tie_embeddings,
                 gradient_checkpointing=DEMO.gradient_checkpointing,
                 loss_chunk_size=DEMO.loss_chunk_size)
    first, second = (record_fake(DEMO, m, key, "cuda", 1.0, (8, 6), 1) for m in BASE_MICRO_BATCHES)
    assert at_micro_batch(first, second, 1) is None
    assert at_micro_batch(first, second, 9) is not None
    chunk_cfg = chunked.apply(DEMO)
    ckey = Recipe("", "fp16", tie_embeddings=chunk_cfg.tie_embeddings,
                  gradient_checkpointing=chunk_cfg.gradient_checkpointing, loss_chunk_size=256)
    c1, c2 = (record_fake(chunk_cfg, m, ckey, "cuda", 1.0, (8, 6), 1) for m in BASE_MICRO_BATCHES)
    assert at_micro_batch(c1, c2, 5) is None


def test_plan_in_worker_processes_gives_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan(workers=2) records in two other Python processes and searches here on their
    recordings: the same rows as recorded here, and no step recorded here."""
    from lowvram.memory import plan, tracker

    recipes = (DEFAULT_RECIPES[0], DEFAULT_RECIPES[3])  # one plain, one with a chunked loss
    tracker.record_fake.cache_clear()
    tracker._recorded.clear()
    here = []

    class Counting(tracker.StorageTracker):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            here.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tracker, "StorageTracker", Counting)
    shipped = plan(DEMO, 4.0, 8, recipes, workers=2)
    assert (len(here), tracker._shipped) == (0, {})
    tracker.record_fake.cache_clear()
    tracker._recorded.clear()
    recorded = plan(DEMO, 4.0, 8, recipes, workers=1)
    assert len(here) >= 2
    assert shipped == recorded


def test_plan_workers_must_be_a_positive_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.memory import plan

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers="):
            plan(DEMO, 4.0, 8, (), workers=bad)
    monkeypatch.setenv("LOWVRAM_PLAN_WORKERS", "two")
    with pytest.raises(ValueError, match="LOWVRAM_PLAN_WORKERS='two'"):
        plan(DEMO, 4.0, 8, ())


@pytest.mark.parametrize("recipe", [Recipe("fp16", "fp16"), Recipe("fp32 loop", adamw_impl="loop")],
                         ids=lambda r: r.name)
def test_two_measured_micro_batches_give_a_third_by_replay(recipe: Recipe) -> None:
    """measure_step at a micro-batch between or above two measured ones (not the bases) is
    replayed from them: no new recording, and the bytes of its own recording."""
    from lowvram.memory import tracker

    tracker.record_fake.cache_clear()
    assert not tracker._recorded  # cache_clear empties the keys measure_fake reads too
    for m in (4, 7):
        measure_step(DEMO, m, recipe)
    recordings = tracker.record_fake.cache_info().misses
    replayed = {m: measure_step(DEMO, m, recipe) for m in (5, 10)}
    assert tracker.record_fake.cache_info().misses == recordings  # both replayed
    for m, report in replayed.items():
        args = _recording_args(DEMO, m, recipe, 1, "cuda", 1.0, (8, 6))
        measured = replay(record_fake(*args))
        assert dataclasses.replace(report, recipe=args[2], gradient_accumulation_steps=1) == measured
    assert replayed[10].peak_bytes > replayed[5].peak_bytes


def test_plan_takes_the_largest_divisor_below_the_target_when_it_fits() -> None:
    """A chunked loss on a card where 16 x 1 does not fit and 8 x 2 does: the plan measures
    those two steps and no line through a third (memory grows with the micro-batch)."""
    from lowvram.memory import plan, reserve_bytes, tracker

    chunked = DEFAULT_RECIPES[3]
    need = {m: measure_step(DEMO, m, chunked, gradient_accumulation_steps=16 // m).reserved_bytes
            for m in (16, 8)}
    assert need[8] < need[16]
    free = reserve_bytes(4.0) + (need[8] + need[16]) // 2
    tracker.record_fake.cache_clear()
    row = plan(DEMO, 4.0, 16, [chunked], free_bytes=free, workers=1)[0]
    assert (row.micro_batch, row.accumulation) == (8, 2)
    assert row.report == measure_step(DEMO, 8, chunked, gradient_accumulation_steps=2)
    assert tracker.record_fake.cache_info().misses == 2  # 16 x 1 and 8 x 2, recorded once each
