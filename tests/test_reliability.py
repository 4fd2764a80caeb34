"""Reliability: exact resume after SIGKILL, crash-safe checkpoints, clear errors.

Tiny preset, random rows, CPU. The data and config cases that lowvram.data and lowvram.config
refuse on their own are tested in tests/test_data.py and tests/test_config.py; here are the
cases that reach ``train`` and the checkpoints, and the fuzz tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from conftest import MODEL, REPO, TRAIN, bitwise_equal, checkpoints, rows, run, weights
from safetensors.torch import load_file

import lowvram.checkpoints
import lowvram.failures
import lowvram.memory
import lowvram.train
from lowvram.checkpoints import latest_checkpoint
from lowvram.config import ModelConfig, TrainConfig
from lowvram.data import check_rows, rows_fingerprint
from lowvram.memory import PlanRow, Recipe, plan
from lowvram.model import GPTModel
from lowvram.train import (
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    lr_schedule,
    schedule_steps,
    train,
)

PLAN_MODULE = importlib.import_module("lowvram.memory.plan")  # where failures finds plan()

# ----------------------------------------------------------------------------- exact resume


def _cli(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowvram.train", "--preset", "tiny", "--data-dir", str(data_dir),
            "--output-dir", str(out), "--max-steps", "80", "--checkpoint-every", "10",
            "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """A real process is SIGKILLed after its first checkpoint, resumed with --resume-from
    latest, and ends with exactly the weights of a run that was never stopped."""
    data_dir = tmp_path / "data"  # the learner's "own" Day-22 files
    data_dir.mkdir()
    torch.save(rows(64), data_dir / "train_data.pt")  # 32 batches: 16 steps per epoch
    torch.save(rows(8, seed=1), data_dir / "val_data.pt")
    # one thread each: the same float arithmetic in every process, and the cores stay shared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    reference = subprocess.run(_cli(tmp_path / "ref", data_dir), env=env, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, data_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        first = out / "checkpoints" / "step_000010" / "manifest.json"  # written last
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert first.exists() and still_running, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # it really did not finish
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and 10 <= int(killed_at.name[5:]) < 80

    resumed = subprocess.run(_cli(out, data_dir, "--resume-from", "latest"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at} at step {int(killed_at.name[5:])}" in resumed.stdout
    assert bitwise_equal(weights(out), weights(tmp_path / "ref"))
    ref_history = json.loads((tmp_path / "ref" / "history.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [s["loss"] for s in history["steps"]] == [s["loss"] for s in ref_history["steps"]]
    assert history["steps"][-1]["tokens"] == ref_history["steps"][-1]["tokens"] == 80 * 4 * 16
    assert not [n for n in checkpoints(out) if n.endswith((".tmp", ".old"))]


def test_resume_restores_rng_grad_scaler_scheduler_mid_epoch(tmp_path, monkeypatch):
    """Dropout draws from the RNG, fp16 overflow makes the GradScaler skip steps and halve its
    scale: resuming mid-epoch still reproduces every loss, scale and weight exactly."""
    model = dataclasses.replace(MODEL, dropout=0.1)
    common = dict(model=model, checkpoint_interval=3, fp16=True, init_scale=2.0**20)  # 8 steps
    full = run(tmp_path / "full", **common)
    assert full["skipped_steps"] > 0  # the scaler's state matters
    resumed = run(tmp_path / "resumed", resume_from=tmp_path / "full/checkpoints/step_000003",
                  **common)
    for key in ("loss", "lr", "loss_scale", "skipped", "grad_norm"):  # repr: nan == nan
        assert [repr(s[key]) for s in resumed["steps"]] == [repr(s[key]) for s in full["steps"]]
    assert bitwise_equal(weights(tmp_path / "resumed"), weights(tmp_path / "full"))
    # without its RNG states the resumed run's dropout masks differ, so a checkpoint whose
    # random_states_0.pkl is gone (from the disk and its manifest) is refused on every route
    (tmp_path / "full/checkpoints/step_000003/random_states_0.pkl").unlink()
    manifest = tmp_path / "full/checkpoints/step_000003/manifest.json"
    data = json.loads(manifest.read_text())
    del data["files"]["random_states_0.pkl"]
    manifest.write_text(json.dumps(data))
    for route in (tmp_path / "full/checkpoints/step_000003", "latest"):
        for old in ("step_000006", "step_000008"):  # make step 3 the latest
            shutil.rmtree(tmp_path / "full/checkpoints" / old, ignore_errors=True)
        with pytest.raises(ValueError, match=r"random_states_0.pkl is missing \(not in its manifest"):
            run(tmp_path / "full", resume_from=route, **common)
    # ... and what it would do, with the check switched off
    monkeypatch.setattr(lowvram.checkpoints, "_required_files", lambda n: set())
    no_rng = run(tmp_path / "no_rng", resume_from=tmp_path / "full/checkpoints/step_000003",
                 **common)
    assert [s["loss"] for s in no_rng["steps"][3:]] != [s["loss"] for s in full["steps"][3:]]


# ----------------------------------------------------------------------------- crash-safe saves


def test_checkpoint_manifest_and_keep_last_n(tmp_path):
    out = tmp_path / "run"
    history = run(out, max_steps=7, checkpoint_interval=2, keep_checkpoints=2)
    assert checkpoints(out) == ["step_000006", "step_000007"]  # 2, 4 deleted; no .tmp left
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000007"
    path = out / "checkpoints" / "step_000006"
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["step"], manifest["tokens"], manifest["epoch"]) == (6, 6 * 4 * 16, 0)
    assert manifest["batches_in_epoch"] == 12 and manifest["batches_per_epoch"] == 16
    assert manifest["model"] == dataclasses.asdict(MODEL)
    assert manifest["train"] == history["config"]["train"]
    assert manifest["num_processes"] == 1 and manifest["precision"] == "no"
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.name != "manifest.json"}
    assert {name: f["bytes"] for name, f in manifest["files"].items()} == files
    for name, f in manifest["files"].items():  # a sha256 per file, RNG states included
        assert f["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert manifest["format"] == 2 and manifest["train"]["seed"] == TRAIN.seed
    assert manifest["train_data_sha256"] == rows_fingerprint(rows(32))
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "loop_state.json"} <= set(files)
    assert latest_checkpoint(tmp_path / "nothing") is None
    # a resumed run in the same directory saves step 7 again: swapped in, nothing left over
    run(out, max_steps=7, checkpoint_interval=2, keep_checkpoints=2, resume_from="latest")
    assert checkpoints(out) == ["step_000006", "step_000007"]
    # a redo from step 6: the old step 7 (another timeline) is kept aside, never replaced
    old_7 = hashlib.sha256((out / "checkpoints" / "step_000007" / "manifest.json").read_bytes())
    run(out, max_steps=7, checkpoint_interval=2, keep_checkpoints=2, resume_from=path)
    aside = [n for n in checkpoints(out) if n.startswith("abandoned-")]
    assert checkpoints(out) == [*aside, "step_000006", "step_000007"] and len(aside) == 1
    kept = out / "checkpoints" / aside[0] / "step_000007" / "manifest.json"
    assert hashlib.sha256(kept.read_bytes()).digest() == old_7.digest()


def _crash_in_optimizer_save(monkeypatch, at_checkpoint: int) -> None:
    """accelerate's save writes half of optimizer.bin of the ``at_checkpoint``-th checkpoint,
    then the process "dies" (a KeyboardInterrupt: what a notebook's stop button raises)."""
    real_save = accelerate.checkpointing.save
    seen = []

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.bin":
            seen.append(f)
            if len(seen) == at_checkpoint:
                Path(f).write_bytes(b"half an optimizer")
                raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)


