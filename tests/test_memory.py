"""lowvram.memory: the tracker against the real CPU allocator, each option's effect, the
simulated CUDA allocator, the planner, the tables and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from lowvram import memory
from lowvram.config import ModelConfig, get_preset
from lowvram.memory import (
    CUDA_CONTEXT_BYTES,
    GiB,
    MiB,
    Recipe,
    _CachingAllocatorSim,
    ablation,
    ablation_table,
    measure_step,
    plan,
    plan_table,
)
from lowvram.model import GPTModel

# Small enough for milliseconds, large enough that the peak is not a rounding artefact.
CFG = ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
V_C = CFG.vocab_size * CFG.n_embd  # elements in the token embedding (and in an untied lm head)


@pytest.mark.parametrize(
    ("precision", "adamw_impl", "changes"),
    [
        ("no", "foreach", {}),
        ("bf16", "foreach", {}),
        ("no", "loop", {"tie_embeddings": True, "gradient_checkpointing": True}),
        ("bf16", "fused", {"tie_embeddings": True}),
        ("no", "foreach", {"loss_chunk_size": 64, "gradient_checkpointing": True}),
        ("bf16", "fused", {"loss_chunk_size": 100}),
    ],
)
def test_tracker_peak_equals_real_cpu_allocator(precision: str, adamw_impl: str, changes: dict) -> None:
    cfg = dataclasses.replace(CFG, **changes)
    recipe = Recipe(precision=precision, adamw_impl=adamw_impl)
    real = memory.real_cpu_peaks(cfg, 4, recipe)
    assert list(real) == ["forward", "backward", "optimizer"]
    report = measure_step(cfg, 4, recipe, target="cpu")
    assert report.peak_bytes == pytest.approx(max(real.values()), rel=0.01)
    for phase in ("forward", "backward", "optimizer"):
        assert report.phase_peaks[phase] == pytest.approx(real[phase], rel=0.01)
    # Usually exact to a few bytes; what the dispatcher cannot see is scratch memory that a kernel
    # allocates inside itself (CPU flash attention's buffers, ~10 KB here under checkpointing;
    # ~150 KB, 4% of this tiny step, with bf16 and checkpointing together, so that pair is not
    # in the list).


def test_report_parts_add_up_and_count_what_they_say() -> None:
    r = measure_step(CFG, 4, target="cpu")
    n_params = GPTModel(CFG).num_parameters()
    assert r.num_parameters == n_params
    assert r.params_bytes == r.grads_bytes == 4 * n_params  # fp32 weights and gradients
    n_tensors = len(list(GPTModel(CFG).parameters()))
    assert r.optimizer_state_bytes == 8 * n_params + 4 * n_tensors  # exp_avg, exp_avg_sq, step
    assert sum(r.at_peak.values()) == r.peak_bytes
    assert r.temporaries_bytes == r.at_peak["temporaries"]
    assert sum(r.activations_detail.values()) == r.activations_bytes
    assert r.reserved_bytes == r.peak_bytes and r.overheads == {}  # the CPU has no cache model
    assert r.peak_phase in ("forward", "backward", "optimizer") and r.peak_op


def test_tie_removes_exactly_one_vocab_by_embd_matrix_everywhere() -> None:
    untied = measure_step(CFG, 4, tie_embeddings=False, target="cpu")
    tied = measure_step(CFG, 4, tie_embeddings=True, target="cpu")
    assert untied.params_bytes - tied.params_bytes == 4 * V_C
    assert untied.grads_bytes - tied.grads_bytes == 4 * V_C
    # exp_avg and exp_avg_sq of the head, plus its 4-byte step counter
    assert untied.optimizer_state_bytes - tied.optimizer_state_bytes == 2 * 4 * V_C + 4
    assert untied.num_parameters - tied.num_parameters == V_C
    # on the CUDA target the step counters live on the host: exactly the two Adam moments
    cu_untied = measure_step(CFG, 4, tie=False)  # the old spelling still works
    cu_tied = measure_step(CFG, 4, tie=True)
    assert cu_untied.optimizer_state_bytes - cu_tied.optimizer_state_bytes == 2 * 4 * V_C


def test_checkpointing_lowers_activations() -> None:
    plain = measure_step(CFG, 4)
    ckpt = measure_step(CFG, 4, gradient_checkpointing=True)
    assert ckpt.activations_detail["blocks"] < plain.activations_detail["blocks"] / 10
    assert ckpt.activations_bytes < plain.activations_bytes
    assert ckpt.params_bytes == plain.params_bytes


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_shrinks_activations_not_weights_grads_or_adam(precision: str) -> None:
    fp32 = measure_step(CFG, 4, "no", target="cpu")
    half = measure_step(CFG, 4, precision, target="cpu")
    assert half.activations_bytes < fp32.activations_bytes
    assert half.activations_detail["blocks"] < 0.65 * fp32.activations_detail["blocks"]
    # ...but it keeps 16-bit copies of the Linear weights (2 bytes each) for backward
    linear = sum(m.weight.numel() for m in GPTModel(CFG).modules() if isinstance(m, torch.nn.Linear))
    assert half.activations_detail["autocast_weight_copies"] == 2 * linear
    assert fp32.activations_detail["autocast_weight_copies"] == 0
    for part in ("params_bytes", "grads_bytes", "optimizer_state_bytes"):
        assert getattr(half, part) == getattr(fp32, part)


def test_fused_adamw_removes_the_foreach_temporary() -> None:
    foreach = measure_step(CFG, 4, adamw_impl="foreach", target="cpu")
    fused = measure_step(CFG, 4, adamw_impl="fused", target="cpu")
    # _foreach_sqrt(exp_avg_sq) makes one temporary as large as all parameters
    drop = foreach.phase_peaks["optimizer"] - fused.phase_peaks["optimizer"]
    assert drop == pytest.approx(foreach.params_bytes, rel=0.01)
    assert foreach.phase_peaks["backward"] == fused.phase_peaks["backward"]


def test_activations_grow_linearly_with_the_micro_batch() -> None:
    b4 = measure_step(CFG, 4)
    b8 = measure_step(CFG, 8)
    assert b8.activations_bytes > b4.activations_bytes
    assert b8.activations_bytes / b4.activations_bytes == pytest.approx(2.0, rel=0.01)
    assert b8.peak_bytes > b4.peak_bytes


def test_dropping_the_logits_saves_one_logits_tensor() -> None:
    kept = measure_step(CFG, 4, target="cpu")
    dropped = measure_step(CFG, 4, target="cpu", keep_logits=False)
    assert kept.peak_bytes - dropped.peak_bytes == 4 * CFG.block_size * CFG.vocab_size * 4


def test_cuda_target_models_the_cuda_autocast_loss() -> None:
    # CUDA keeps a 16-bit log_softmax and an fp32 copy for nll_loss; CPU one fp32 log_softmax
    cpu = measure_step(CFG, 4, "fp16", target="cpu")
    cuda = measure_step(CFG, 4, "fp16", target="cuda")
    logits_elements = 4 * CFG.block_size * CFG.vocab_size
    extra = cuda.activations_detail["head_and_loss"] - cpu.activations_detail["head_and_loss"]
    assert extra == pytest.approx(2 * logits_elements, rel=0.01)
    fp32_cpu = measure_step(CFG, 4, "no", target="cpu")
    fp32_cuda = measure_step(CFG, 4, "no", target="cuda")  # same path without autocast
    assert fp32_cuda.activations_detail["head_and_loss"] == pytest.approx(
        fp32_cpu.activations_detail["head_and_loss"], rel=0.01
    )


def test_cuda_target_counts_workspace_and_overheads() -> None:
    r = measure_step(CFG, 4)
    # one workspace for the main thread, one for the autograd engine's backward thread
    assert r.at_peak["cublas_workspace"] == 2 * memory.CUBLAS_WORKSPACE_BYTES == 2 * 8_519_680
    assert r.overheads["cuda_context"] == CUDA_CONTEXT_BYTES
    assert r.overheads["allocator_cache"] == r.reserved_bytes - r.peak_bytes >= 0
    assert r.total_bytes == r.reserved_bytes + CUDA_CONTEXT_BYTES
    # what a card needs: the smallest cap the run fits under, between the peak and the uncapped
    # reserved memory, plus the context
    assert r.peak_bytes <= r.capped_reserved_bytes <= r.reserved_bytes
    assert r.needed_bytes == r.capped_reserved_bytes + CUDA_CONTEXT_BYTES
    # a card of needed + the 300 MiB reserve holds it exactly (5% of < 6 GiB is under 300 MiB)
    assert memory.reserve_bytes((r.needed_bytes + 300 * MiB) / GiB) == 300 * MiB
    assert r.fits(card_gib=(r.needed_bytes + 300 * MiB) / GiB)
    assert not r.fits(card_gib=(r.needed_bytes + 300 * MiB - 1) / GiB)
    # mem_get_info's free: the context is taken already
    assert r.fits(free_bytes=r.capped_reserved_bytes + 300 * MiB)
    assert not r.fits(free_bytes=r.capped_reserved_bytes + 300 * MiB - 1)
    assert r.peak_bytes % 512 == 0  # every block is a multiple of 512 bytes
    hopper = measure_step(CFG, 4, cuda_capability=(9, 0))
    assert hopper.at_peak["cublas_workspace"] == 2 * 32 * MiB


def test_fits_judges_what_the_run_needs_under_a_cap() -> None:
    """A step whose uncapped cache passes the card still fits when, capped, the allocator's
    release of its wholly free segments keeps it under: the requests of
    test_smallest_capacity_counts_what_a_cap_would_release (62 MiB uncapped, 42 MiB capped)."""
    requests = [(1, 2 * MiB), (2, 19 * MiB), (2, -1), (3, 22 * MiB)]
    calls = []

    def made() -> list[tuple[int, int]]:
        calls.append(1)
        return requests

    r = dataclasses.replace(measure_step(CFG, 2), peak_bytes=24 * MiB, reserved_bytes=62 * MiB,
                            overheads={"allocator_cache": 38 * MiB,
                                       "cuda_context": CUDA_CONTEXT_BYTES},
                            allocator_requests=made)
    card = (300 * MiB + CUDA_CONTEXT_BYTES + 50 * MiB) / GiB  # usable: context + 50 MiB
    assert r.total_bytes > memory.usable_bytes(card)  # uncapped it would not fit...
    assert r.fits(card) and r.capped_reserved_bytes == 42 * MiB  # ...capped it does
    assert r.needed_bytes == 42 * MiB + CUDA_CONTEXT_BYTES
    assert r.margin_bytes(card) == 8 * MiB
    assert not r.fits(free_bytes=41 * MiB + 300 * MiB) and r.fits(free_bytes=42 * MiB + 300 * MiB)
    assert len(calls) == 1  # computed once, then kept
    # computed only where it decides: not where the uncapped reserved fits, nor where the
    # allocated peak alone does not
    for card_gib in (1.0, (300 * MiB + CUDA_CONTEXT_BYTES + 20 * MiB) / GiB):
        fresh = dataclasses.replace(r, allocator_requests=made)
        assert fresh.fits(card_gib) == (card_gib == 1.0)
        assert "capped_reserved_bytes" not in fresh.__dict__
    assert len(calls) == 1
    # a report without requests (made by hand): its uncapped reserved memory
    assert dataclasses.replace(r, allocator_requests=None).capped_reserved_bytes == 62 * MiB


def test_seed_config_numbers() -> None:
    """The full rtx2050 model: fp16 is nowhere near half of fp32."""
    cfg = get_preset("rtx2050")[0]
    fp32 = measure_step(cfg, 4, "no")
    fp16 = measure_step(cfg, 4, "fp16")
    V, T, C, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    assert fp32.num_parameters == 2 * V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert fp32.peak_phase == "optimizer" and fp32.peak_op == "_foreach_sqrt"
    assert 0.9 < fp16.peak_bytes / fp32.peak_bytes < 1.0
    assert fp32.fits(4.0)


def test_allocator_sim_rounds_packs_splits_and_reuses() -> None:
    sim = _CachingAllocatorSim()
    assert sim.malloc(1, 1) == 512  # rounded up to 512 B...
    assert sim.reserved == 2 * MiB  # ...inside a 2 MiB small-pool segment
    assert sim.malloc(2, 1000) == 1024
    assert sim.reserved == 2 * MiB  # packed into the same segment
    assert sim.malloc(3, 3 * MiB) == 3 * MiB and sim.reserved == 22 * MiB  # a 20 MiB segment
    # the 17 MiB left in that segment is the best fit for 12 MiB: split, nothing new reserved
    assert sim.malloc(4, 12 * MiB + 1) == 12 * MiB + 512 and sim.reserved == 22 * MiB
    # nothing cached is large enough: a new segment of the size rounded up to 2 MiB
    assert sim.malloc(5, 30 * MiB + 1) == 30 * MiB + 512 and sim.reserved == 54 * MiB
    sim.free(5)  # merges with the rest of its segment: one free 32 MiB block
    # reused; the 1 MiB left over is not split off (large pool: only when > 1 MiB): charged whole
    assert sim.malloc(6, 31 * MiB) == 32 * MiB and sim.reserved == 54 * MiB
    assert sim.allocated == 512 + 1024 + 3 * MiB + 12 * MiB + 512 + 32 * MiB


def test_allocator_sim_releases_cache_before_oom() -> None:
    sim = _CachingAllocatorSim(capacity=40 * MiB)
    sim.malloc(1, 30 * MiB)
    sim.free(1)  # 30 MiB cached
    assert sim.malloc(2, 36 * MiB) == 36 * MiB  # the cached segment is released, then it fits
    assert sim.reserved == 36 * MiB
    with pytest.raises(memory._OutOfMemory):
        sim.malloc(3, 6 * MiB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch": 0}, "micro_batch=0"),
        ({"micro_batch": 10**14}, "micro_batch=100000000000000 is not allowed"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"optimizer": "adam"}, "optimizer='adam'"),
        ({"optimizer": "fused"}, "adamw_impl='fused'"),
        ({"adamw_impl": "sgd"}, "adamw_impl='sgd'"),
        ({"loss_chunk_size": -1}, "loss_chunk_size=-1"),
        ({"target": "tpu"}, "target='tpu'"),
    ],
)
def test_measure_step_rejects_bad_options(kwargs: dict, message: str) -> None:
    args = {"micro_batch": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_step(CFG, **args)


def test_fits_rejects_a_bad_card() -> None:
    with pytest.raises(ValueError, match="card_gib=0"):
        measure_step(CFG, 2).fits(card_gib=0)


def test_headroom_is_max_of_5_percent_and_300_mib() -> None:
    assert memory.reserve_bytes(4.0) == 300 * MiB  # 5% of 4 GiB is only 205 MiB
    assert memory.reserve_bytes(16.0) == int(0.05 * 16 * GiB)
    assert memory.usable_bytes(4.0) == 4096 * MiB - 300 * MiB
    with pytest.raises(ValueError, match="card_gib=0"):
        memory.reserve_bytes(0)


def test_plan_keeps_the_exact_effective_batch() -> None:
    recipe = Recipe("fp32", tie_embeddings=False)
    big = dataclasses.replace(CFG, vocab_size=4096)  # a sequence costs MiBs: the allocator's
    # 20 MiB segments still make the total a staircase in the micro-batch

    def total(micro: int) -> int:  # what fits judges: the need under a cap, context included
        return measure_step(big, micro, recipe, gradient_accumulation_steps=2).needed_bytes

    # a card on which 5 sequences fit with accumulation (>= 2), inside the headroom, 6 not
    card_gib = (total(5) + 300 * MiB) / GiB
    assert total(4) <= total(5) < total(6) == total(8)
    (row,) = plan(big, card_gib=card_gib, target_effective_batch=16, recipes=[recipe], largest=True)
    # 5 fits but does not divide 16: the largest divisor that fits is 4, so 4 x 4 = 16
    assert (row.micro_batch, row.accumulation, row.effective_batch) == (4, 4, 16)
    assert row.report is not None and row.report.fits(card_gib) and row.report.micro_batch == 4
    assert row.report.gradient_accumulation_steps == row.gradient_accumulation_steps == 4
    assert row.largest_micro_batch == 5  # shown separately
    (odd,) = plan(big, card_gib=card_gib, target_effective_batch=15, recipes=[recipe])
    assert (odd.micro_batch, odd.accumulation) == (5, 3) and odd.largest_micro_batch is None
    # a card too small for one sequence, and one large enough for the whole target batch
    (none,) = plan(CFG, card_gib=0.01, recipes=[recipe])
    assert none.micro_batch == 0 and none.report is None and not none.fits
    (all16,) = plan(CFG, card_gib=80, target_effective_batch=16, recipes=[recipe], largest=True)
    assert (all16.micro_batch, all16.accumulation) == (16, 1)
    assert all16.largest_micro_batch == all16.largest_limit == 8 * 16  # the search's cap
    assert "| >= 128 |" in plan_table([all16])
    for bad in (0, 10**14, 2.0):
        with pytest.raises(ValueError, match="target_effective_batch="):
            plan(CFG, target_effective_batch=bad)


def test_chunked_loss_removes_the_logits_from_the_step() -> None:
    logits_elements = 4 * CFG.block_size * CFG.vocab_size
    plain = measure_step(CFG, 4, "fp16")
    chunked = measure_step(CFG, 4, "fp16", loss_chunk_size=64)
    # train() under CUDA fp16 keeps accelerate's fp32 copy of the logits, their 16-bit
    # log-softmax and nll_loss's fp32 copy: 10 bytes per logit; chunked keeps none of them
    saved = plain.activations_detail["head_and_loss"] - chunked.activations_detail["head_and_loss"]
    assert saved == pytest.approx(10 * logits_elements, rel=0.05)
    # what stays is ln_f's fp32 output (B x T x C x 4 bytes) and its statistics
    assert 4 * 4 * CFG.block_size * CFG.n_embd <= chunked.activations_detail["head_and_loss"] < 0.1 * plain.activations_detail["head_and_loss"]
    assert chunked.peak_bytes < plain.peak_bytes
    assert chunked.loss_chunk_size == 64 and chunked.to_dict()["loss_chunk_size"] == 64


def test_8bit_adamw_keeps_about_2_bytes_of_state_per_parameter() -> None:
    model = GPTModel(CFG)
    r = measure_step(CFG, 4, optimizer="adamw8bit", target="cpu")
    big = [p.numel() for p in model.parameters() if p.numel() >= 4096]
    small = [p.numel() for p in model.parameters() if p.numel() < 4096]
    expected = sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in big) + 8 * sum(small) + 2 * 256 * 4
    assert r.optimizer_state_bytes == expected
    adamw = measure_step(CFG, 4, target="cpu")
    assert r.optimizer_state_bytes < 0.3 * adamw.optimizer_state_bytes
    assert r.params_bytes == adamw.params_bytes and r.grads_bytes == adamw.grads_bytes


def test_ablation_rows_and_tables() -> None:
    rows = ablation(CFG, micro_batch=4)
    assert rows[0].name.startswith("lesson baseline") and rows[0].peak_change == 0
    assert rows[0].report.precision == "no" and rows[0].report.adamw_impl == "foreach"
    assert not rows[0].report.tie_embeddings and not rows[0].report.gradient_checkpointing
    for prev, row in zip(rows, rows[1:], strict=False):
        assert row.peak_change == row.report.peak_bytes - prev.report.peak_bytes
    best = rows[-1].report
    assert best.tie_embeddings and best.gradient_checkpointing and best.optimizer == "adamw8bit"
    assert best.loss_chunk_size == 256
    assert best.peak_bytes < rows[0].report.peak_bytes
    en = ablation_table(rows, card_gib=4.0)
    assert en.splitlines()[0] == ("| Step | Peak (MiB) | Change (MiB) | Change (%) | Needed, capped "
                                  "(MiB) | Total, uncapped (MiB) | Fits 4 GiB |")
    assert len(en.splitlines()) == 2 + len(rows)
    az = ablation_table(rows, card_gib=4.0, lang="az")
    assert "Dəyişiklik (MiB)" in az and "bəli" in az
    table = plan_table(plan(CFG, card_gib=1.0, target_effective_batch=8), lang="az")
    assert table.splitlines()[0].startswith("| Resept | Mikro-batch | Yığım addımları |")
    with pytest.raises(ValueError, match="lang='fr'"):
        plan_table([], lang="fr")


def test_plot_budget_stacks_every_part_under_the_card_line() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [measure_step(CFG, 4, "no"), measure_step(CFG, 4, "fp16")]
    fig = memory.plot_budget(reports, ["fp32", "fp16"], card_gib=0.5, lang="az")
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Adam vəziyyəti" in legend and "aktivasiyalar (pik anında)" in legend
    assert ax.get_title().startswith("Pik anında canlı olanlar")
    tops = [0.0, 0.0]
    for container in ax.containers:
        for i, bar in enumerate(container):
            tops[i] = max(tops[i], bar.get_y() + bar.get_height())
    for top, r in zip(tops, reports, strict=True):
        assert top == pytest.approx(r.total_bytes / MiB)
    assert ax.lines[0].get_ydata()[0] == pytest.approx(512)
    plt.close("all")


def test_cli_json_has_the_peak_every_part_and_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--preset", "tiny", "--micro-batch", "2", "--precision", "bf16",
                        "--tie-embeddings", "--gradient-checkpointing", "--adamw-impl", "fused",
                        "--loss-chunk-size", "8", "--card-gib", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("peak_bytes", "params_bytes", "grads_bytes", "optimizer_state_bytes",
                "activations_bytes", "temporaries_bytes", "reserved_bytes", "total_bytes",
                "capped_reserved_bytes", "needed_bytes"):
        assert isinstance(out[key], int) and out[key] > 0, key
    assert out["fits"] is True
    assert (out["precision"], out["adamw_impl"], out["tie_embeddings"],
            out["gradient_checkpointing"], out["loss_chunk_size"]) == ("bf16", "fused", True, True, 8)
    assert out["usable_bytes"] == 3796 * MiB
    expected = measure_step(get_preset("tiny")[0], 2, Recipe(
        precision="bf16", adamw_impl="fused", tie_embeddings=True, gradient_checkpointing=True,
        loss_chunk_size=8), gradient_accumulation_steps=2)  # the preset's accumulation
    assert out["peak_bytes"] == expected.peak_bytes


def test_cli_precision_follows_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--preset", "rtx2050", "--micro-batch", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["precision"], out["optimizer"]) == ("fp16", "adamw")  # the seed's fp16
    assert memory.main(["--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "no"


def test_cli_runs_as_a_module_and_explains_itself() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lowvram.memory", "--preset", "tiny", "--card-gib", "0.25"],
        capture_output=True, text=True, check=True,
    )
    assert "peak" in proc.stdout and "does NOT fit in 0.25 GiB" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_verify_gpu_without_cuda_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--preset", "tiny", "--verify-gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--preset", "gpt5"], "preset='gpt5' is unknown"),
        (["--preset", "tiny", "--micro-batch", "0"], "--micro-batch 0 is not allowed"),
        (["--preset", "tiny", "--micro-batch", "100000000000000"],
         "--micro-batch 100000000000000 is not allowed: give a number of sequences in [1, 65536]"),
        (["--preset", "tiny", "--card-gib", "-1"], "--card-gib -1 is not allowed"),
        (["--preset", "tiny", "--card-gib", "1e300"], "--card-gib 1e+300 is not allowed"),
        (["--preset", "tiny", "--loss-chunk-size", "-3"], "--loss-chunk-size -3 is not allowed"),
    ):
        with pytest.raises(SystemExit):
            memory.main(argv)
        assert message in capsys.readouterr().err


def test_real_cpu_peaks_keeps_the_profilers_fd_messages_off_stderr() -> None:
    # kineto writes "profiler_start"/"profiler_stop" to fd 2 itself; a notebook shows them
    code = (
        "from lowvram.config import get_preset\n"
        "from lowvram.memory import real_cpu_peaks\n"
        "import sys\n"
        "peaks = real_cpu_peaks(get_preset('tiny')[0], 2)\n"
        "print(sorted(peaks))\n"
        "print('stderr still works', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['backward', 'forward', 'optimizer']"
    assert "profiler_st" not in proc.stderr
    assert "stderr still works" in proc.stderr  # fd 2 is given back


# --------------------------------------------------------------------------- accumulation

DEMO = get_preset("cpu-demo")[0]
# the lesson's rtx2050 width (768, 12 heads) with 2 layers, block 64 and a small vocabulary:
# each layer's terms are the rtx2050's own, at a few seconds of real arithmetic on 2 cores
RTX_SHAPE = dataclasses.replace(get_preset("rtx2050")[0], vocab_size=2048, n_layer=2, block_size=64)


@pytest.mark.parametrize(
    ("cfg", "micro", "precision", "accumulation"),
    [
        (CFG, 4, "no", 2),
        (CFG, 4, "bf16", 4),
        (DEMO, 2, "no", 1),
        (DEMO, 2, "no", 2),
        (DEMO, 2, "bf16", 2),
        (DEMO, 2, "no", 4),
        (RTX_SHAPE, 1, "no", 2),
    ],
)
def test_accumulation_peak_equals_real_cpu_allocator(cfg, micro, precision, accumulation) -> None:
    recipe = Recipe(precision=precision, adamw_impl="loop")  # CPU's AdamW
    real = memory.real_cpu_peaks(cfg, micro, recipe, gradient_accumulation_steps=accumulation)
    report = measure_step(cfg, micro, recipe, gradient_accumulation_steps=accumulation, target="cpu")
    assert report.gradient_accumulation_steps == accumulation
    assert report.peak_bytes == pytest.approx(max(real.values()), rel=0.01)
    for phase in ("forward", "backward", "optimizer"):
        assert report.phase_peaks[phase] == pytest.approx(real[phase], rel=0.01)


def test_accumulation_keeps_the_gradients_alive_in_backward() -> None:
    one = measure_step(DEMO, 4, target="cpu")
    two = measure_step(DEMO, 4, target="cpu", gradient_accumulation_steps=2)
    four = measure_step(DEMO, 4, target="cpu", gradient_accumulation_steps=4)
    assert four.peak_bytes == two.peak_bytes > one.peak_bytes
    assert four.gradient_accumulation_steps == 4 and four.to_dict()["gradient_accumulation_steps"] == 4
    # the 2nd micro-batch's backward runs with every gradient alive: up to their whole size more
    assert two.phase_peaks["backward"] - one.phase_peaks["backward"] == pytest.approx(
        two.grads_bytes, rel=0.1)
    assert two.at_peak["grads"] == two.grads_bytes and two.peak_phase in ("forward", "backward")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0 is not allowed"):
        measure_step(DEMO, 4, gradient_accumulation_steps=0)


def test_autocast_logits_are_accelerates_fp32_copy() -> None:
    # train() holds `logits, loss` from the model that accelerate wrapped: fp32 logits
    bf16 = measure_step(CFG, 4, "bf16", target="cpu")
    fp32 = measure_step(CFG, 4, "no", target="cpu")
    logits = 4 * CFG.block_size * CFG.vocab_size * 4
    assert bf16.activations_detail["head_and_loss"] >= logits
    assert fp32.activations_detail["head_and_loss"] >= logits


def _train_step_peak(model_cfg: ModelConfig, micro: int, accumulation: int, precision: str,
                     tmp_path) -> int:
    """The CPU allocator's peak over a steady optimizer step of the real train(): from its 2nd
    optimizer step's clipping to its 3rd's, above what was live before train() started."""
    import torch._C._profiler as _prof
    from torch.profiler import ProfilerActivity, profile, record_function

    from lowvram.config import TrainConfig
    from lowvram.data import random_rows
    from lowvram.memory.real import _phase_peaks
    from lowvram.train import train

    calls: list[record_function] = []

    def hook(model: torch.nn.Module) -> None:
        calls.append(record_function("lowvram.measured:step"))
        if len(calls) == 2:
            calls[-1].__enter__()
        if len(calls) == 3:
            calls[1].__exit__(None, None, None)

    train_cfg = TrainConfig(
        mixed_precision=precision, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, per_device_eval_batch_size=micro,
        eval_max_batches=1, max_steps=3, eval_interval=0, checkpoint_interval=0,
        output_dir=str(tmp_path / "run"),
    )
    rows = random_rows(model_cfg, 8 * micro * accumulation)
    train_rows, val_rows = rows[: 6 * micro * accumulation], rows[6 * micro * accumulation:]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train(model_cfg, train_cfg, train_data=train_rows, val_data=val_rows, progress=False,
              cpu=True, on_optimizer_step=hook)
    return _phase_peaks(prof, _prof)["step"]


@pytest.mark.parametrize(("precision", "accumulation"), [("no", 2), ("bf16", 2), ("no", 1)])
def test_prediction_equals_the_real_train_on_cpu(precision: str, accumulation: int, tmp_path) -> None:
    """The planner against train() itself (accelerate, its fp32 outputs, the accumulation)."""
    real = _train_step_peak(DEMO, 4, accumulation, precision, tmp_path)
    report = measure_step(DEMO, 4, Recipe(precision=precision, adamw_impl="loop"),
                          gradient_accumulation_steps=accumulation, target="cpu")
    assert report.peak_bytes == pytest.approx(real, rel=0.01)


# --------------------------------------------------------------------------- train commands


def test_plan_rows_give_their_train_command() -> None:
    model_cfg = get_preset("tiny")[0]
    recipes = [
        Recipe("fp16", "fp16"),
        Recipe("lean", "fp16", "adamw8bit", tie_embeddings=True, gradient_checkpointing=True,
               loss_chunk_size=8),
        Recipe("fused", "bf16", adamw_impl="fused"),
    ]
    rows = plan(model_cfg, card_gib=4.0, target_effective_batch=8, recipes=recipes)
    assert [(r.micro_batch, r.gradient_accumulation_steps) for r in rows] == [(8, 1)] * 3
    assert rows[0].train_command("tiny") == (
        "python -m lowvram.train --preset tiny --per-device-train-batch-size 8 "
        "--gradient-accumulation-steps 1 --mixed-precision fp16")
    assert rows[1].train_command("tiny") == (
        "python -m lowvram.train --preset tiny --per-device-train-batch-size 8 "
        "--gradient-accumulation-steps 1 --mixed-precision fp16 --optimizer adamw8bit "
        "--loss-chunk-size 8 --tie-embeddings --gradient-checkpointing")
    assert rows[2].train_command("tiny").endswith("--mixed-precision bf16 --adamw-impl fused")
    table = plan_table(rows, preset="tiny")
    assert "| Train command |" in table.splitlines()[0] and "`python -m lowvram.train" in table
    with pytest.raises(ValueError, match="planned for another model than preset 'rtx2050'"):
        rows[0].train_command("rtx2050")
    with pytest.raises(ValueError, match="no step that fits"):
        memory.PlanRow(recipes[0], 0, 0, 0, None).train_command("tiny")


def test_cli_speaks_the_train_vocabulary(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--preset", "tiny", "--per-device-train-batch-size", "2",
                        "--gradient-accumulation-steps", "3", "--mixed-precision", "bf16",
                        "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["micro_batch"], out["gradient_accumulation_steps"], out["precision"]) == (2, 3, "bf16")
    assert memory.main(["--preset", "tiny", "--json"]) == 0  # the preset's accumulation: 2
    assert json.loads(capsys.readouterr().out)["gradient_accumulation_steps"] == 2
    with pytest.raises(SystemExit):
        memory.main(["--preset", "tiny", "--gradient-accumulation-steps", "0"])
    assert "--gradient-accumulation-steps 0 is not allowed" in capsys.readouterr().err


def test_the_package_imports_one_way() -> None:
    """Each module of lowvram/memory/ imports only the layers below it (no import cycle)."""
    import ast
    from pathlib import Path

    order = ["_allocator", "report", "replay", "_diskcache", "tracker", "depth", "measure", "plan",
             "_plan_worker", "show", "real", "cli"]
    package = Path(memory.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowvram.memory"):
                imported = node.module.split(".")[2] if node.module.count(".") >= 2 else "__init__"
                assert imported in order[:i], f"{name} imports {node.module}"
