"""lowvram.train: the corrected Day-25 loop, on the tiny preset, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import accelerate
import pytest
import torch
import tqdm
import transformers
from conftest import MODEL, REPO, TRAIN, free_port, max_diff, rows, run, weights, write_data

import lowvram
from lowvram.config import get_preset
from lowvram.failures import NonFiniteLossError
from lowvram.model import GPTModel
from lowvram.train import (
    count_optimizer_steps,
    force_grad_scaler,
    lr_schedule,
    main,
    reset_accelerate_state,
    schedule_steps,
    train,
)

# ----------------------------------------------------------------------------- steps of a run


@pytest.mark.parametrize("n_train", [16, 18])  # 8 and 9 batches: divisible by accum 2, and not
def test_steps_and_schedule_of_a_run(tmp_path, n_train):
    history = run(tmp_path / "run", n_train=n_train, num_epochs=2, warmup_ratio=0.2)
    batches = n_train // TRAIN.per_device_train_batch_size
    expected = count_optimizer_steps(batches, 2, 2)
    assert expected == {16: 8, 18: 10}[n_train]
    assert len(history["steps"]) == history["total_steps"] == expected
    warmup, total = history["warmup_steps"], history["total_steps"]
    assert (warmup, total) == schedule_steps(batches, 2, 2, warmup_ratio=0.2)
    lrs = [s["lr"] for s in history["steps"]]
    assert lrs == pytest.approx(lr_schedule(warmup, total, TRAIN.max_lr), abs=1e-12)
    assert lrs[0] == 0.0 and min(lrs[1:]) > 0  # only the first warmup step runs at LR 0
    assert lrs[-1] == pytest.approx(TRAIN.max_lr / (total - warmup))  # no leftover steps
    assert history["final_lr"] == 0.0  # ends fully decayed
    assert [s["step"] for s in history["steps"]] == list(range(1, total + 1))
    assert history["steps"][-1]["tokens"] == 2 * batches * 2 * MODEL.block_size


# ----------------------------------------------------------------------------- the loop


def test_gradient_accumulation_equals_big_batch(tmp_path):
    grads = {"micro": [], "big": []}

    def hook(name):
        def collect(model):
            grads[name].append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())

        return collect

    common = dict(n_train=64, warmup_ratio=0.0)
    micro = train(
        MODEL,
        TRAIN.replace(output_dir=str(tmp_path / "micro"), per_device_train_batch_size=4,
                      gradient_accumulation_steps=4),
        train_data=rows(common["n_train"]), val_data=rows(8, seed=1), progress=False,
        on_optimizer_step=hook("micro"),
    )
    big = train(
        MODEL,
        TRAIN.replace(output_dir=str(tmp_path / "big"), per_device_train_batch_size=16,
                      gradient_accumulation_steps=1),
        train_data=rows(common["n_train"]), val_data=rows(8, seed=1), progress=False,
        on_optimizer_step=hook("big"),
    )
    assert MODEL.dropout == 0.0
    assert len(grads["micro"]) == len(grads["big"]) == 4  # 64 rows / 16 per step
    for g_micro, g_big in zip(grads["micro"], grads["big"], strict=True):
        assert ((g_micro - g_big).norm() / g_big.norm()).item() <= 1e-5
    losses = [(a["loss"], b["loss"]) for a, b in zip(micro["steps"], big["steps"], strict=True)]
    assert [a for a, _ in losses] == pytest.approx([b for _, b in losses], rel=1e-6)
    assert max_diff(weights(tmp_path / "micro"), weights(tmp_path / "big")) <= 1e-5


def test_seed_loop_with_grad_scaler_raises():
    """The seed's loop, verbatim, with fp16's GradScaler: clipping every micro-step fails."""
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=2)
        force_grad_scaler(accelerator)
        torch.manual_seed(0)
        model = GPTModel(MODEL)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows(8)), batch_size=2)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
            for micro_step, batch in enumerate(loader):  # noqa: B007 (read after the loop)
                X, Y = batch[0][:, :-1], batch[0][:, 1:]
                with accelerator.accumulate(model):
                    logits, loss = model(X, Y)
                    accelerator.backward(loss)
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
        assert micro_step == 1  # the 2nd micro-step
    finally:
        reset_accelerate_state()


def test_loop_with_grad_scaler_runs(tmp_path):
    history = run(tmp_path / "fp16", num_epochs=2, fp16=True)
    assert history["precision"] == "fp16"
    assert len(history["steps"]) == 16
    assert all(math.isfinite(s["loss"]) for s in history["steps"])
    assert [s["loss_scale"] for s in history["steps"]] == [2.0**16] * 16  # no overflow here
    assert history["skipped_steps"] == 0 and history["final_lr"] == 0.0


def test_grad_scaler_overflow_is_counted(tmp_path, monkeypatch):
    # a first loss scale of 2**30 overflows fp16: GradScaler skips the step and halves the scale
    history = run(tmp_path / "fp16", num_epochs=2, warmup_ratio=0.2, fp16=True, init_scale=2.0**30)
    steps = history["steps"]
    skipped = [s["skipped"] for s in steps]
    assert skipped[0] and history["skipped_steps"] == sum(skipped) > 0
    for prev, cur in zip(steps, steps[1:], strict=False):
        assert cur["loss_scale"] == (prev["loss_scale"] / 2 if prev["skipped"] else prev["loss_scale"])
    # accelerate does not advance the schedule on a skipped step (as the HF Trainer does not):
    # each skip delays the schedule by one step, so such a run ends short of LR 0
    schedule = lr_schedule(history["warmup_steps"], history["total_steps"], TRAIN.max_lr)
    expected = [schedule[i - sum(skipped[:i])] for i in range(len(steps))]
    assert [s["lr"] for s in steps] == pytest.approx(expected, abs=1e-12)
    assert history["final_lr"] == pytest.approx(schedule[len(steps) - history["skipped_steps"]])


def test_history_file_and_final_weights(tmp_path):
    history = run(tmp_path / "run", eval_interval=3)
    on_disk = json.loads((tmp_path / "run" / "history.json").read_text())
    assert on_disk == json.loads(json.dumps(history))
    assert history["num_processes"] == 1
    assert history["effective_batch_size"] == 4
    assert history["config"]["model"]["vocab_size"] == 96
    # validation at step 0, every eval_interval steps, and at the end (8 steps)
    assert [v["step"] for v in history["val"]] == [0, 3, 6, 8]
    assert history["val"][0]["loss"] == pytest.approx(math.log(MODEL.vocab_size), abs=0.1)
    # the saved weights reproduce the final validation loss
    model = GPTModel(MODEL)
    model.load_state_dict(weights(tmp_path / "run"))
    model.eval()
    val = rows(8, seed=1)
    with torch.no_grad():
        _, loss = model(val[:, :-1], val[:, 1:])
    assert loss.item() == pytest.approx(history["final_val_loss"], rel=1e-5)


def test_eval_max_batches_caps_validation(tmp_path):
    history = run(tmp_path / "run", eval_max_batches=1, max_steps=1)
    val = rows(8, seed=1)[: TRAIN.per_device_eval_batch_size]  # 1 batch of 4 rows
    model = GPTModel(MODEL)
    model.load_state_dict(weights(tmp_path / "run"))
    with torch.no_grad():
        _, loss = model.eval()(val[:, :-1], val[:, 1:])
    assert loss.item() == pytest.approx(history["final_val_loss"], rel=1e-5)


def test_checkpoints_and_resume(tmp_path):
    full = run(tmp_path / "full", num_epochs=2, checkpoint_interval=3, keep_checkpoints=3)
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    # saved at 3, 6, 8 (epoch end), 9, 12, 15, 16 (the end); the newest 3 are kept
    assert ckpts == ["step_000012", "step_000015", "step_000016"]
    state = json.loads((tmp_path / "full/checkpoints/step_000012/loop_state.json").read_text())
    assert state["loop"] == {"step": 12, "epoch": 1, "batches_in_epoch": 8, "tokens": 12 * 64}

    resumed = train(
        MODEL,
        TRAIN.replace(output_dir=str(tmp_path / "resumed"), num_epochs=2),
        train_data=rows(32),
        val_data=rows(8, seed=1),
        progress=False,
        resume_from=tmp_path / "full/checkpoints/step_000012",
    )
    assert [s["step"] for s in resumed["steps"]] == list(range(1, 17))
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx(
        [s["loss"] for s in full["steps"]], abs=1e-6
    )
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "resumed")) == 0.0  # bitwise


def test_resume_errors(tmp_path):
    run(tmp_path / "run", max_steps=2, checkpoint_interval=2)
    with pytest.raises(FileNotFoundError, match="does not exist .* not a lowvram checkpoint"):
        run(tmp_path / "again", resume_from=tmp_path / "nowhere")
    other = dataclasses.replace(MODEL, n_layer=1)
    with pytest.raises(ValueError, match="same model config"):
        train(
            other,
            TRAIN.replace(output_dir=str(tmp_path / "other")),
            train_data=rows(32),
            val_data=rows(8, seed=1),
            progress=False,
            resume_from=tmp_path / "run/checkpoints/step_000002",
        )


def test_train_data_errors(tmp_path):
    with pytest.raises(ValueError, match="pass both train_data and val_data"):
        train(MODEL, TRAIN.replace(output_dir=str(tmp_path)), train_data=rows(8), progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        run(tmp_path / "run", n_train=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cpu=False but no CUDA GPU"):
            train(MODEL, TRAIN, train_data=rows(8), val_data=rows(8), cpu=False)
    with pytest.raises(ValueError, match=r"val_data holds an empty tensor \(shape \[0, 17\]\)"):
        train(MODEL, TRAIN.replace(output_dir=str(tmp_path)), train_data=rows(8),
              val_data=rows(8)[:0], progress=False)


def test_progress_bar_on_main_process(tmp_path, capsys):
    run(tmp_path / "quiet", max_steps=2)
    assert "train:" not in capsys.readouterr().err
    tc = TRAIN.replace(output_dir=str(tmp_path / "bar"), max_steps=2)
    train(MODEL, tc, train_data=rows(32), val_data=rows(8, seed=1))
    assert "train: 100%" in capsys.readouterr().err


def test_a_nan_is_seen_at_the_next_read_and_never_saved(tmp_path, monkeypatch):
    """The step records are read at log steps (here every 4th) and before each save (every
    3rd): a NaN loss at step 5 stops the run at step 6's save, before it, naming step 5."""
    real_forward, forwards = GPTModel.forward, []

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            forwards.append(1)
            if len(forwards) >= 9:  # step 5's micro-batches are the 9th and 10th
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTModel, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="stopped at optimizer step 5 .*the loss is nan"):
        run(out, max_steps=8, log_interval=4, checkpoint_interval=3)
    assert len(forwards) == 6 * 2  # it ran on to step 6, the next read
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003"]
    history = json.loads((out / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2, 3, 4]
    assert history["error"]["step"] == 5


# ----------------------------------------------------------------------------- precision


def test_fp16_on_cpu_warns_and_reports_what_ran(tmp_path):
    with pytest.warns(UserWarning, match="running fp32"):
        history = run(tmp_path / "run", mixed_precision="fp16", max_steps=2)
    assert history["precision"] == "no"
    assert "fp16 was requested" in history["precision_reason"]
    assert history["config"]["train"]["mixed_precision"] == "fp16"  # what was asked
    assert all(s["loss_scale"] is None for s in history["steps"])


def test_bf16_on_cpu_runs(tmp_path):
    history = run(tmp_path / "run", mixed_precision="bf16", max_steps=2)
    assert history["precision"] == "bf16"
    # bf16 autocast: close to, but not exactly, the fp32 loss
    fp32 = run(tmp_path / "fp32", max_steps=2)
    assert history["steps"][0]["loss"] == pytest.approx(fp32["steps"][0]["loss"], abs=0.05)
    assert history["steps"][0]["loss"] != fp32["steps"][0]["loss"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_fp16_on_cuda_uses_a_grad_scaler(tmp_path):
    history = run(tmp_path / "fp16", mixed_precision="fp16", num_epochs=2)
    assert history["precision"] == "fp16"
    assert len(history["steps"]) == 16  # accum 2: clipping on sync only, no unscale_ error
    assert all(s["loss_scale"] is not None and s["loss_scale"] > 0 for s in history["steps"])
    assert all(math.isfinite(s["loss"]) for s in history["steps"])


@pytest.mark.gpu
@needs_cuda
def test_bf16_on_cuda(tmp_path):
    if not torch.cuda.is_bf16_supported():
        with pytest.warns(UserWarning, match="does not support it"):
            assert run(tmp_path / "bf16", mixed_precision="bf16", max_steps=2)["precision"] == "fp16"
        return
    history = run(tmp_path / "bf16", mixed_precision="bf16", max_steps=2)
    assert history["precision"] == "bf16"
    assert history["steps"][0]["loss_scale"] is None


# ----------------------------------------------------------------------------- command line


def test_main(tmp_path):
    write_data(tmp_path / "data", 32)
    out = tmp_path / "out"
    main(["--preset", "tiny", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
          "--max-steps", "3", "--gradient-accumulation-steps", "1", "--checkpoint-every", "2",
          "--seed", "7", "--no-progress"])
    history = json.loads((out / "history.json").read_text())
    assert len(history["steps"]) == 3
    assert history["config"]["train"]["seed"] == 7
    assert history["effective_batch_size"] == 2
    assert (out / "checkpoints" / "step_000002").is_dir()
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--max-steps", "0"])


# ----------------------------------------------------------------------------- recipe options


def _cli_configs(monkeypatch, *options: str):
    """The (ModelConfig, TrainConfig) that ``main`` hands to ``train`` for ``options``."""
    import lowvram.train as T

    got = {}
    monkeypatch.setattr(T, "train", lambda m, t, **kw: got.update(model=m, train=t) or {})
    T.main(["--preset", "tiny", "--no-progress", *options])
    return got["model"], got["train"]


def test_cli_speaks_the_planners_recipe_vocabulary(monkeypatch):
    """Every recipe option of the memory planner reaches the config field of its name, and
    from there the built model and optimizer; options not given keep the preset's values."""
    from lowvram.optim import build_optimizer

    assert _cli_configs(monkeypatch) == get_preset("tiny")
    model_cfg, train_cfg = _cli_configs(
        monkeypatch, "--tie-embeddings", "--gradient-checkpointing", "--loss-chunk-size", "8",
        "--adamw-impl", "fused", "--per-device-train-batch-size", "3",
        "--gradient-accumulation-steps", "1", "--mixed-precision", "bf16")  # fmt: skip
    assert model_cfg == dataclasses.replace(MODEL, tie_embeddings=True,
                                            gradient_checkpointing=True, loss_chunk_size=8)
    assert train_cfg == TRAIN.replace(adamw_impl="fused", per_device_train_batch_size=3,
                                      gradient_accumulation_steps=1, mixed_precision="bf16")
    model = GPTModel(model_cfg)
    assert model.lm_head.weight is model.wte.weight  # tied
    assert (model.config.gradient_checkpointing, model.config.loss_chunk_size) == (True, 8)
    assert build_optimizer(model.parameters(), train_cfg).defaults["fused"] is True
    _, train_cfg = _cli_configs(monkeypatch, "--optimizer", "adamw8bit")
    assert (train_cfg.optimizer, train_cfg.adamw_impl) == ("adamw8bit", None)
    model_cfg, _ = _cli_configs(monkeypatch, "--no-tie-embeddings", "--no-gradient-checkpointing")
    assert (model_cfg.tie_embeddings, model_cfg.gradient_checkpointing) == (False, False)


def test_every_plan_row_runs_as_printed(monkeypatch):
    """The planner's rows print their train command (issue 18, item 7): each parses here into
    exactly the step the row measured (model, micro-batch, accumulation, precision, optimizer)."""
    import shlex

    from lowvram import memory

    if not hasattr(memory.PlanRow, "train_command"):
        pytest.skip("the planner prints no train command yet (its branch is merged separately)")
    for row in memory.plan(MODEL, card_gib=4.0, target_effective_batch=4):
        argv = shlex.split(row.train_command("tiny"))
        assert argv[:4] == ["python", "-m", "lowvram.train", "--preset"]
        model_cfg, train_cfg = _cli_configs(monkeypatch, *argv[5:])
        recipe = row.recipe
        assert model_cfg == row.report.model_config, recipe.name
        assert (train_cfg.per_device_train_batch_size, train_cfg.gradient_accumulation_steps,
                train_cfg.mixed_precision, train_cfg.optimizer) == (
            row.micro_batch, row.gradient_accumulation_steps, recipe.precision, recipe.optimizer)
        if recipe.optimizer == "adamw":  # foreach is torch's default on CUDA, the planner's target
            assert train_cfg.adamw_impl in (recipe.adamw_impl, None), recipe.name


@pytest.mark.parametrize(("options", "message"), [
    (["--loss-chunk-size", "-1"], "argument --loss-chunk-size: loss_chunk_size=-1 is not allowed"),
    (["--optimizer", "adamw8bit", "--adamw-impl", "fused"],
     "argument --adamw-impl: adamw_impl='fused' is not allowed: adamw_impl must be None (unset) "
     "with optimizer='adamw8bit'"),
    (["--per-device-train-batch-size", "0"],
     "argument --per-device-train-batch-size: per_device_train_batch_size=0 is not allowed"),
    (["--checkpoint-every", "-2"], "argument --checkpoint-every: checkpoint_interval=-2"),
    (["--adamw-impl", "fast"], "argument --adamw-impl: invalid choice: 'fast'"),  # argparse's
])  # fmt: skip
def test_cli_errors_name_the_option(monkeypatch, capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        _cli_configs(monkeypatch, *options)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"), max_steps=3)


@pytest.mark.parametrize(("model_changes", "train_changes"), [
    ({"gradient_checkpointing": True}, {}),
    ({"loss_chunk_size": 8}, {}),  # 2 x 16 tokens per micro-batch: 4 chunks
    ({}, {"adamw_impl": "foreach"}),
    ({}, {"adamw_impl": "fused"}),
    ({}, {"adamw_impl": "loop"}),
])  # fmt: skip
def test_train_runs_each_recipe_and_computes_the_same_run(tmp_path, plain_run, model_changes,
                                                          train_changes):
    """These recipes change where memory goes, not the arithmetic: the same losses as the plain
    run (to rounding; the CPU's default AdamW kernel is the loop, so "loop" is bitwise)."""
    model_cfg = dataclasses.replace(MODEL, **model_changes)
    history = run(tmp_path / "run", model=model_cfg, max_steps=3, **train_changes)
    recorded = {**history["config"]["model"], **history["config"]["train"]}
    assert {**model_changes, **train_changes}.items() <= recorded.items()
    losses = [s["loss"] for s in history["steps"]]
    assert losses == pytest.approx([s["loss"] for s in plain_run["steps"]], abs=1e-5)
    if train_changes == {"adamw_impl": "loop"}:
        assert losses == [s["loss"] for s in plain_run["steps"]]


def test_train_runs_tied_and_fused_under_fp16s_grad_scaler(tmp_path):
    """A tied model is another model (fewer parameters, other losses); fused AdamW under fp16
    takes the GradScaler's scale and inf check itself (on the CPU too, forced as on the card)."""
    tied = run(tmp_path / "tied", model=dataclasses.replace(MODEL, tie_embeddings=True),
               max_steps=3, adamw_impl="fused", fp16=True)
    assert tied["config"]["model"]["tie_embeddings"] and tied["precision"] == "fp16"
    assert all(math.isfinite(s["loss"]) and s["loss_scale"] for s in tied["steps"])
    # one matrix serves both ends: the saved weights are vocab x n_embd fewer than untied
    saved = sum(t.numel() for t in weights(tmp_path / "tied").values())
    plain = sum(p.numel() for p in GPTModel(MODEL).state_dict().values())
    assert saved == plain - MODEL.vocab_size * MODEL.n_embd


def test_main_trains_a_recipe_as_the_planner_prints_it(tmp_path):
    write_data(tmp_path / "data", 32)
    out = tmp_path / "out"
    main(["--preset", "tiny", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
          "--max-steps", "2", "--per-device-train-batch-size", "4",
          "--gradient-accumulation-steps", "1", "--loss-chunk-size", "16",
          "--gradient-checkpointing", "--adamw-impl", "fused", "--no-progress"])  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert len(history["steps"]) == 2 and history["effective_batch_size"] == 4
    assert history["config"]["model"]["loss_chunk_size"] == 16
    assert history["config"]["model"]["gradient_checkpointing"] is True
    assert history["config"]["train"]["adamw_impl"] == "fused"


@pytest.mark.gpu
@needs_cuda
def test_every_adamw_kernel_trains_on_cuda_under_fp16(tmp_path):
    """On CUDA None is torch's foreach; fused takes the GradScaler's scale and inf check inside
    its kernel. All are the same AdamW: the same losses to fp16 rounding."""
    losses = {}
    for impl in (None, "foreach", "fused", "loop"):
        history = run(tmp_path / str(impl), mixed_precision="fp16", max_steps=4, adamw_impl=impl)
        assert history["precision"] == "fp16" and history["skipped_steps"] == 0
        assert all(s["loss_scale"] for s in history["steps"])
        losses[impl] = [s["loss"] for s in history["steps"]]
    for impl in (None, "fused", "loop"):  # (attention's backward may use atomics: not bitwise)
        assert losses[impl] == pytest.approx(losses["foreach"], rel=1e-3), impl


def test_resume_with_another_adamw_kernel_is_allowed(tmp_path):
    """The kernels share the optimizer state, so a run may continue with another one: the
    result equals the uninterrupted run to rounding, and the new checkpoints record the new
    kernel."""
    full = run(tmp_path / "full", max_steps=4, checkpoint_interval=2, adamw_impl="fused")
    resumed = run(tmp_path / "resumed", max_steps=4, adamw_impl="loop",
                  resume_from=tmp_path / "full/checkpoints/step_000002")
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx(
        [s["loss"] for s in full["steps"]], abs=1e-5)
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "resumed")) < 1e-5
    assert resumed["config"]["train"]["adamw_impl"] == "loop"
    manifest = json.loads((tmp_path / "resumed/checkpoints/step_000004/manifest.json").read_text())
    assert manifest["train"]["adamw_impl"] == "loop"


# ----------------------------------------------------------------------------- two processes


def reference_one_process(tmp_path: Path, n_train: int) -> dict:
    """1 process x batch 2 x accum 4: the run two processes x accum 2 must reproduce."""
    return run(tmp_path / "one", n_train=n_train, gradient_accumulation_steps=4, num_epochs=2)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # let accelerate give each CPU process its share
    return env


@pytest.mark.slow
def test_two_processes_equal_one_notebook_launcher(tmp_path):
    n_train = 36  # 18 global batches: 9 per process, not divisible by accum 2
    one = reference_one_process(tmp_path, n_train)
    script = textwrap.dedent(f"""
        import torch
        from accelerate import notebook_launcher
        from lowvram.config import get_preset
        from lowvram.train import train
        model, tc = get_preset("tiny")
        g = torch.Generator().manual_seed(0)
        tr = torch.randint(0, model.vocab_size, ({n_train}, model.block_size + 1), generator=g)
        g = torch.Generator().manual_seed(1)
        va = torch.randint(0, model.vocab_size, (8, model.block_size + 1), generator=g)
        tc = tc.replace(output_dir={str(tmp_path / "two")!r}, gradient_accumulation_steps=2,
                        num_epochs=2)
        def run(model, tc):  # a named function: torch's elastic launch needs __name__
            train(model, tc, train_data=tr, val_data=va, progress=False)
        notebook_launcher(run, args=(model, tc), num_processes=2, use_port="{free_port()}")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["num_processes"] == 2
    assert two["effective_batch_size"] == one["effective_batch_size"] == 8
    assert len(two["steps"]) == two["total_steps"] == count_optimizer_steps(9, 2, 2) == 10
    assert [s["lr"] for s in two["steps"]] == pytest.approx([s["lr"] for s in one["steps"]])
    assert [s["tokens"] for s in two["steps"]] == [s["tokens"] for s in one["steps"]]
    assert [s["loss"] for s in two["steps"]] == pytest.approx(
        [s["loss"] for s in one["steps"]], abs=1e-5
    )
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5


def launch(tmp_path: Path, how: list[str], port: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "lowvram.train", "--preset", "tiny",
           "--data-dir", str(tmp_path / "data"), "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_equal_one_accelerate_launch(tmp_path):
    n_train = 40  # 20 global batches: 10 per process, divisible by accum 2
    write_data(tmp_path / "data", n_train)
    one = run(tmp_path / "one", n_train=n_train, gradient_accumulation_steps=4)
    # --multi_gpu is accelerate's torchrun launcher; without a GPU each process uses the CPU
    proc = launch(tmp_path, ["--multi_gpu"], free_port(), "--output-dir", str(tmp_path / "two"),
                  "--gradient-accumulation-steps", "2")
    assert proc.stdout.count("final val loss") == 1  # printed by the main process only
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["num_processes"] == 2
    assert len(two["steps"]) == count_optimizer_steps(10, 2, 1) == 5
    assert [s["lr"] for s in two["steps"]] == pytest.approx([s["lr"] for s in one["steps"]])
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5


@pytest.mark.slow
def test_accelerate_launch_cpu_starts_one_process(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs ONE process; lowvram says so."""
    write_data(tmp_path / "data", 8)
    proc = launch(tmp_path, ["--cpu"], free_port(), "--output-dir", str(tmp_path / "cpu"),
                  "--max-steps", "1")
    assert "starts only one" in proc.stderr
    assert json.loads((tmp_path / "cpu" / "history.json").read_text())["num_processes"] == 1


# ----------------------------------------------------------------------------- it learns


@pytest.mark.slow
def test_cpu_demo_learns(tmp_path):
    from lowvram.data import load_datasets

    model, tc = get_preset("cpu-demo")
    try:
        train_data, val_data = load_datasets(model, REPO / "data")
    except FileNotFoundError as err:
        pytest.skip(f"the cpu-demo data is not prepared (`make data`): {err}")
    # 50 of the preset's 200 steps (a quarter of the time; 25_3b's strictly checked outputs cover
    # the whole run: 7.66 -> 5.37)
    history = train(model, tc.replace(output_dir=str(tmp_path / "demo"), max_steps=50),
                    train_data=train_data, val_data=val_data, progress=False)
    ln_v = math.log(model.vocab_size)  # 7.62: a uniform guess over 2048 tokens
    assert history["val"][0]["loss"] == pytest.approx(ln_v, abs=0.1)
    assert history["final_val_loss"] < ln_v - 1.5  # measured: 7.66 -> 5.99


def test_train_uses_the_configs_optimizer_and_8bit_adamw_learns_like_adamw(tmp_path,
                                                                          monkeypatch):
    """optimizer='adamw8bit' reaches the loop as bitsandbytes' class, and its validation loss
    ends within a few percent of AdamW's on the same data (random rows: little to learn)."""
    import lowvram.train as T

    built = []

    def recording(params, train_config, real=T.build_optimizer):
        optimizer = real(params, train_config)
        built.append(type(optimizer).__name__)
        return optimizer

    monkeypatch.setattr(T, "build_optimizer", recording)
    plain = run(tmp_path / "adamw", max_steps=8)
    low = run(tmp_path / "8bit", max_steps=8, optimizer="adamw8bit")
    assert built == ["AdamW", "AdamW8bit"]
    assert low["config"]["train"]["optimizer"] == "adamw8bit" and len(low["steps"]) == 8
    assert low["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=0.05)
    assert low["final_val_loss"] != plain["final_val_loss"]  # another optimizer really ran


def test_cli_takes_the_optimizer(monkeypatch):
    import lowvram.train as T

    configs = []

    def fake_train(model_config, train_config, **kwargs):  # the parser is under test, not train
        configs.append(train_config)
        return {}

    monkeypatch.setattr(T, "train", fake_train)
    T.main(["--preset", "tiny", "--optimizer", "adamw8bit", "--no-progress"])
    assert [c.optimizer for c in configs] == ["adamw8bit"]


# ----------------------------------------------------------------------------- host reads


_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
_TORCH = Path(torch.__file__).parent
# code that only passes a read on: torch's Tensor methods (f"{t:.4f}" calls t.item()), the
# libraries lowvram hands tensors to. torch's own reads (AdamW's CPU step counter, GradScaler's
# found_inf check) are torch's, not lowvram's: their nearest caller is torch.optim or torch.amp.
_RELAYS = (*(str(_TORCH / f) for f in ("_tensor.py", "_tensor_str.py", "overrides.py")),
           *(str(Path(m.__file__).parent) for m in (accelerate, tqdm, transformers)))
_LOWVRAM = str(Path(lowvram.__file__).parent)


def _count_host_reads(monkeypatch, reads: list[str]) -> None:
    """Count the tensor reads to the host (each one a wait for the GPU on CUDA) that lowvram's
    code makes: the nearest caller that is not a relay (``_RELAYS``) is in lowvram/. Each is
    appended to ``reads`` as "method file:line"."""

    def counted(name, original):
        def read(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_RELAYS):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_LOWVRAM):
                where = Path(frame.f_code.co_filename).name
                reads.append(f"{name} {where}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)

        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))


def _reads_per_step(tmp_path, monkeypatch, **changes) -> list[list[str]]:
    """The host reads lowvram makes between one optimizer step and the next in a tiny run with
    the progress bar on, and no evaluation or checkpoint (they are allowed reads)."""
    reads: list[str] = []
    per_step: list[list[str]] = []

    def next_step(model):
        per_step.append(reads[:])
        reads.clear()

    config = TRAIN.replace(output_dir=str(tmp_path / "run"), max_steps=6, eval_interval=0,
                           checkpoint_interval=0, **changes)
    _count_host_reads(monkeypatch, reads)
    train(MODEL, config, train_data=rows(32), val_data=rows(8, seed=1), progress=True,
          on_optimizer_step=next_step)
    monkeypatch.undo()
    return per_step[1:]  # from optimizer step 1 to 2, ..., 5 to 6 (not the first evaluation)


@pytest.mark.parametrize(("log_interval", "reads_per_step"), [(1000, 0), (1, 1)])
def test_train_reads_no_tensor_value_per_micro_batch_or_step(tmp_path, monkeypatch,
                                                             log_interval, reads_per_step):
    """On a GPU each read waits until the GPU has done all queued work. Between two optimizer
    steps (2 micro-batches each) lowvram reads nothing, except the one ``tolist`` of the
    records at a log step."""
    per_step = _reads_per_step(tmp_path, monkeypatch, log_interval=log_interval)
    assert len(per_step) == 5
    assert [len(r) for r in per_step] == [reads_per_step] * 5, per_step
    if reads_per_step:
        assert all(r[0].startswith("tolist history.py:") for r in per_step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "no"])
