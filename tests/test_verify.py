"""lowvram.verify on the CPU: the cap arithmetic, the configs of a plan row, what is printed,
and the clear error without CUDA. The real runs are in tests/test_gpu.py (marked gpu)."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowvram import memory, verify
from lowvram.config import get_preset
from lowvram.memory import Recipe
from lowvram.verify import check, cli

plan_module = importlib.import_module("lowvram.memory.plan")  # `lowvram.memory.plan` is the function

MiB = 2**20
GiB = 2**30
H200 = 150_110_011_392  # bytes torch.cuda.mem_get_info reports as total on an H200


def test_cap_fraction_leaves_the_card_minus_its_context_to_the_allocator():
    fraction, card = verify.cap_fraction(4 * GiB, 767 * MiB, H200)
    assert card == 4 * GiB
    assert fraction * H200 == pytest.approx(4 * GiB - 767 * MiB, abs=1)
    assert fraction == pytest.approx((4096 - 767) * MiB / H200)


def test_cap_fraction_on_a_gpu_smaller_than_the_card_uses_the_gpu():
    # a "4 GB" RTX 2050 reports a little less than 4 GiB: verify against the card itself
    total = 4_093_640_704
    fraction, card = verify.cap_fraction(4 * GiB, 300 * MiB, total)
    assert card == total
    assert fraction == pytest.approx((total - 300 * MiB) / total)


@pytest.mark.parametrize(("card", "context", "total", "message"), [
    (1 * GiB, 1 * GiB, H200, "takes the whole card"),
    (1 * GiB, 2 * GiB, H200, "close other programs that use the GPU"),
    (-1, 0, H200, "card_bytes=-1 is not allowed"),
    (GiB, -5, H200, "context_bytes=-5 is not allowed"),
    (GiB, 0, 0, "both must be > 0"),
    (4.0, 0, H200, "card_bytes=4.0 is not allowed"),
])
def test_cap_fraction_rejects_what_cannot_be_emulated(card, context, total, message):
    with pytest.raises(ValueError, match=message):
        verify.cap_fraction(card, context, total)


def test_configs_for_a_plan_row_carry_its_recipe():
    model, train = get_preset("rtx2050")
    recipe = Recipe("lean", "fp16", "adamw8bit", tie_embeddings=True, loss_chunk_size=256)
    m, t = verify.configs_for(model, train, recipe, 16, 1)
    assert (m.tie_embeddings, m.loss_chunk_size, m.gradient_checkpointing) == (True, 256, False)
    assert (t.mixed_precision, t.optimizer) == ("fp16", "adamw8bit")
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (16, 1)
    assert (m.n_layer, m.vocab_size, t.max_lr) == (model.n_layer, model.vocab_size, train.max_lr)


def test_configs_for_carries_the_adamw_kernel_but_not_to_8bit():
    model, train = get_preset("rtx2050")
    _, t = verify.configs_for(model, train, Recipe("f", "fp16", adamw_impl="fused"), 4, 4)
    assert (t.optimizer, t.adamw_impl) == ("adamw", "fused")
    # bitsandbytes' AdamW8bit has its own kernel: TrainConfig would refuse one
    _, t = verify.configs_for(model, train, Recipe("f", "fp16", "adamw8bit", adamw_impl="fused"), 4, 4)
    assert (t.optimizer, t.adamw_impl) == ("adamw8bit", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_verify_says_why(capsys):
    model, train = get_preset("tiny")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        verify.verify_training(model, train)
    assert verify.verify_cli(model, train) == 2
    assert "error: --verify-gpu needs a CUDA GPU" in capsys.readouterr().err
    assert verify.main(["--preset", "tiny", "--plan"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    # the memory CLI's --verify-gpu is the same check, with its accumulation
    assert memory.main(["--preset", "tiny", "--verify-gpu"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        verify.main(["--preset", "gpt5"])
    assert "preset='gpt5' is unknown" in capsys.readouterr().err


def _fake_result(**changes) -> dict:
    r = {
        "outcome": "fits", "fits": True, "error": None, "device": "NVIDIA H200",
        "capability": [9, 0], "gpu_total_bytes": H200, "card_gib": 4.0, "card_bytes": 4 * GiB,
        "card_is_the_gpu": False, "context_bytes": 767 * MiB, "context_measured_bytes": 767 * MiB,
        "context_after_bytes": 800 * MiB, "cap_fraction": 0.02, "cap_bytes": 3329 * MiB,
        "baseline_allocated_bytes": 32 * MiB, "predicted_allocated_bytes": 3200 * MiB,
        "predicted_reserved_bytes": 3300 * MiB, "predicted_fits": True,
        "predicted_capped_reserved_bytes": 3250 * MiB, "predicted_runs_under_cap": True,
        "accumulation_modelled": True, "measured_allocated_bytes": 3232 * MiB,
        "measured_reserved_bytes": 3310 * MiB, "allocated_error": 3200 / 3232 - 1,
        "reserved_error": 3300 / 3310 - 1, "precision": "fp16", "micro_batch": 4,
        "gradient_accumulation_steps": 4, "optimizer": "adamw", "adamw_impl": "foreach",
        "tie_embeddings": False, "gradient_checkpointing": False, "loss_chunk_size": 0,
        "steps": 2, "steps_run": 2, "losses": [10.4, 10.3], "loss_scales": [65536.0, 65536.0],
        "skipped_steps": 0, "predict_s": 1.0, "run_s": 3.0,
    }
    return {**r, **changes}


def test_format_result_prints_predicted_measured_context_and_verdict():
    text = cli.format_result(_fake_result())
    assert "max_memory_allocated: predicted 3,200 MiB, measured 3,232 MiB (-1.0%)" in text
    assert "max_memory_reserved: predicted 3,300 MiB, measured 3,310 MiB (-0.3%)" in text
    assert "767 MiB, measured 767 MiB before the run and 800 MiB after it" in text
    assert "allocator capped at 3,329 MiB" in text
    assert ("under a cap: the planner's run needs 3,250 MiB reserved (the smallest cap it fits "
            "under; the uncapped peak above can be larger): predicted to run under this cap of "
            "3,329 MiB; the plan says it fits a 4 GiB card with its headroom") in text
    over = cli.format_result(_fake_result(predicted_runs_under_cap=False, predicted_fits=False))
    assert "predicted to run out of memory under this cap" in over and "does not fit" in over
    assert "result: fits (2 steps, losses 10.4000, 10.3000); the card needs 4,110 of 4,096 MiB" in text
    assert "more than the card" in text  # 3,310 reserved + 800 outside > 4,096
    assert "more than the card" not in cli.format_result(_fake_result(context_after_bytes=700 * MiB))
    oom = cli.format_result(_fake_result(fits=False, outcome="ran out of memory",
                                            error="CUDA out of memory. Tried to allocate 20 MiB",
                                            accumulation_modelled=False))
    assert "result: ran out of memory (CUDA out of memory. Tried to allocate 20 MiB)" in oom
    assert "does not model the accumulation" in oom


def test_format_plan_table_marks_each_row():
    rows = [
        {"recipe": "fp16 (the lesson's choice)", **_fake_result(), "passed": True, "note": ""},
        {"recipe": "fp16 + fused AdamW", **_fake_result(allocated_error=-0.05),
         "passed": False, "note": "allocated peak off by -5.0% (tolerance 3%)"},
        {"recipe": "fp32 (lesson baseline)", "micro_batch": 2, "gradient_accumulation_steps": 8,
         "planned_fits": True, "passed": None, "note": "skipped: no bitsandbytes"},
        {"recipe": "fp16 + 8-bit", "micro_batch": 16, "gradient_accumulation_steps": 1,
         "planned_fits": True, "passed": False, "note": "failed: RuntimeError: a kernel"},
    ]
    lines = cli.format_plan_table(rows).splitlines()
    assert len(lines) == 6
    assert lines[5] == "| fp16 + 8-bit | 16 x 1 | | | | | | | failed: RuntimeError: a kernel | **NO** |"
    assert lines[2].startswith("| fp16 (the lesson's choice) | 4 x 4 | 3,200 | 3,232 | -1.0% |")
    assert lines[2].endswith("| 3,300 | 3,310 | 3,250 | fits | yes |")
    assert lines[3].endswith("| **NO**: allocated peak off by -5.0% (tolerance 3%) |")
    assert lines[4] == "| fp32 (lesson baseline) | 2 x 8 | | | | | | | skipped: no bitsandbytes | - |"


# --------------------------------------------------------------------------- the run, faked


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda answering as an 8 GiB GPU, while train() really runs on the CPU: the
    orchestration of verify_training (the cap set and lifted, what is returned) without a GPU.
    Returns the fractions passed to set_per_process_memory_fraction, in order."""
    import lowvram.train

    fractions: list[float] = []
    answers = {
        "is_available": True, "mem_get_info": (8 * GiB - 600 * MiB, 8 * GiB),
        "memory_reserved": 100 * MiB, "memory_allocated": 40 * MiB,
        "max_memory_allocated": 300 * MiB, "max_memory_reserved": 320 * MiB,
        "get_device_capability": (8, 6), "get_device_name": "Fake GPU",
        "synchronize": None, "empty_cache": None, "reset_peak_memory_stats": None,
    }
    for name, value in answers.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, _v=value, **k: _v)
    def set_fraction(fraction: float, device=None) -> None:
        if isinstance(device, torch.device) and device.index is None:  # as torch 2.11 does
            raise ValueError(f"Expected a torch.device with a specified index, but got:{device}")
        fractions.append(fraction)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(check, "measure_context", lambda device=None: 500 * MiB)
    real_train = lowvram.train.train
    monkeypatch.setattr(lowvram.train, "train", lambda *a, **k: real_train(*a, **{**k, "cpu": True}))
    return fractions


