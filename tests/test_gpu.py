"""Checks that need a CUDA GPU (``make test-gpu`` runs them; skipped without CUDA).

Each compares with a real measurement on the GPU: ``lowvram.verify.verify_training`` runs the
real ``train()`` and reads the caching allocator's peaks, which the planner's prediction is held
against; fp16, bf16 and 8-bit AdamW are trained for real and compared with fp32 runs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from lowvram.config import ModelConfig, TrainConfig, get_preset
from lowvram.data import random_rows
from lowvram.memory import CUDA_CONTEXT_BYTES
from lowvram.model import GPTModel
from lowvram.optim import build_optimizer
from lowvram.train import train
from lowvram.verify import PLAN_TOLERANCE, verify_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MiB = 2**20
GiB = 2**30
DEMO_MODEL, DEMO_TRAIN = get_preset("cpu-demo")  # 4 x 128, vocab 2048, block 64
RTX_MODEL, RTX_TRAIN = get_preset("rtx2050")  # the lesson's 134M model, fp16 4 x 4


def _train(tmp_path, model: ModelConfig, config: TrainConfig, rows: torch.Tensor) -> dict:
    config = config.replace(output_dir=str(tmp_path), num_epochs=1, eval_interval=0,
                            eval_max_batches=1, checkpoint_interval=0, log_interval=10**6)
    return train(model, config, train_data=rows, val_data=rows[:4], progress=False, cpu=False,
                 overwrite_output_dir=True)


def _allocator_cap_is_lifted() -> bool:
    """True if a tensor larger than any card we emulate can be allocated (the cap is 1.0)."""
    x = torch.empty(5 * GiB, dtype=torch.uint8, device="cuda")
    del x
    torch.cuda.empty_cache()
    return True


def test_verify_training_on_a_small_model_fits_and_its_numbers_are_sane():
    config = DEMO_TRAIN.replace(mixed_precision="fp16", per_device_train_batch_size=4,
                                gradient_accumulation_steps=2)
    r = verify_training(DEMO_MODEL, config, card_gib=4.0, steps=2)
    assert r["outcome"] == "fits" and r["fits"] and r["error"] is None
    assert r["steps_run"] == 2 and all(math.isfinite(x) for x in r["losses"])
    # random tokens: the first loss is about ln(vocab)
    assert r["losses"][0] == pytest.approx(math.log(DEMO_MODEL.vocab_size), abs=0.5)
    assert r["precision"] == "fp16" and r["loss_scales"][0] == 2.0**16
    params = GPTModel(DEMO_MODEL).num_parameters()
    # at least weights + gradients + AdamW's two moments, fp32; below the cap
    assert 16 * params <= r["measured_allocated_bytes"] <= r["measured_reserved_bytes"]
    assert r["measured_reserved_bytes"] <= r["cap_bytes"]
    assert r["predicted_runs_under_cap"] and r["predicted_fits"]  # the planner agrees
    assert r["predicted_capped_reserved_bytes"] <= r["predicted_reserved_bytes"]
    assert 0 < r["context_bytes"] < 2 * GiB and r["context_after_bytes"] > 0
    assert r["card_bytes"] == 4 * GiB
    assert r["cap_bytes"] == pytest.approx(4 * GiB - r["context_bytes"], abs=1)
    # the cuBLAS/cuBLASLt workspaces, and nothing else alive in the measurement (no model)
    assert r["baseline_allocated_bytes"] < 256 * MiB
    assert _allocator_cap_is_lifted()


def test_verify_training_reports_running_out_of_memory_and_lifts_the_cap():
    # a "card" of 1 GiB whose context leaves 256 MiB to the allocator: the model alone is 0.5 GiB
    r = verify_training(RTX_MODEL, RTX_TRAIN, card_gib=1.0, steps=2,
                        context_bytes=1 * GiB - 256 * MiB)
    assert r["outcome"] == "ran out of memory" and not r["fits"]
    assert "out of memory" in r["error"].lower()
    assert r["steps_run"] == 0 and r["cap_bytes"] == pytest.approx(256 * MiB, abs=1)
    assert not r["predicted_runs_under_cap"]  # the planner agrees
    assert r["measured_reserved_bytes"] <= r["cap_bytes"]
    assert _allocator_cap_is_lifted()


def test_train_waits_for_the_gpu_once_per_optimizer_step(tmp_path):
    """Issue 19: pinned batches copied without a wait; the GradScaler's inf check is the one
    synchronisation of a step (a plain copy would add one per micro-batch: 4 in a 4 x 4 step)."""
    from lowvram._bench.gpu_profile import SyncCounter

    rows = random_rows(DEMO_MODEL, 16 * 8, seed=0)
    config = DEMO_TRAIN.replace(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                mixed_precision="fp16", max_steps=6)
    counter, steps = SyncCounter(), []

    def on_step(model) -> None:  # count over optimizer steps 2..5 (after warm-up)
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            counter.start()
        if len(steps) == 5:
            counter.stop()

    config = config.replace(output_dir=str(tmp_path), num_epochs=1, eval_interval=0,
                            eval_max_batches=1, checkpoint_interval=0, log_interval=10**6)
    try:
        train(DEMO_MODEL, config, train_data=rows, val_data=rows[:4], progress=False, cpu=False,
              on_optimizer_step=on_step)
    finally:
        counter.stop()
    assert len(steps) == 6
    assert counter.total == 3, dict(counter.sites)  # 3 steps: one wait each (GradScaler.step)
    assert all("lowvram/train.py" in site or "optimizer" in site for site in counter.sites), \
        dict(counter.sites)


def test_fp16_train_on_cuda_scales_the_loss_and_matches_fp32(tmp_path):
    rows = random_rows(DEMO_MODEL, 48, seed=0)
    config = DEMO_TRAIN.replace(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                max_steps=3)
    fp32 = _train(tmp_path / "fp32", DEMO_MODEL, config.replace(mixed_precision="no"), rows)
    fp16 = _train(tmp_path / "fp16", DEMO_MODEL, config.replace(mixed_precision="fp16"), rows)
    assert fp16["precision"] == "fp16" and fp32["precision"] == "no"
    scales = [s["loss_scale"] for s in fp16["steps"]]
    assert scales[0] == 2.0**16  # GradScaler's initial scale
    assert all(s > 0 and math.log2(s).is_integer() for s in scales)  # halved on overflow only
    assert fp16["skipped_steps"] == sum(s["skipped"] for s in fp16["steps"])
    assert all(s["loss_scale"] is None for s in fp32["steps"])
    # 16-bit matmuls on the same data and weights: close to fp32 until a step is skipped (an
    # fp16 overflow leaves the weights as they were, so the runs part ways there)
    for a, b in zip(fp16["steps"], fp32["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)
        if a["skipped"]:
            break


def test_bf16_train_on_cuda_has_no_scaler_and_matches_fp32(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    rows = random_rows(DEMO_MODEL, 32, seed=0)
    config = DEMO_TRAIN.replace(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                max_steps=3)
    fp32 = _train(tmp_path / "fp32", DEMO_MODEL, config.replace(mixed_precision="no"), rows)
    bf16 = _train(tmp_path / "bf16", DEMO_MODEL, config.replace(mixed_precision="bf16"), rows)
    assert bf16["precision"] == "bf16"
    assert all(s["loss_scale"] is None and not s["skipped"] for s in bf16["steps"])
    for a, b in zip(bf16["steps"], fp32["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-2)


def test_adamw8bit_on_cuda_keeps_8bit_moments_and_learns(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = GPTModel(DEMO_MODEL).cuda()
    optimizer = build_optimizer(model.parameters(), DEMO_TRAIN.replace(optimizer="adamw8bit"))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    X = random_rows(DEMO_MODEL, 4, seed=0).cuda()
    model(X[:, :-1], X[:, 1:])[1].backward()
    optimizer.step()
    big = model.lm_head.weight  # 2048 x 128: blockwise 8-bit state from 4096 values up
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # 1 byte per value, not 4
    del model, optimizer
    # one repeated row: the 8-bit optimizer must drive its loss down in a few steps
    rows = random_rows(DEMO_MODEL, 1, seed=3).repeat(40, 1)
    config = DEMO_TRAIN.replace(optimizer="adamw8bit", mixed_precision="no", max_steps=5,
                                per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                warmup_ratio=0.0)
    losses = [s["loss"] for s in _train(tmp_path, DEMO_MODEL, config, rows)["steps"]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("shape", ["fp16 4 x 4", "fp16 16 x 1 chunked 8-bit"])
def test_planner_prediction_is_within_tolerance_of_the_real_train(shape):
    """The planner's CUDA prediction against the real train()'s peak on this GPU (not against
    the planner's own loop): the lesson's fp16 4 x 4, and 16 x 1 with chunked loss + 8-bit.
    The card's context is the planner's (an RTX 2050's): a large GPU's own is larger."""
    model, config = RTX_MODEL, RTX_TRAIN.replace(mixed_precision="fp16")
    if shape.startswith("fp16 16"):
        pytest.importorskip("bitsandbytes")
        model = dataclasses.replace(model, loss_chunk_size=256)
        config = config.replace(per_device_train_batch_size=16, gradient_accumulation_steps=1,
                                optimizer="adamw8bit")
    r = verify_training(model, config, card_gib=4.0, steps=2, context_bytes=CUDA_CONTEXT_BYTES)
    assert r["fits"], r["error"]
    assert r["accumulation_modelled"], "lowvram.memory.measure_step takes no accumulation"
    assert abs(r["allocated_error"]) <= PLAN_TOLERANCE, (
        f"predicted {r['predicted_allocated_bytes'] / MiB:.0f} MiB, measured "
        f"{r['measured_allocated_bytes'] / MiB:.0f} MiB ({r['allocated_error']:+.1%})")


@pytest.mark.parametrize(("factor", "runs"), [(1.03, True), (0.98, False)])
def test_the_planners_capped_need_is_what_train_needs_under_a_cap(factor, runs):
    """What "fits" judges (issue 18): the planner's capped_reserved_bytes for the lesson's
    fp16 4 x 4 on this GPU, made the allocator's cap: the real train() runs under it + 3% and
    runs out of memory under it - 2% (the H200 trace put it within 2%: +0.2%; the
    3% above leaves room for what earlier tests left in this process)."""
    from lowvram.memory import measure_step

    config = RTX_TRAIN.replace(mixed_precision="fp16")
    need = measure_step(RTX_MODEL, config.per_device_train_batch_size, "fp16",
                        gradient_accumulation_steps=config.gradient_accumulation_steps,
                        cuda_capability=torch.cuda.get_device_capability()).capped_reserved_bytes
    cap = int(need * factor)
    r = verify_training(RTX_MODEL, config, card_gib=4.0, steps=2, context_bytes=4 * GiB - cap)
    assert r["predicted_capped_reserved_bytes"] == need
    assert r["cap_bytes"] == pytest.approx(cap, abs=1)
    assert r["fits"] == runs, (f"planner's need {need / MiB:,.0f} MiB, cap {cap / MiB:,.0f} MiB: "
                               f"{r['outcome']} (measured reserved {r['measured_reserved_bytes'] / MiB:,.0f} MiB)")


def test_gpu_bench_measures_both_loops_on_a_small_model():
    from lowvram._bench.gpu import GpuSpec, format_gpu_table, run_gpu

    spec = GpuSpec("cpu-demo fp16 2 x 2", DEMO_MODEL,
                   DEMO_TRAIN.replace(mixed_precision="fp16", per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2))
    params = GPTModel(DEMO_MODEL).num_parameters()
    paired = run_gpu([spec], steps=6, warmup=1)  # both loops at once, in turns
    alone = run_gpu([spec], steps=3, warmup=1, rounds=2, paired=False)  # one after the other
    (row,), (row2,) = paired["rows"], alone["rows"]
    assert (row["method"], row2["method"]) == ("paired", "rounds") and paired["notes"] == []
    assert len(row["lowvram_ms"]) == len(row["plain_ms"]) == 6
    assert len(row2["lowvram_ms"]) == len(row2["plain_ms"]) == 3 * 2  # 3 steps, 2 rounds
    assert row["ratio"] == statistics.median(row["step_ratios"])
    lo, hi = row["ratio_interval"]
    assert lo <= row["ratio"] <= hi
    assert row2["ratio"] == pytest.approx(row2["lowvram_median_ms"] / row2["plain_median_ms"])
    for loop in ("lowvram", "plain"):
        # weights, gradients and AdamW's two moments in fp32, at least; and each loop's own
        # peak while both are on the GPU is what it has alone (the pairing's bookkeeping)
        assert row[f"{loop}_peak_bytes"] >= 16 * params
        assert row[f"{loop}_peak_bytes"] == pytest.approx(row2[f"{loop}_peak_bytes"], rel=0.1)
    assert paired["gpu"]["name"] == torch.cuda.get_device_name(0)
    assert "cpu-demo fp16 2 x 2" in format_gpu_table(paired)
