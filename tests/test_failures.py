"""lowvram.failures: what a run says when it fails (NaN/inf, out of memory, Ctrl-C), and its advice.

The NaN/inf stop inside a real run is in tests/test_reliability.py and tests/test_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run, write_data

import lowvram.checkpoints
from lowvram.checkpoints import latest_checkpoint
from lowvram.failures import (
    TrainingOutOfMemoryError,
    interrupted_message,
    non_finite,
    non_finite_message,
)
from lowvram.outputdir import LOCK_FILE
from lowvram.train import main


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data-dir", str(tmp_path / "data"), "--output-dir",
            str(tmp_path / "out"), "--no-progress", *extra]


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize(("record", "problem"), [
    ({"loss": 2.0, "grad_norm": 0.5, "skipped": False}, None),
    ({"loss": float("nan"), "grad_norm": 0.5, "skipped": False}, "the loss is nan"),
    ({"loss": float("inf"), "grad_norm": 0.5, "skipped": True}, "the loss is inf"),
    ({"loss": 2.0, "grad_norm": float("inf"), "skipped": False},
     "the gradient norm is inf (the loss was 2.0000)"),
    ({"loss": 2.0, "grad_norm": float("inf"), "skipped": True}, None),  # fp16 overflow, skipped
])
def test_non_finite_names_what_is_not_finite(record, problem):
    assert non_finite(record) == problem


def test_a_nan_at_lr_0_does_not_blame_the_learning_rate():
    # before: a NaN at lr 0 (a resumed, already broken state) blamed the learning rate
    record = {"step": 5, "epoch": 0, "lr": 0.0, "loss": float("nan"), "grad_norm": 1.0}
    message = non_finite_message(record, "the loss is nan", steps_done=4, last_checkpoint=None,
                                 history_file="h.json", precision="no", has_scaler=False,
                                 max_lr=1e-3)
    assert "not the learning rate: this step ran at lr=0.00e+00" in message
    assert "too high" not in message
    assert message.startswith("training stopped at optimizer step 5 (epoch 0): the loss is nan. "
                              "Nothing from this step was saved: no checkpoint was saved yet, "
                              "and h.json holds the 4 steps before it.")


# ----------------------------------------------------------------------------- out of memory


def test_cpu_out_of_memory_gets_the_planners_advice(tmp_path):
    # before: a raw RuntimeError; only CUDA OOM was translated
    def hook(model):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 4294967296 bytes.")

    with pytest.raises(TrainingOutOfMemoryError) as info:
        run(tmp_path / "oom", max_steps=2, on_optimizer_step=hook)
    message = str(info.value)
    assert message.startswith("The CPU ran out of memory (host RAM, or the process's limit) "
                              "during training ([enforce")
    assert "The memory planner (lowvram.memory) says, for this model with optimizer='adamw' " \
           "within the CPU's limit of " in message
    assert "fp16" not in message  # a CPU runs fp16 as fp32 (n76)
    assert "close other programs that use much RAM" in message
    assert not (tmp_path / "oom" / LOCK_FILE).exists()
    run(tmp_path / "again", max_steps=1)  # the next run can start an Accelerator again


# ----------------------------------------------------------------------------- Ctrl-C


def test_interrupted_message_drops_resume_and_overwrite(tmp_path):
    assert interrupted_message(tmp_path, ["--preset", "tiny"]) == (
        f"interrupted: no checkpoint was saved yet in {tmp_path}; start again with the same command")
    (tmp_path / "checkpoints" / "step_000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000003" / "manifest.json").write_text("{}")
    line = interrupted_message(tmp_path, ["--preset", "tiny", "--overwrite-output-dir",
                                          "--resume-from", "x", "--resume-from=y", "--seed", "3"])
    assert line.endswith("resume with: python -m lowvram.train --preset tiny --seed 3 "
                         "--resume-from latest")


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, monkeypatch, capsys):
    # before: a KeyboardInterrupt traceback
    write_data(tmp_path / "data", 32)
    real_save = lowvram.checkpoints.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C right after the first checkpoint

    monkeypatch.setattr(lowvram.checkpoints, "save_checkpoint", save_then_interrupt)
    with pytest.raises(SystemExit) as info:
        main(_cli(tmp_path, "--max-steps", "4", "--checkpoint-every", "2"))
    assert info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted: the last checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step_000002'}; "
                   f"resume with: python -m lowvram.train --preset tiny --data-dir {tmp_path / 'data'} "
                   f"--output-dir {tmp_path / 'out'} --no-progress --max-steps 4 "
                   "--checkpoint-every 2 --resume-from latest")
    monkeypatch.undo()
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # the lock went with it
    main(_cli(tmp_path, "--max-steps", "4", "--checkpoint-every", "2", "--resume-from", "latest"))
    assert latest_checkpoint(tmp_path / "out").name == "step_000004"