def _crash_before_rename(monkeypatch, at_checkpoint: int) -> None:
    """Everything written, manifest included; the process dies before the rename."""
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            seen.append(src)
            if len(seen) == at_checkpoint:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(lowvram.checkpoints.os, "replace", replace)


@pytest.mark.parametrize("crash", [_crash_in_optimizer_save, _crash_before_rename])
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash):
    out = tmp_path / "run"
    settings = dict(max_steps=6, checkpoint_interval=2, keep_checkpoints=1)
    crash(monkeypatch, at_checkpoint=2)
    with pytest.raises(KeyboardInterrupt):
        run(out, **settings)
    monkeypatch.undo()
    # the half-written step 4 is not a checkpoint; step 2 (keep=1!) was not deleted for it
    assert checkpoints(out) == ["step_000002", "step_000004.tmp"]
    assert latest_checkpoint(out) == out / "checkpoints" / "step_000002"
    with pytest.raises(ValueError, match=r"step_000004.tmp' is an incomplete checkpoint: a save "
                                         r"was interrupted.*complete checkpoints next to it: step_000002"):
        run(tmp_path / "other", resume_from=out / "checkpoints" / "step_000004.tmp", **settings)
    # step 2 is intact: resuming from it ends exactly where an uninterrupted run ends
    run(out, resume_from="latest", **settings)
    assert checkpoints(out) == ["step_000006"]  # the stale .tmp was cleaned at the next save
    run(tmp_path / "clean", **settings)
    assert bitwise_equal(weights(out), weights(tmp_path / "clean"))


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    run(out, max_steps=2, checkpoint_interval=2)
    return out / "checkpoints" / "step_000002"


