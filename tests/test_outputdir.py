"""lowvram.outputdir: an output dir holds one run, one writer at a time, checked before training.

Most tests are cases of an adversarial pass against the CLI and the Python API: what it did
before is in the comment, what it does now is asserted. Tiny preset, random rows, CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import checkpoints, run, write_data

import lowvram.checkpoints
import lowvram.outputdir
from lowvram.outputdir import (
    HISTORY_FILE,
    LOCK_FILE,
    MODEL_FILE,
    OutputDirInUseError,
    OutputDirLock,
    claim_output_dir,
    save_model_and_history,
    write_history,
)
from lowvram.train import main


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("four") / "run"
    run(out, max_steps=4, checkpoint_interval=2)
    return out


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data-dir", str(tmp_path / "data"), "--output-dir",
            str(tmp_path / "out"), "--no-progress", *extra]


# ----------------------------------------------------------------------------- history.json


def test_write_history_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    write_history(tmp_path / "run", {"steps": [1]})  # creates the directory
    assert json.loads((tmp_path / "run" / HISTORY_FILE).read_text()) == {"steps": [1]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_history(tmp_path / "run", {"steps": [object()]})  # fails while writing
    assert json.loads((tmp_path / "run" / HISTORY_FILE).read_text()) == {"steps": [1]}  # the old
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [HISTORY_FILE]  # no tmp left


# ----------------------------------------------------------------------------- the lock


def test_lock_refuses_a_live_writer_and_replaces_a_stale_one(tmp_path):
    lines = []
    with OutputDirLock(tmp_path, log=lines.append):
        assert (tmp_path / LOCK_FILE).read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not (tmp_path / LOCK_FILE).exists()  # released
    (tmp_path / LOCK_FILE).write_text(f"{socket.gethostname()} {os.getppid()}\n")  # alive
    with pytest.raises(OutputDirInUseError, match=rf"another training \(pid {os.getppid()} on "):
        OutputDirLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{socket.gethostname()} {dead.pid}\n")  # SIGKILLed run
    lock = OutputDirLock(tmp_path, log=lines.append)
    lock.acquire()
    assert lines == [f"removing a stale lock {tmp_path / LOCK_FILE} (pid {dead.pid} is gone)"]
    lock.release()


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_claim_output_dir_locks_and_overwrites_only_when_asked(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json").write_text("{}")  # another run's
    lock = OutputDirLock(out)
    with pytest.raises(FileExistsError, match="already holds another run's history.json"):
        claim_output_dir(_OneProcess(), lock, fresh=True, overwrite=False, num_parameters=10)
    assert not lock.held and (out / "history.json").exists()
    claim_output_dir(_OneProcess(), lock, fresh=False, overwrite=False, num_parameters=10)  # resume
    assert lock.held and (out / "history.json").exists()
    lock.release()
    claim_output_dir(_OneProcess(), lock, fresh=True, overwrite=True, num_parameters=10)
    assert lock.held and not (out / "history.json").exists()
    lock.release()


def test_two_trainings_into_one_dir(tmp_path):
    # before: both exited 0 and one run's results were silently gone
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live training
    with pytest.raises(OutputDirInUseError, match="another training .* is writing to"):
        run(out, max_steps=2)
    assert not (out / "history.json").exists()


# ----------------------------------------------------------------------------- one run per dir, checked before training


def test_fresh_run_into_a_used_dir_is_refused_unless_overwrite(tmp_path, four_steps):
    # before: step_2/4 replaced, the old step_6 survived, `latest` then resumed the other run
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    with pytest.raises(FileExistsError, match=r"already holds another run's checkpoints, "
                                              r"model.safetensors, history.json.*--overwrite-output-dir"):
        run(out, max_steps=2, checkpoint_interval=2, seed=5)
    assert checkpoints(out) == ["step_000002", "step_000004"]  # untouched
    history = run(out, max_steps=2, checkpoint_interval=2, seed=5, overwrite_output_dir=True)
    assert checkpoints(out) == ["step_000002"] and history["config"]["train"]["seed"] == 5
    assert not (out / LOCK_FILE).exists()


def test_output_dir_is_checked_before_training(tmp_path, monkeypatch):
    # before: NotADirectoryError / OSError at the first save, after the training
    trained = []
    monkeypatch.setattr(lowvram.checkpoints, "save_checkpoint",
                        lambda *a, **k: trained.append(1))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        run(a_file, max_steps=2)
    monkeypatch.setattr(lowvram.outputdir, "_free_bytes", lambda path: 1000)
    with pytest.raises(OSError, match=r"the disk holding .* \(mounted at .*\) is full: 0 MiB "
                                      r"free; one checkpoint of this model needs about 1 MiB\. "
                                      "Nothing was trained"):
        run(tmp_path / "full", max_steps=2)
    assert trained == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            run(ro, max_steps=2)
    finally:
        ro.chmod(0o700)


def test_cli_output_dir_errors_are_one_line(tmp_path, capsys):
    write_data(tmp_path / "data", 16)
    (tmp_path / "out").write_text("not a dir")
    with pytest.raises(SystemExit) as info:
        main(_cli(tmp_path, "--max-steps", "2"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: NotADirectoryError: output_dir=") and err.count("\n") == 1


def test_final_save_waits_for_every_process_to_leave_save_model(tmp_path):
    """accelerate's save_model creates and lists the folder in every process; only the main one
    writes. The main process must not move or remove the folder while a slower one is still in
    there (a 2-process CI run failed with FileNotFoundError on ``.model.tmp``)."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    class Process:  # what save_model_and_history uses of an Accelerator, one per "process"
        scaler = None

        def __init__(self, main: bool):
            self.is_main_process = main

        def wait_for_everyone(self):
            barrier.wait()

        def save_model(self, model, folder):
            if not self.is_main_process:
                time.sleep(0.3)  # the slower process
            os.makedirs(folder, exist_ok=True)  # as accelerate does, in every process
            os.listdir(folder)
            if self.is_main_process:
                Path(folder, MODEL_FILE).write_bytes(b"weights")

        def print(self, *args):
            pass

    history = {"final_val_loss": 1.0, "steps": [], "skipped_steps": 0}

    def one(main: bool):
        try:
            save_model_and_history(Process(main), None, tmp_path, history)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(m,)) for m in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / MODEL_FILE).read_bytes() == b"weights"
    assert not (tmp_path / ".model.tmp").exists()
    assert json.loads((tmp_path / HISTORY_FILE).read_text())["final_val_loss"] == 1.0