def test_train_on_cuda_reads_no_tensor_value_between_log_steps(tmp_path, monkeypatch, precision):
    """On CUDA each read is a sync. fp16 adds the GradScaler: its scale and skipped flag stay on
    the device too (torch's own found_inf check inside scaler.step is torch's, not counted)."""
    per_step = _reads_per_step(tmp_path, monkeypatch, log_interval=1000,
                               mixed_precision=precision)
    assert [len(r) for r in per_step] == [0] * 5, per_step
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["precision"] in (precision, "fp16")  # bf16 falls back on pre-Ampere cards
    assert (history["steps"][0]["loss_scale"] is not None) == (history["precision"] == "fp16")


def test_the_host_read_count_sees_the_models_old_input_check(tmp_path, monkeypatch):
    """The count would catch a regression: with the model's token-range check on inside train()
    (before issue 19), each micro-batch's forward read min and max of idx and targets."""
    always = property(lambda model: True, lambda model, value: None)
    monkeypatch.setattr(GPTModel, "check_token_range", always)
    per_step = _reads_per_step(tmp_path, monkeypatch, log_interval=1000)
    assert [len(r) for r in per_step] == [2 * 4] * 5  # 2 micro-batches x 4 bool() in model.py
    assert all(read.startswith("__bool__ model.py:") for r in per_step for read in r)