def _truncate(path: Path, name: str) -> None:
    f = path / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble(path: Path, name: str) -> None:
    f = path / name
    f.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(f.stat().st_size)))


def _flip(path: Path, name: str) -> None:
    """4 KiB of inverted bits in the middle: what a bad disk or RAM does."""
    f = path / name
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    f.write_bytes(bytes(data))


def _nan_weights(path: Path, name: str) -> None:
    from safetensors.torch import save_file

    tensors = load_file(path / name)
    tensors["wte.weight"][0, 0] = float("nan")
    save_file(tensors, path / name)


def _rehash(path: Path, damage, name: str) -> None:
    """``damage`` a file, then rewrite the manifest so that its size and sha256 match."""
    damage(path, name)
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _drop(path: Path, name: str) -> None:
    (path / name).unlink()


BAD_CHECKPOINTS = [
    # (how the copy is damaged, the exception, its key words)
    (lambda p: shutil.rmtree(p), FileNotFoundError, r"does not exist .*not a lowvram checkpoint"),
    (lambda p: _drop(p, "manifest.json"), FileNotFoundError,
     r"not a lowvram checkpoint \(manifest.json, the file written last, is missing\)"),
    (lambda p: (p / "manifest.json").write_text("{not json"), ValueError,
     r"is corrupt: manifest.json is unreadable \(JSONDecodeError"),
    (lambda p: _truncate(p, "model.safetensors"), ValueError,
     r"is corrupt: model.safetensors has \d+ bytes, its manifest says \d+ \(truncated"),
    (lambda p: _truncate(p, "optimizer.bin"), ValueError, r"corrupt: optimizer.bin has \d+ bytes"),
    (lambda p: _drop(p, "loop_state.json"), ValueError, "is corrupt: loop_state.json is missing"),
    (lambda p: _drop(p, "random_states_0.pkl"), ValueError, "random_states_0.pkl is missing"),
    # the same size, other bytes: found by the manifest's sha256, before anything is loaded
    (lambda p: _garble(p, "model.safetensors"), ValueError,
     r"is corrupt: model.safetensors has sha256 [0-9a-f]{12}\.\.\., its manifest says"),
    (lambda p: _garble(p, "optimizer.bin"), ValueError, r"is corrupt: optimizer.bin has sha256"),
    (lambda p: _garble(p, "loop_state.json"), ValueError, r"is corrupt: loop_state.json has sha256"),
    (lambda p: _flip(p, "model.safetensors"), ValueError, r"is corrupt: model.safetensors has sha256"),
    (lambda p: _garble(p, "random_states_0.pkl"), ValueError, "random_states_0.pkl has sha256"),
    # garbled, and the manifest rewritten to match: what still fails to load is corrupt
    (lambda p: _rehash(p, _garble, "model.safetensors"), ValueError,
     r"is corrupt: it could not be loaded \(SafetensorError"),
    (lambda p: _rehash(p, _garble, "optimizer.bin"), ValueError, r"is corrupt: it could not be loaded"),
    (lambda p: _rehash(p, _garble, "loop_state.json"), ValueError, r"is corrupt: it could not be loaded"),
    (lambda p: _rehash(p, _nan_weights, "model.safetensors"), ValueError,
     r"holds NaN or inf weights \(wte.weight.*saved after training had diverged"),
]