def test_verify_training_caps_runs_and_lifts_the_cap(fake_cuda):
    model, train = get_preset("tiny")
    r = verify.verify_training(model, train, card_gib=4.0, steps=2)
    cap = (4 * GiB - 500 * MiB) / (8 * GiB)
    assert fake_cuda == [pytest.approx(cap), 1.0]  # capped for the run, then lifted
    assert r["outcome"] == "fits" and r["error"] is None and r["steps_run"] == 2
    assert len(r["losses"]) == 2 and all(x == x for x in r["losses"])  # not NaN
    assert (r["context_bytes"], r["context_measured_bytes"]) == (500 * MiB, 500 * MiB)
    assert r["context_after_bytes"] == 600 * MiB - 100 * MiB  # used - reserved, after the run
    assert r["cap_bytes"] == int(cap * 8 * GiB) and r["card_bytes"] == 4 * GiB
    assert (r["measured_allocated_bytes"], r["measured_reserved_bytes"]) == (300 * MiB, 320 * MiB)
    predicted = memory.measure_step(model, 2, Recipe("p", "no"), gradient_accumulation_steps=2,
                                    cuda_capability=(8, 6))  # tiny: 2 x 2, accumulation modelled
    assert r["predicted_allocated_bytes"] == predicted.peak_bytes
    assert r["allocated_error"] == pytest.approx(predicted.peak_bytes / (300 * MiB) - 1)
    assert (r["micro_batch"], r["gradient_accumulation_steps"], r["precision"]) == (2, 2, "no")
    given = verify.verify_training(model, train, card_gib=1.0, context_bytes=200 * MiB)
    assert given["context_bytes"] == 200 * MiB and given["cap_bytes"] == int((824 * MiB / (8 * GiB)) * 8 * GiB)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                "allocate 2.00 GiB\nmore"),
                                   ValueError("bad data")])
