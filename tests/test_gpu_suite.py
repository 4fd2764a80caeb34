"""``make test-gpu``'s orchestration (tests/gpu_suite.py) on the CPU: what it does without CUDA,
how it goes on past a failing part, and the summary it writes. The parts themselves need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gpu_suite
import pytest
from conftest import REPO


def test_without_a_gpu_every_part_is_skipped_and_the_exit_status_is_0(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "cuda_state", lambda: ("none", "no CUDA: no NVIDIA GPU"))
    assert gpu_suite.run_suite(out=tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"] == "SKIPPED: no CUDA on this machine (exit 0)"
    assert set(summary["parts"]) == set(gpu_suite.PARTS)
    assert all(p["skipped"] for p in summary["parts"].values())
    assert "[SKIPPED] notebooks" in (tmp_path / "summary.txt").read_text()


def test_a_gpu_that_torch_cannot_use_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "cuda_state", lambda: ("broken", "a GPU, a CPU build of torch"))
    assert gpu_suite.run_suite(out=tmp_path) == 1
    assert "FAILED: a GPU, a CPU build of torch" in (tmp_path / "summary.txt").read_text()


def test_a_failing_or_crashing_part_does_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "cuda_state", lambda: ("ok", "CUDA: a fake GPU"))
    ran = []

    def part(name, result):
        def run(out, seconds):
            ran.append(name)
            assert seconds > 0
            if result is None:
                raise RuntimeError("boom")
            return result
        return run

    runners = {
        "pytest": part("pytest", {"passed": False, "summary": "1 failed, 7 passed"}),
        "notebooks": part("notebooks", {"passed": True, "summary": "12 of 12", "notebooks": {
            "25_0_hazirliq.ipynb": {"passed": True, "seconds": 3.0, "error": None}}}),
        "plan": part("plan", None),
        "bench": part("bench", {"passed": True, "summary": "3 configurations", "table": "| t |"}),
    }
    assert gpu_suite.run_suite(out=tmp_path, runners=runners, budget=60) == 1
    assert sorted(ran) == sorted(gpu_suite.PARTS) and ran[-1] == "bench"  # the bench alone, last
    text = (tmp_path / "summary.txt").read_text()
    assert "[FAILED] pytest" in text and "1 failed, 7 passed" in text
    assert "[FAILED] plan" in text and "the part crashed: RuntimeError: boom" in text
    assert "[passed] notebooks" in text and "ok   25_0_hazirliq.ipynb (3 s)" in text
    assert "bench:\n| t |" in text
    assert text.rstrip().endswith("RESULT: FAILED: pytest, plan")


def test_only_the_parts_asked_for_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "cuda_state", lambda: ("ok", "CUDA: a fake GPU"))
    runners = {name: (lambda out, s: {"passed": True, "summary": "ok"}) for name in gpu_suite.PARTS}
    assert gpu_suite.run_suite(["plan"], out=tmp_path, runners=runners) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["parts"]) == ["plan"] and summary["result"] == "PASSED: every part"


def test_results_go_to_OUT_when_it_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    assert gpu_suite.out_dir() == tmp_path / "device-out"
    monkeypatch.delenv("OUT")
    assert gpu_suite.out_dir() == REPO / "build" / "gpu"


def test_notebook_kernels_import_this_repository(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env = gpu_suite.child_env()
    assert env["PYTHONPATH"].split(":")[:2] == [str(REPO), "/elsewhere"]
    assert "MPLBACKEND" not in env and env["PYTHONHASHSEED"] == "0"


def test_every_notebook_and_solution_is_in_the_run():
    paths = gpu_suite.notebook_paths()
    names = {p.name for p in paths}
    assert {p.name for p in (REPO / "notebooks").glob("*.ipynb")} <= names
    assert {p.name for p in (REPO / "notebooks" / "solutions").glob("*.ipynb")} <= names


@pytest.mark.slow  # starts two Jupyter kernels
def test_a_notebook_that_raises_is_reported_failed_with_its_error(tmp_path):
    pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    good, bad = tmp_path / "25_8_good.ipynb", tmp_path / "25_9_bad.ipynb"
    for path, code in ((good, "print(1 + 1)"), (bad, "raise ValueError('broken cell')")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, path)
    result = gpu_suite.part_notebooks(tmp_path / "out", timeout=120, notebooks=[good, bad])
    assert not result["passed"]
    assert result["notebooks"]["25_8_good.ipynb"]["passed"]
    assert "broken cell" in result["notebooks"]["25_9_bad.ipynb"]["error"]
    assert result["summary"] == "1 of 2 notebooks ran on CUDA without an error; failed: 25_9_bad.ipynb"
    executed = nbformat.read(tmp_path / "out" / "notebooks" / "25_8_good.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "2\n"


def test_the_makefile_target_runs_the_suite():
    makefile = (REPO / "Makefile").read_text()
    assert "test-gpu: install data\n\tPYTHONHASHSEED=0 $(PY) tests/gpu_suite.py --budget $(GPU_BUDGET)\n" in makefile
    assert f"GPU_BUDGET ?= {gpu_suite.BUDGET_S}\n" in makefile
    proc = subprocess.run([sys.executable, "tests/gpu_suite.py", "--parts", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--parts nope is not allowed" in proc.stderr


def _plan_row(recipe: str, error: float, passed: bool | None) -> dict:
    MiB = 2**20
    if passed is None:
        return {"recipe": recipe, "micro_batch": 16, "gradient_accumulation_steps": 1,
                "planned_fits": True, "passed": None, "note": "skipped: no bitsandbytes"}
    return {"recipe": recipe, "micro_batch": 4, "gradient_accumulation_steps": 4,
            "predicted_allocated_bytes": 3200 * MiB, "measured_allocated_bytes": 3232 * MiB,
            "allocated_error": error, "predicted_reserved_bytes": 3300 * MiB,
            "measured_reserved_bytes": 3310 * MiB, "outcome": "fits", "passed": passed,
            "note": "" if passed else f"allocated peak off by {error:+.1%} (tolerance 3%)"}


def test_plan_part_reads_the_rows_past_a_stray_line_and_fails_on_a_bad_row(tmp_path, monkeypatch):
    rows = [_plan_row("fp16", -0.01, True), _plan_row("fp16 + fused", -0.05, False),
            _plan_row("fp16 + 8-bit", 0, None)]
    stdout = "a library's banner\n" + json.dumps(rows, indent=2) + "\n"
    seen = []

    def fake_run(cmd, log, timeout, cwd=REPO):
        seen.append(cmd)
        return 1, stdout

    monkeypatch.setattr(gpu_suite, "run_command", fake_run)
    result = gpu_suite.part_plan(tmp_path, 100)
    assert seen[0][2:] == ["lowvram.verify", "--preset", "rtx2050", "--plan", "--card-gib", "4",
                           "--context-mib", "270.0", "--json"]
    assert not result["passed"]
    assert result["summary"] == ("1 of 2 fitting plan rows trained 2 steps under a 4 GiB cap with "
                                 "the allocated peak within 3% of the prediction; failed: "
                                 "fp16 + fused; 1 not run (see the table)")
    assert json.loads((tmp_path / "plan_rows.json").read_text()) == rows
    assert "| fp16 + fused | 4 x 4 | 3,200 | 3,232 | -5.0% |" in (tmp_path / "plan_rows.md").read_text()
    monkeypatch.setattr(gpu_suite, "run_command", lambda *a, **k: (None, "half a line"))
    assert gpu_suite.part_plan(tmp_path, 100) == {
        "passed": False, "summary": "timed out after 100 s (see plan_rows.log)"}


def test_bench_part_writes_json_and_the_readme_section(tmp_path, monkeypatch):
    from test_bench import _gpu_results

    results = _gpu_results()  # the second row paired, with its interval (a list, as in JSON)
    results["rows"][1].update(method="paired", ratio_interval=[1.01, 1.06])
    stdout = "precision: fp16 (...)\n" + json.dumps(results, indent=1)
    monkeypatch.setattr(gpu_suite, "run_command", lambda *a, **k: (0, stdout))
    result = gpu_suite.part_bench(tmp_path, 100)
    assert result["passed"]
    assert result["summary"] == (
        "2 configurations measured, train() / plain loop: fp16 4 x 4 (the lesson's) 1.281, goal "
        "met: no; bf16 4 x 4 1.020 (95%: 1.010-1.060), goal met: not decided (the interval holds "
        "the goal)")
    assert json.loads((tmp_path / "bench_gpu.json").read_text()) == results
    section = (tmp_path / "bench_gpu.md").read_text()
    assert "- **GPU:** NVIDIA H200" in section and "| **1.281** |" in section
    monkeypatch.setattr(gpu_suite, "run_command", lambda *a, **k: (1, "Traceback ..."))
    assert gpu_suite.part_bench(tmp_path, 100)["summary"] == "exit status 1, no JSON (see bench_gpu.log)"


def test_a_timeout_ends_the_command_and_what_it_started(tmp_path):
    import os
    import time

    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(120)\n")
    t0 = time.monotonic()
    rc, out = gpu_suite.run_command([sys.executable, "-c", code], tmp_path / "log", timeout=3)
    assert rc is None and time.monotonic() - t0 < 60
    assert "== timed out after 3 s" in (tmp_path / "log").read_text()
    grandchild = int(out.split()[0])
    time.sleep(0.5)
    try:  # gone, or a zombie waiting for its reaper: not running either way
        state = (Path(f"/proc/{grandchild}/status").read_text().split("State:")[1].split()[0]
                 if os.path.exists(f"/proc/{grandchild}") else "gone")
    except OSError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_cuda_state_names_why_a_present_gpu_goes_unused(monkeypatch):
    import shutil

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(gpu_suite.os.path, "exists", lambda path: False)
    assert gpu_suite.cuda_state()[0] == "none"
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # nvidia-smi is there
    state, line = gpu_suite.cuda_state()
    assert state == "broken" and "cannot use it (torch.cuda.is_available() is False)" in line
    if torch.version.cuda is None:  # this CPU build: the environment check's own words and fix
        assert "is a CPU build (torch.version.cuda is None)" in line


@pytest.mark.parametrize(("rc", "stdout", "passed"), [
    (0, "tests/test_gpu.py::test_a PASSED\n=== 12 passed, 353 deselected in 60.1s ===\n", True),
    (0, "=== 12 skipped, 353 deselected in 21.0s ===\n", False),  # no test saw the GPU
    (1, "=== 1 failed, 11 passed in 70.0s ===\n", False),
    (None, "tests/test_gpu.py::test_a PASSED\n", False),  # timed out
])
def test_pytest_part_passes_only_when_gpu_tests_ran_and_passed(tmp_path, monkeypatch, rc, stdout, passed):
    monkeypatch.setattr(gpu_suite, "run_command", lambda *a, **k: (rc, stdout))
    result = gpu_suite.part_pytest(tmp_path, 100)
    assert result["passed"] is passed
    if rc is None:
        assert result["summary"] == "timed out after 100 s"
    else:
        assert result["summary"] == stdout.strip().splitlines()[-1].strip("= ")


def test_notebooks_that_share_a_run_dir_or_the_launcher_run_one_after_the_other(tmp_path):
    sources = {
        "25_1_train.ipynb": 'train(output_dir="runs/cpu-demo")',
        "25_2_plan.ipynb": "plan()",
        "25_3_read.ipynb": 'json.load(open("runs/cpu-demo/history.json"))',
        "25_4_launch.ipynb": "notebook_launcher(main, num_processes=2)",
        "25_5_shell.ipynb": "!accelerate launch -m lowvram.train",
        "25_2_heller.ipynb": "check()",
    }
    paths = []
    for name, source in sources.items():
        (tmp_path / name).write_text(json.dumps({"cells": [{"source": source}]}))
        paths.append(tmp_path / name)
    lanes = [[p.name for p in lane] for lane in gpu_suite.notebook_lanes(paths)]
    assert sorted(lanes) == [["25_1_train.ipynb", "25_3_read.ipynb"],  # one run dir
                             ["25_2_heller.ipynb"],  # a solution beside its lesson
                             ["25_2_plan.ipynb"],
                             ["25_4_launch.ipynb", "25_5_shell.ipynb"]]  # the launcher's port
