"""lowvram.checkpoints: one resume check for every route, atomic hashed saves.

Each test is one case of an adversarial pass against the CLI and the Python API: what it did
before is in the comment, what it does now is asserted. Tiny preset, random rows, CPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import accelerate.checkpointing
import pytest
from conftest import MODEL, TRAIN, checkpoints, rows, run

from lowvram.checkpoints import run_identity
from lowvram.data import rows_fingerprint
from lowvram.outputdir import LOCK_FILE
from lowvram.schedule import lr_schedule
from lowvram.train import train

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