@pytest.mark.parametrize("damage, error, words", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_a_clear_error(tmp_path, good_checkpoint, damage, error, words):
    path = tmp_path / "checkpoints" / "step_000002"
    shutil.copytree(good_checkpoint, path)
    damage(path)
    out = tmp_path / "resumed"
    with pytest.raises(error, match=words) as info:
        run(out, max_steps=4, resume_from=path)
    assert f"resume_from={str(path)!r}" in str(info.value)
    if error is ValueError and "manifest.json" not in words:  # names what to do next
        assert "Delete it and resume from another" in str(info.value)
    assert not (out / "model.safetensors").exists() and not (out / "history.json").exists()


def test_checkpoint_of_another_model_or_batch_or_length(tmp_path, good_checkpoint):
    with pytest.raises(ValueError, match=r"was written for the model .*same model config"):
        run(tmp_path / "a", model=dataclasses.replace(MODEL, n_embd=64), resume_from=good_checkpoint)
    with pytest.raises(ValueError, match=r"\(2, 2, 1, 16\), this run has \(4, 2, 1, 8\).*same "
                                         r"batch settings, process count and train data"):
        run(tmp_path / "b", per_device_train_batch_size=4, resume_from=good_checkpoint)
    with pytest.raises(ValueError, match=r"\(2, 2, 1, 16\), this run has \(2, 2, 1, 32\)"):
        run(tmp_path / "c", n_train=64, resume_from=good_checkpoint)
    with pytest.raises(ValueError, match="is at step 2, past this run's total_steps=1: raise max_steps"):
        run(tmp_path / "d", max_steps=1, resume_from=good_checkpoint)
    with pytest.raises(FileNotFoundError, match=r"resume_from='latest' but .*e/checkpoints holds "
                                                r"no complete checkpoint"):
        run(tmp_path / "e", resume_from="latest")


# ----------------------------------------------------------------------------- runtime


def _nan_loss_from(monkeypatch, training_call: int) -> None:
    """From the ``training_call``-th training forward on, the loss is NaN."""
    real_forward = GPTModel.forward
    calls = []

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls.append(1)
            if len(calls) >= training_call:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTModel, "forward", forward)