def test_verify_training_lifts_the_cap_whatever_train_raises(fake_cuda, monkeypatch, error):
    import lowvram.train

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(lowvram.train, "train", fail)
    model, train = get_preset("tiny")
    if isinstance(error, ValueError):
        with pytest.raises(ValueError, match="bad data"):
            verify.verify_training(model, train)
    else:
        r = verify.verify_training(model, train)
        assert r["outcome"] == "ran out of memory" and not r["fits"] and r["steps_run"] == 0
        assert r["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert fake_cuda[-1] == 1.0 and len(fake_cuda) == 2


def test_verify_cli_prints_the_comparison(fake_cuda, capsys):
    model, train = get_preset("tiny")
    assert verify.verify_cli(model, train, Recipe("r", "no"), micro_batch=4,
                             gradient_accumulation_steps=1) == 0
    out = capsys.readouterr().out
    assert "micro-batch 4 x accumulation 1" in out
    assert "max_memory_allocated: predicted" in out and "measured 300 MiB" in out
    assert "result: fits (2 steps" in out


def test_a_plan_rows_train_command_verifies_as_printed(monkeypatch):
    seen = {}

    def capture(model_config, train_config, recipe, **kwargs):
        seen.update(model=recipe.apply(model_config), recipe=recipe, **kwargs)
        return 0

    monkeypatch.setattr(cli, "verify_cli", capture)
    train_command = ("python -m lowvram.train --preset rtx2050 --per-device-train-batch-size 16 "
                     "--gradient-accumulation-steps 1 --mixed-precision fp16 --optimizer adamw8bit "
                     "--loss-chunk-size 256 --no-tie-embeddings --gradient-checkpointing")
    argv = train_command.split()[3:]  # what follows `python -m lowvram.train`
    assert verify.main([*argv, "--card-gib", "4"]) == 0
    recipe, model = seen["recipe"], seen["model"]
    assert (recipe.precision, recipe.optimizer) == ("fp16", "adamw8bit")
    assert (model.loss_chunk_size, model.tie_embeddings, model.gradient_checkpointing) == (256, False, True)
    assert (seen["micro_batch"], seen["gradient_accumulation_steps"], seen["card_gib"]) == (16, 1, 4.0)


def test_verify_plan_runs_each_fitting_row_and_keeps_going_past_a_failing_one(monkeypatch):
    from types import SimpleNamespace

    model, train = get_preset("tiny")
    rows = [SimpleNamespace(recipe=Recipe("none fits", "no"), micro_batch=0, accumulation=0, fits=False),
            SimpleNamespace(recipe=Recipe("ok", "no"), micro_batch=4, accumulation=4, fits=True),
            SimpleNamespace(recipe=Recipe("breaks", "fp16"), micro_batch=8, accumulation=2, fits=True),
            SimpleNamespace(recipe=Recipe("off", "bf16"), micro_batch=16, accumulation=1, fits=True)]
    monkeypatch.setattr(plan_module, "plan", lambda *a, **k: rows)
    ran = []

    def fake_verify(model_config, train_config, **kwargs):
        ran.append((train_config.mixed_precision, train_config.per_device_train_batch_size,
                    train_config.gradient_accumulation_steps, kwargs["context_bytes"]))
        if train_config.mixed_precision == "fp16":
            raise RuntimeError("a kernel failed")
        return {"fits": True, "allocated_error": -0.01 if train_config.mixed_precision == "no" else 0.05}

    monkeypatch.setattr(check, "verify_training", fake_verify)
    results = verify.verify_plan(model, train, context_bytes=270 * MiB)
    assert ran == [("no", 4, 4, 270 * MiB), ("fp16", 8, 2, 270 * MiB), ("bf16", 16, 1, 270 * MiB)]
    assert [r["passed"] for r in results] == [None, True, False, False]
    assert results[0]["note"] == "the plan says it does not fit"
    assert results[2]["note"] == "failed: RuntimeError: a kernel failed"
    assert results[3]["note"] == "allocated peak off by +5.0% (tolerance 3%)"
