"""notebooks/train_accelerate.py, the lesson's script corrected: the same losses as train(), and
it runs under `accelerate launch` for 1 and 2 CPU processes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import MODEL, REPO, TRAIN, free_port, write_data

import lowvram.train
from lowvram.train import reset_accelerate_state

SCRIPT = REPO / "notebooks" / "train_accelerate.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _script():
    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(args: list[str], tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    done = subprocess.run([*ACCELERATE, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"Step \d+, Loss: ([\d.]+)", stdout)]


def test_script_losses_equal_train(tmp_path, capsys):
    """Same preset (tiny), seed and data: every optimizer step's loss equals train()'s."""
    data = tmp_path / "data"
    write_data(data, 20)  # 10 batches of 2, accumulation 2: 5 optimizer steps, 1 epoch
    config = TRAIN.replace(data_dir=str(data), output_dir=str(tmp_path / "run"))
    history = lowvram.train.train(MODEL, config, progress=False)
    try:
        losses = _script().main(["--preset", "tiny", "--data-dir", str(data), "--log-every", "1"])
    finally:
        reset_accelerate_state()
    expected = [s["loss"] for s in history["steps"]]
    assert len(losses) == len(expected) == 5  # tiny: num_epochs=1 in the preset
    assert losses == pytest.approx(expected, abs=1e-6)
    out = capsys.readouterr().out
    assert "precision: no | processes: 1 | effective batch: 4 | steps: 5" in out
    assert "Epoch 0, Step 5, Loss:" in out and "Epoch 0, val loss:" in out


def test_script_max_steps_and_precision_order(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_data(data, 20)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` sets it
    try:
        losses = _script().main(["--preset", "tiny", "--data-dir", str(data), "--max-steps", "7"])
        assert "precision: bf16 |" in capsys.readouterr().out
        reset_accelerate_state()  # a new Accelerator with another precision in this process
        _script().main(["--preset", "tiny", "--data-dir", str(data), "--max-steps", "1",
                        "--mixed-precision", "no"])  # the flag beats accelerate's
        assert "precision: no |" in capsys.readouterr().out
    finally:
        reset_accelerate_state()
    assert len(losses) == 7 and all(torch.isfinite(torch.tensor(losses)))  # 2 epochs


@pytest.mark.slow
def test_accelerate_launch_one_and_two_cpu_processes(tmp_path):
    """2 processes x accumulation 1 train like 1 process x accumulation 2 (data-parallel, gloo)."""
    data = tmp_path / "data"
    write_data(data, 16)
    common = [str(SCRIPT), "--preset", "tiny", "--data-dir", str(data), "--log-every", "1"]
    one = _launch(["--num_processes", "1", *common], tmp_path)
    two = _launch(["--multi_gpu", "--num_processes", "2", "--main_process_port",
                   str(free_port()), *common, "--gradient-accumulation-steps", "1"], tmp_path)
    assert "processes: 1 | effective batch: 4 | steps: 4" in one
    assert "processes: 2 | effective batch: 4 | steps: 4" in two
    assert len(_losses(one)) == len(_losses(two)) == 4
    assert _losses(two) == pytest.approx(_losses(one), abs=2e-4)  # printed to 4 decimals


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_script_trains_fp16_on_cuda(tmp_path, capsys):
    """On a GPU the script runs the preset's precision for real: fp16 autocast + GradScaler."""
    data = tmp_path / "data"
    write_data(data, 20)
    try:
        losses = _script().main(["--preset", "tiny", "--data-dir", str(data),
                                 "--mixed-precision", "fp16", "--log-every", "1"])
    finally:
        reset_accelerate_state()
    assert "precision: fp16 | processes: 1" in capsys.readouterr().out
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