def _nan_grad_at(step: int):
    """An on_optimizer_step callback that puts a NaN into one gradient at optimizer step ``step``."""
    calls = []

    def hook(model):
        calls.append(1)
        if len(calls) == step:
            next(model.parameters()).grad[0, 0] = float("nan")

    return hook


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, what):
    out = tmp_path / "run"
    kwargs = {}
    if what == "loss":
        _nan_loss_from(monkeypatch, training_call=9)  # step 5's micro-batches: 9 and 10
    else:
        kwargs["on_optimizer_step"] = _nan_grad_at(step=5)
    with pytest.raises(NonFiniteLossError) as info:
        run(out, max_steps=8, checkpoint_interval=2, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert "training stopped at optimizer step 5 (epoch 0)" in message
    assert ("the loss is nan" if what == "loss" else "the gradient norm is nan") in message
    for cause in ("learning rate is too high", "lr=", "fp16 overflow", "precision='no' without a "
                  "GradScaler", "bad data"):
        assert cause in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_000004'}" in message
    # nothing with the broken weights was saved; the history has the 4 good steps
    assert checkpoints(out) == ["step_000002", "step_000004"]
    assert not (out / "model.safetensors").exists()
    history = json.loads((out / "history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2, 3, 4]
    assert history["error"]["step"] == 5 and history["error"]["type"] == "NonFiniteLossError"
    good = weights(out / "checkpoints" / "step_000004")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_grad_scaler_skips_are_reported_not_fatal(tmp_path, monkeypatch, capsys):
    # a first loss scale of 2**30 overflows fp16 at once; a NaN gradient at step 6 is skipped too
    history = run(tmp_path / "fp16", fp16=True, init_scale=2.0**30,
                  on_optimizer_step=_nan_grad_at(step=6))
    skipped = [s["step"] for s in history["steps"] if s["skipped"]]
    assert skipped[0] == 1 and 6 in skipped and len(history["steps"]) == 8
    assert history["skipped_steps"] == len(skipped)
    out = capsys.readouterr().out
    assert f"after 8 steps ({len(skipped)} skipped by the GradScaler: fp16 overflow)" in out


def test_out_of_memory_says_what_the_planner_suggests(tmp_path, monkeypatch):
    calls = []
    real_plan = lowvram.memory.plan

    def counting_plan(*args, **kwargs):
        calls.append(args)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(PLAN_MODULE, "plan", counting_plan)
    run(tmp_path / "fine", max_steps=1)
    assert calls == []  # the planner runs only after an OOM

    def hook(model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingOutOfMemoryError) as info:
        run(tmp_path / "oom", max_steps=4, on_optimizer_step=hook)
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)
    message = str(info.value)
    expected = plan(MODEL, 4.0, TRAIN.effective_batch_size,
                    [Recipe("no", precision="no"), Recipe("fp16", precision="fp16")])
    assert [(r.micro_batch, r.accumulation) for r in expected] == [(4, 1), (4, 1)]
    assert "CUDA ran out of memory during training (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    assert "per_device_train_batch_size=2, gradient_accumulation_steps=2, precision='no'" in message
    assert "The memory planner (lowvram.memory) says, for this model with optimizer='adamw' on a 4.0 GiB card" in message
    assert ("with fp32 micro-batch <= 4, accumulation 1 (effective batch 4): try "
            "--per-device-train-batch-size 4 --gradient-accumulation-steps 1 --mixed-precision no") in message
    assert "with fp16 micro-batch <= 4" in message and len(calls) == 1
    # not chained: the original's frames would keep the GPU memory alive
    assert info.value.__cause__ is None and info.value.__context__ is None
    run(tmp_path / "again", max_steps=1)  # the next run can start an Accelerator again


def test_planner_advice_when_nothing_fits(monkeypatch):
    def nothing_fits(model_config, card_gib, target, recipes):
        return [PlanRow(r, 0, 0, 0, None) for r in recipes]

    monkeypatch.setattr(PLAN_MODULE, "plan", nothing_fits)
    advice = lowvram.failures.planner_advice(MODEL, TRAIN, "bf16", 4.0)
    assert "with bf16 not even a micro-batch of 1 fits: turn on gradient_checkpointing" in advice
    assert "with fp16 not even a micro-batch of 1 fits" in advice

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(PLAN_MODULE, "plan", broken)
    assert "planner failed: RuntimeError: boom" in lowvram.failures.planner_advice(MODEL, TRAIN, "no", 4.0)


# ----------------------------------------------------------------------------- config and data


def test_data_that_does_not_fit_the_model_is_refused_by_train(tmp_path):
    bigger = dataclasses.replace(MODEL, block_size=32)  # rows of 17 tokens: block_size too large
    with pytest.raises(ValueError, match=r"train_data has rows of 17 tokens, but block_size=32 "
                                         r"needs rows of block_size\+1=33: block_size is larger"):
        train(bigger, TRAIN.replace(output_dir=str(tmp_path)), train_data=rows(8),
              val_data=rows(4), progress=False)
    with pytest.raises(ValueError, match=r"val_data has token ids from \d+ to \d+, but vocab_size=50"):
        small = dataclasses.replace(MODEL, vocab_size=50)
        train(small, TRAIN.replace(output_dir=str(tmp_path)), train_data=rows(8) % 50,
              val_data=rows(4), progress=False)
    with pytest.raises(ValueError, match="train_data holds a list, not a tensor"):
        train(MODEL, TRAIN.replace(output_dir=str(tmp_path)), train_data=rows(8).tolist(),
              val_data=rows(4), progress=False)
    assert not tmp_path.joinpath("history.json").exists()
    history = train(MODEL, TRAIN.replace(output_dir=str(tmp_path / "int32"), max_steps=1),
                    train_data=rows(8).int(), val_data=rows(4).short(), progress=False)
    assert len(history["steps"]) == 1  # other integer dtypes are widened to int64


def test_warmup_is_always_shorter_than_training():
    # warmup_ratio in [0, 1) (TrainConfig refuses 1.0: tests/test_config.py) gives
    # warmup = floor(total * ratio) < total for any total, however small max_steps is
    for total in range(1, 60):
        for ratio in (0.0, 0.05, 0.1, 0.5, 0.9, 0.999):
            warmup, steps = schedule_steps(100, 1, 1, max_steps=total, warmup_ratio=ratio)
            assert steps == total and 0 <= warmup < total
    with pytest.raises(ValueError, match=r"warmup_ratio=1.0 is not allowed: it must be in \[0, 1\)"):
        schedule_steps(100, 1, 1, warmup_ratio=1.0)
    # absolute warmup steps can ask for more: refused where every schedule is built
    for warmup, total in ((10, 5), (5, 5), (-1, 5)):
        with pytest.raises(ValueError, match=f"warmup_steps={warmup} is not allowed with "
                                             f"total_steps={total}: warmup must be shorter than training"):
            lr_schedule(warmup, total, 1e-3)
    with pytest.raises(ValueError, match="warmup must be shorter than training"):
        TrainConfig(warmup_ratio=1.5)


def test_cli_prints_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        lowvram.train.main(["--preset", "tiny", "--data-dir", str(tmp_path), "--output-dir",
                            str(tmp_path / "out"), "--resume-from", "latest", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: FileNotFoundError: no data for vocab_size=96")


# ----------------------------------------------------------------------------- fuzz


def _random_rows(rng: random.Random) -> torch.Tensor:
    """Valid rows [B, block_size + 1], then 0-3 random mutations: dtype (ints, bool, floats
    with NaN/inf), rank, width, emptiness, ids out of range."""
    t = torch.randint(0, MODEL.vocab_size, (rng.randint(1, 4), MODEL.block_size + 1))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        mutation = rng.choice(["dtype", "float", "rank", "width", "empty", "ids"])
        if mutation == "dtype":
            t = t.to(rng.choice([torch.int32, torch.int16, torch.uint8, torch.int8, torch.bool]))
        elif mutation == "float":
            t = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
            t = t.contiguous()
            if t.numel():
                t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf")])
        elif mutation == "rank":
            t = rng.choice([t.flatten(), t[None], t.flatten()[0] if t.numel() else t.flatten()])
        elif mutation == "width" and t.dim() >= 1:
            t = t[..., : rng.randint(0, t.shape[-1] - 1)] if rng.random() < 0.5 else torch.cat([t, t], -1)
        elif mutation == "empty" and t.dim() >= 1:
            t = t[:0]
        elif mutation == "ids" and t.numel() and t.dtype in (torch.long, torch.int32, torch.int16):
            t = t.contiguous().clone()
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([-1, MODEL.vocab_size, 10**4])
    return t


def test_fuzz_rows_and_model_raise_only_value_errors():
    """check_rows (what load_split and train use; files are fuzzed in tests/test_data.py) and
    GPTModel.forward on X = rows[..., :-1], Y = rows[..., 1:]: a ValueError or a result."""
    rng = random.Random(0)
    torch.manual_seed(0)
    model = GPTModel(MODEL).eval()
    outcomes = {"rows ok": 0, "rows error": 0, "forward ok": 0, "forward error": 0}
    for _ in range(300):
        t = _random_rows(rng)
        try:
            good = check_rows(t, MODEL, "train_data")
        except ValueError as err:
            assert str(err).startswith("train_data ")
            outcomes["rows error"] += 1
        else:
            assert good.dtype == torch.long and good.shape[1] == MODEL.block_size + 1
            outcomes["rows ok"] += 1
        X = t[..., :-1] if t.dim() else t
        Y = t[..., 1:] if t.dim() and rng.random() < 0.7 else _random_rows(rng)
        try:
            with torch.no_grad():
                logits, loss = model(X, Y if rng.random() < 0.7 else None)
        except ValueError as err:
            assert str(err).split(" ")[0] in ("idx", "targets")
            outcomes["forward error"] += 1
        else:
            assert logits.shape == (*X.shape, MODEL.vocab_size)
            assert loss is None or math.isfinite(loss.item())
            outcomes["forward ok"] += 1
    assert min(outcomes.values()) >= 30, outcomes  # every branch was exercised


_VALUES = [0, -1, 1, 2, 3, 7, 64, 10**6, 0.5, 1.0, 1.5, -0.5, 3e-4, float("nan"), float("inf"),
           True, False, None, "", "x", "no", "fp16", "bf16", [], {}, (1,)]


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_fuzz_configs_raise_only_value_errors_naming_the_field(cls):
    rng = random.Random(1)
    fields = [f.name for f in dataclasses.fields(cls)]
    outcomes = set()
    for _ in range(400):
        changes = {name: rng.choice(_VALUES) for name in rng.sample(fields, rng.randint(1, 3))}
        try:
            cls(**changes)
        except ValueError as err:
            field = str(err).split("=")[0]
            # n_embd % n_head != 0 names n_embd, also when only n_head was changed
            assert field in changes or (field == "n_embd" and "n_head" in changes), err
            assert "is not allowed" in str(err)
            outcomes.add("error")
        else:
            outcomes.add("ok")
    assert outcomes == {"ok", "error"}


def test_out_of_memory_in_tells_oom_from_other_runtime_errors():
    from lowvram.failures import out_of_memory_in

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    assert out_of_memory_in(cuda) == ("CUDA out of memory. Tried to allocate 2.00 GiB", False)
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 1 bytes")
    assert out_of_memory_in(cpu)[1] is True
    assert out_of_memory_in(RuntimeError("shape mismatch")) is None


# ----------------------------------------------------------------------------- the lock (n10)


def _race(barrier, base: str, trials: int, active, most, wins, guard) -> None:
    from lowvram.outputdir import OutputDirInUseError, OutputDirLock

    for trial in range(trials):
        barrier.wait()
        lock = OutputDirLock(Path(base) / str(trial), log=lambda line: None)
        try:
            lock.acquire()
        except OutputDirInUseError:
            barrier.wait()
            continue
        with guard:
            active.value += 1
            most.value = max(most.value, active.value)
            wins[trial] += 1
        time.sleep(0.005)
        with guard:
            active.value -= 1
        lock.release()
        barrier.wait()


@pytest.mark.parametrize("stale", [False, True])
def test_lock_race_two_processes_never_both_win(tmp_path, stale):
    # n10 before: with 2 processes at a barrier both held the lock in 15/60 trials (34/60 with a
    # stale lock present): an empty, just-created lock looked stale and was unlinked
    import multiprocessing
    import socket

    from lowvram.outputdir import LOCK_FILE

    n_procs, trials = 4, 40
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(trials):
        (tmp_path / str(trial)).mkdir()
        if stale:  # a killed run's lock: every racer sees a dead pid
            (tmp_path / str(trial) / LOCK_FILE).write_text(f"{socket.gethostname()} {dead.pid}\n")
    ctx = multiprocessing.get_context("fork")
    barrier, guard = ctx.Barrier(n_procs), ctx.Lock()
    active, most = ctx.Value("i", 0), ctx.Value("i", 0)
    wins = ctx.Array("i", trials)
    procs = [ctx.Process(target=_race, args=(barrier, str(tmp_path), trials, active, most, wins, guard))
             for _ in range(n_procs)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n_procs
    assert most.value == 1  # never two holders at once
    assert all(w >= 1 for w in wins)  # and never nobody: a stale lock is taken over
    assert not any((tmp_path / str(t) / LOCK_FILE).exists() for t in range(trials))


@pytest.mark.parametrize("content", ["", "stale"])
def test_lock_being_taken_is_never_called_stale(tmp_path, content):
    # n10's mechanism, made deterministic: another racer holds the lock but has not written its
    # pid yet (an empty file), or is taking over a dead writer's lock (its pid still inside).
    # before: both looked stale, were unlinked and taken: two holders
    import fcntl
    import socket

    from lowvram.outputdir import LOCK_FILE, OutputDirInUseError, OutputDirLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / LOCK_FILE
    path.write_text(f"{socket.gethostname()} {dead.pid}\n" if content else "")
    other = os.open(path, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other racer holds it
    try:
        with pytest.raises(OutputDirInUseError, match="another training"):
            OutputDirLock(tmp_path, log=lambda line: None).acquire()
        assert path.exists()  # not unlinked under the other racer
    finally:
        os.close(other)
    lock = OutputDirLock(tmp_path, log=lambda line: None)  # released (or its process died)
    lock.acquire()
    assert path.read_text().split() == [socket.gethostname(), str(os.getpid())]
    lock.release()
