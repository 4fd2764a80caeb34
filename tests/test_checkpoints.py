"""lowvram.checkpoints: one resume check for every route, atomic hashed saves.

Each test is one case of an adversarial pass against the CLI and the Python API: what it did
before is in the comment, what it does now is asserted. Tiny preset, random rows, CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from conftest import MODEL, TRAIN, checkpoints, rows, run

import lowvram.outputdir
from lowvram.checkpoints import latest_checkpoint, run_identity, sha256_file
from lowvram.data import rows_fingerprint
from lowvram.outputdir import LOCK_FILE
from lowvram.schedule import lr_schedule
from lowvram.train import train

PLAN_MODULE = importlib.import_module("lowvram.memory.plan")  # where failures finds plan()

STEP_4 = Path("checkpoints") / "step_000004"


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("four") / "run"
    run(out, max_steps=4, checkpoint_interval=2)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- small pieces


def test_identity_holds_what_a_resume_must_share_and_nothing_else():
    fingerprint = rows_fingerprint(rows(32))
    identity = run_identity(MODEL, TRAIN, 1, 16, fingerprint)
    # what the log, eval and save cadence, the LR or the output dir are is not the run's identity
    assert run_identity(MODEL, TRAIN.replace(log_interval=7, eval_interval=3, max_lr=0.5,
                                             output_dir="elsewhere"), 1, 16, fingerprint) == identity
    # the seed (the data order), the model, the batch, the process count and the rows are
    for other in (run_identity(MODEL, TRAIN.replace(seed=5), 1, 16, fingerprint),
                  run_identity(dataclasses.replace(MODEL, n_layer=1), TRAIN, 1, 16, fingerprint),
                  run_identity(MODEL, TRAIN.replace(gradient_accumulation_steps=4), 1, 16,
                               fingerprint),
                  run_identity(MODEL, TRAIN, 2, 16, fingerprint),
                  run_identity(MODEL, TRAIN, 1, 16, rows_fingerprint(rows(32, seed=5)))):
        assert other != identity
    assert fingerprint != rows_fingerprint(rows(32, seed=5))  # the same shape, other rows


# ----------------------------------------------------------------------------- one resume check


def test_latest_gets_every_check_and_skips_another_runs_checkpoint(tmp_path, four_steps, capsys):
    # before: `latest` returned before the manifest was read; a resume with batch 4 exited 0
    out = copy_run(four_steps, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint of this run, only of "
                                                r"others: step_000004 \(was written with"):
        run(out, max_steps=6, per_device_train_batch_size=4, resume_from="latest")
    printed = capsys.readouterr().out
    assert f"skipping {out / STEP_4}, a checkpoint of another run" in printed
    assert "corrupt" not in printed  # never "corrupt ... Delete it" for a good checkpoint


@pytest.mark.parametrize("change, words", [
    (dict(seed=5), r"was written with seed=1337, this run has seed=5: the seed fixes the data "
                   r"order.*Resume with --seed 1337"),
    (dict(model=dataclasses.replace(MODEL, n_head=4)), "was written for the model"),
])
def test_seed_and_model_are_checked_on_every_route(tmp_path, four_steps, change, words):
    # before: --seed was not checked (the data order changed mid-epoch); `latest` checked nothing
    out = copy_run(four_steps, tmp_path / "run")
    with pytest.raises(ValueError, match=words):
        run(out, max_steps=6, resume_from=out / STEP_4, **change)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint of this run"):
        run(out, max_steps=6, resume_from="latest", **change)


def test_other_train_data_of_the_same_length_is_refused(tmp_path, four_steps):
    out = copy_run(four_steps, tmp_path / "run")
    config = TRAIN.replace(output_dir=str(out), max_steps=6)
    with pytest.raises(ValueError, match="was written for other train data"):
        train(MODEL, config, train_data=rows(32, seed=7), val_data=rows(8, seed=1),
              progress=False, resume_from=out / STEP_4)


def test_another_process_count_is_refused_with_the_reason(tmp_path, four_steps):
    # before: a 2-process checkpoint resumed by 1 process with `latest` exited 0, step 6 ran at
    # lr 0.0 and 16 batches were trained again. Simulated: the manifest says 2 processes.
    out = copy_run(four_steps, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        manifest = out / "checkpoints" / step / "manifest.json"
        data = json.loads(manifest.read_text())
        data["num_processes"] = 2
        manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 16\), this run has \(2, 2, 1, 16\).*The "
                                         r"process count differs \(2 -> 1\).*per process"):
        run(out, max_steps=6, resume_from=out / STEP_4)
    with pytest.raises(FileNotFoundError, match="only of others: step_000004 .*step_000002"):
        run(out, max_steps=6, resume_from="latest")


def test_extending_a_finished_run_follows_the_new_schedule(tmp_path, four_steps):
    # before: "raise max_steps", then the first extra step ran at the old final lr, 0.0
    out = copy_run(four_steps, tmp_path / "run")
    old = json.loads((out / "history.json").read_text())
    assert old["final_lr"] == 0.0
    extended = run(out, max_steps=6, resume_from="latest")
    new_schedule = lr_schedule(int(6 * TRAIN.warmup_ratio), 6, TRAIN.max_lr)
    assert [s["lr"] for s in extended["steps"][4:]] == pytest.approx(new_schedule[4:], abs=1e-12)
    assert extended["steps"][4]["lr"] > 0
    assert extended["final_val_loss"] != old["final_val_loss"]  # the extra steps did train
    assert [s["loss"] for s in extended["steps"][:4]] == [s["loss"] for s in old["steps"]]


def test_another_optimizer_is_another_run(tmp_path):
    """AdamW's state cannot continue as AdamW8bit's (it was a KeyError: 'exp_avg')."""
    from lowvram import checkpoints as ck

    def identity(optimizer):
        return ck.run_identity(MODEL, TRAIN.replace(optimizer=optimizer), 1, 8, "abc")

    manifest_8bit = {"model": identity("adamw8bit")["model"], "num_processes": 1,
                     "batches_per_epoch": 8, "train_data_sha256": "abc",
                     "train": {**TRAIN.replace(optimizer="adamw8bit").__dict__}}
    why = ck._mismatch(tmp_path, ck._identity_of(manifest_8bit), identity("adamw"))
    assert why.startswith("was written with optimizer='adamw8bit', this run has optimizer='adamw'")
    assert "--optimizer adamw8bit" in why
    assert ck._mismatch(tmp_path, ck._identity_of(manifest_8bit), identity("adamw8bit")) is None
    older = {**manifest_8bit, "train": {k: v for k, v in manifest_8bit["train"].items()
                                        if k != "optimizer"}}
    assert ck._mismatch(tmp_path, ck._identity_of(older), identity("adamw")) is None


# ----------------------------------------------------------------------------- saving


def test_disk_full_during_a_save_names_the_disk_and_leaves_no_tmp(tmp_path, monkeypatch):
    # before: RuntimeError: ... unexpected pos 4831232 vs 4831124; the .tmp kept the disk full
    real_save = accelerate.checkpointing.save
    calls = []

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.bin":
            calls.append(f)
            if len(calls) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter "
                                   "failed writing file data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"the disk holding .*checkpoints \(mounted at .*\) is "
                                      r"full.*Saving step_000004 failed and its partial files "
                                      r"were removed. The last complete checkpoint is .*step_000002"):
        run(out, max_steps=6, checkpoint_interval=2)
    assert checkpoints(out) == ["step_000002"]  # no step_000004.tmp
    assert not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- issue 21: every route


def test_resume_from_another_runs_checkpoint_never_overwrites_a_used_dir(tmp_path, four_steps):
    # n12/n13 before: exit 0; the other run's model and history overwritten, its checkpoints
    # rotated away (the ownership check ran only for fresh runs)
    victim = tmp_path / "victim"
    run(victim, max_steps=4, checkpoint_interval=2, seed=7)
    before = {p: sha256_file(victim / p) for p in ("model.safetensors", "history.json")}
    with pytest.raises(FileExistsError, match=r"already holds another run's checkpoints, "
                       r"model.safetensors, history.json, and the checkpoint to resume, .*step_000002"
                       r", is not one of its checkpoints.*another --output-dir.*--overwrite-output-dir "
                       r"deletes its checkpoints"):
        run(victim, max_steps=6, resume_from=four_steps / "checkpoints" / "step_000002")
    assert {p: sha256_file(victim / p) for p in before} == before
    assert checkpoints(victim) == ["step_000002", "step_000004"]
    # into a new dir, and into an empty one: it works
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        history = run(out, max_steps=6, resume_from=four_steps / "checkpoints" / "step_000002")
        assert len(history["steps"]) == 6
        assert history["resumed_from"] == [
            {"step": 2, "checkpoint": str(four_steps / "checkpoints" / "step_000002")}]
    # --overwrite-output-dir: the victim's files go, the resumed checkpoint (elsewhere) stays
    run(victim, max_steps=6, resume_from=four_steps / "checkpoints" / "step_000002",
        overwrite_output_dir=True)
    assert checkpoints(victim) == ["step_000006"]  # the old step_000002/4 are gone
    assert (four_steps / "checkpoints" / "step_000002" / "manifest.json").is_file()


def test_latest_follows_the_timeline_of_a_redo(tmp_path, four_steps, capsys):
    # n14 before: a redo from step 2 to step 3, then `latest` resumed the OLD run's step 4
    out = copy_run(four_steps, tmp_path / "run")
    old_4 = sha256_file(out / STEP_4 / "model.safetensors")
    redo = run(out, max_steps=3, checkpoint_interval=1, resume_from=out / "checkpoints" / "step_000002")
    printed = capsys.readouterr().out
    assert "starts a new timeline: the later checkpoints step_000004" in printed
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_000004"]
    assert sha256_file(aside[0] / "step_000004" / "model.safetensors") == old_4  # kept
    assert latest_checkpoint(out).name == "step_000003"
    extended = run(out, max_steps=4, resume_from="latest")
    assert "resumed from " + str(out / "checkpoints" / "step_000003") in capsys.readouterr().out
    assert [s["loss"] for s in extended["steps"][:3]] == [s["loss"] for s in redo["steps"]]
    assert [r["step"] for r in extended["resumed_from"]] == [2, 3]
    manifest = json.loads((out / STEP_4 / "manifest.json").read_text())
    assert [r["step"] for r in manifest["resumed_from"]] == [2, 3]


def test_a_symlinked_checkpoint_is_unlinked_by_rotation_not_followed(tmp_path, four_steps):
    # n16 before: "OSError: Cannot call rmtree on a symbolic link" after training, no model
    out = tmp_path / "run"
    shutil.copytree(four_steps, out, ignore=shutil.ignore_patterns("step_000004"))
    (out / STEP_4).symlink_to(four_steps / STEP_4, target_is_directory=True)
    run(out, max_steps=8, checkpoint_interval=2, keep_checkpoints=1, resume_from="latest")
    assert checkpoints(out) == ["step_000008"] and (out / "model.safetensors").is_file()
    assert (four_steps / STEP_4 / "manifest.json").is_file()  # the link's target is untouched


def test_weights_that_turned_inf_are_never_saved_as_a_good_checkpoint(tmp_path):
    # n71 before: step_000002 was saved with an inf weight and called "the last good checkpoint"
    from lowvram.failures import NonFiniteLossError

    calls = []

    def inf_after_step_3(model):  # the optimizer step of step 3 then writes inf... simulated:
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")

    with pytest.raises(NonFiniteLossError, match=r"the weights hold NaN or inf .*step_000004 was "
                       r"not saved.*the last good checkpoint is .*step_000002"):
        run(tmp_path / "run", max_steps=6, checkpoint_interval=2, on_optimizer_step=inf_after_step_3)
    assert checkpoints(tmp_path / "run") == ["step_000002"]


def test_disk_full_while_writing_the_final_model_is_named_and_leaves_no_half_file(tmp_path, monkeypatch):
    # n21 before: a safetensors traceback after training
    import accelerate

    def full(self, model, save_directory, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(accelerate.Accelerator, "save_model", full)
    with pytest.raises(OSError, match=r"the disk holding .*run \(mounted at .*\) is full: .*Writing "
                       r"model.safetensors .*removed. The last checkpoint, .*step_000002, holds "
                       r"the trained weights: after freeing space, --resume-from latest"):
        run(tmp_path / "run", max_steps=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    monkeypatch.undo()
    history = run(tmp_path / "run", max_steps=2, resume_from="latest")  # writes it, no training
    assert len(history["steps"]) == 2 and (tmp_path / "run" / "model.safetensors").is_file()


def test_cpu_oom_advice_plans_for_the_process_limit_and_the_runs_optimizer(monkeypatch):
    # n76 before: planned for the machine's physical RAM as a "23.5 GiB card" (ulimit -v was
    # 5.7 GiB) and advised fp16, which runs as fp32 on a CPU; issue 18.7: an 8-bit AdamW run
    # was advised as plain AdamW
    import resource

    import lowvram.failures as failures
    import lowvram.memory

    monkeypatch.setattr(resource, "getrlimit", lambda what: (6 * 2**30, resource.RLIM_INFINITY)
                        if what == resource.RLIMIT_AS else (resource.RLIM_INFINITY,) * 2)
    real_read = failures._read_int

    def read(path, field=None):
        if field == "VmSize:":
            return 2**30  # 1 GiB mapped already
        if field == "MemAvailable:":
            return 20 * 2**30
        return real_read(path, field)

    monkeypatch.setattr(failures, "_read_int", read)
    left, why = failures.cpu_memory_limit()
    assert left == int(0.75 * 5 * 2**30) and "RLIMIT_AS (ulimit -v) 6.0 GiB, 1.0 GiB of it mapped" in why
    planned = {}

    def fake_plan(model_config, card_gib, target, recipes):
        planned.update(card=card_gib, recipes=recipes)
        return [lowvram.memory.PlanRow(r, 2, 2, 4, None) for r in recipes]

    monkeypatch.setattr(PLAN_MODULE, "plan", fake_plan)
    train_config = TRAIN.replace(optimizer="adamw8bit")
    error = failures.out_of_memory_error("DefaultCPUAllocator: can't allocate memory", MODEL,
                                         train_config, "no", torch.device("cpu"), cpu_allocator=True)
    message = str(error)
    assert planned["card"] == pytest.approx(left / 2**30)
    assert [(r.precision, r.optimizer) for r in planned["recipes"]] == [("no", "adamw8bit"),
                                                                        ("bf16", "adamw8bit")]
    assert "optimizer='adamw8bit' within the CPU's limit of 3.8 GiB (the process limit" in message
    assert "--mixed-precision no --optimizer adamw8bit" in message
    assert "--mixed-precision bf16 --optimizer adamw8bit" in message and "fp16" not in message
    # on a GPU: the run's precision and fp16, the run's optimizer
    failures.out_of_memory_error("CUDA out of memory", MODEL, train_config, "bf16",
                                 torch.device("cpu"))
    assert [(r.precision, r.optimizer) for r in planned["recipes"]] == [("bf16", "adamw8bit"),
                                                                        ("fp16", "adamw8bit")]


def test_interrupted_data_parallel_run_prints_its_own_launcher(tmp_path, monkeypatch):
    # c56 before: a 2-process launch printed `python -m lowvram.train ... --resume-from latest`,
    # which then refused the run's own checkpoint and offered --overwrite-output-dir
    from lowvram.failures import interrupted_message

    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").write_text("{}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert interrupted_message(tmp_path, ["--preset", "cpu-demo"]).endswith(
        "resume with: accelerate launch --multi_gpu --num_processes 2 -m lowvram.train "
        "--preset cpu-demo --resume-from latest")
    monkeypatch.delenv("WORLD_SIZE")
    assert "resume with: python -m lowvram.train" in interrupted_message(tmp_path, ["--preset", "x"])


def test_output_dir_on_a_read_only_mount_is_not_told_to_chmod(tmp_path, monkeypatch):
    # n77 before: "make it writable (chmod u+w ...)", which cannot help on a read-only mount
    from lowvram.outputdir import check_output_dir

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(lowvram.outputdir, "_read_only_mount", lambda path: True)
    with pytest.raises(PermissionError, match=r"is on a read-only file system \(mounted at .*\): "
                                              r"choose another --output-dir on a writable disk"):
        check_output_dir(tmp_path, resume=False, overwrite=False, num_parameters=10)
