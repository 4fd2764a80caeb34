"""The notebooks' first cell: versions, device and the precision that will run."""

import platform
import socket
import warnings
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch

from lowvram.environment import (
    LIBRARIES,
    environment_info,
    environment_summary,
    training_device,
)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def rtx2050(monkeypatch):
    """torch believes it sees one RTX 2050 (GA107: compute capability 8.6, 4 GiB, bf16)."""
    props = SimpleNamespace(
        name="NVIDIA GeForce RTX 2050", total_memory=4 * 2**30, major=8, minor=6
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_cpu_summary_lists_versions_device_and_the_precision_that_runs(no_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fp16 -> fp32 warning must not leak into a notebook
        lines = environment_summary("fp16").splitlines()
    python = ".".join(platform.python_version_tuple()[:2])
    assert lines[:6] == [
        f"python        {python}",
        f"torch         {torch.__version__}",
        f"accelerate    {metadata.version('accelerate')}",
        f"transformers  {metadata.version('transformers')}",
        f"tokenizers    {metadata.version('tokenizers')}",
        "device        CPU (torch sees no CUDA GPU)",
    ]
    assert lines[6] == "precision     requested 'fp16' -> runs 'no' (fp32)"
    reason = " ".join(line.strip() for line in lines[7:])
    assert reason.startswith("fp16 was requested on cpu")
    assert all(line.startswith(" " * 14) and len(line) <= 90 for line in lines[7:])


@pytest.mark.parametrize(("requested", "runs"), [("no", "no"), ("fp16", "no"), ("bf16", "bf16")])
def test_cpu_precision_follows_resolve_precision(no_gpu, requested, runs):
    info = environment_info(requested)
    assert info["requested_precision"] == requested
    assert info["precision"] == runs
    assert training_device() == torch.device("cpu")


@pytest.mark.parametrize(
    ("requested", "runs", "label"),
    [("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"), ("no", "no", "fp32")],
)
def test_gpu_summary_names_the_card_and_keeps_fp16(rtx2050, requested, runs, label):
    summary = environment_summary(requested)
    assert training_device() == torch.device("cuda")
    assert (
        "device        CUDA: NVIDIA GeForce RTX 2050, 4.0 GiB, compute capability 8.6\n" in summary
    )
    assert f"precision     requested {requested!r} -> runs {runs!r} ({label})" in summary
    if runs == "fp16":
        assert "GradScaler" in summary


def test_several_gpus_are_counted_without_initialising_cuda(rtx2050, monkeypatch):
    # notebook_launcher (25_4) forks one process per GPU and refuses once CUDA is initialised
    def initialises_cuda(*args):
        raise AssertionError("the summary initialised CUDA")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", initialises_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", initialises_cuda)
    device = environment_info("fp16")["device"]
    assert device == "CUDA: 2 GPUs (not queried here, so that notebook_launcher can fork)"


def test_summary_shows_nothing_machine_specific(no_gpu):
    # stored in every notebook and compared by nbval on another machine (CI)
    summary = environment_summary("fp16")
    assert "/" not in summary  # no paths
    assert socket.gethostname() not in summary
    assert platform.python_version() not in summary  # only major.minor: patch levels vary
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert environment_summary("fp16") == summary  # the thread count does not show
    finally:
        torch.set_num_threads(threads)


def test_every_library_is_listed():
    info = environment_info("no")
    assert set(LIBRARIES) <= set(info)
    assert all(info[name] not in ("", "not installed") for name in LIBRARIES)


def test_unknown_precision_is_refused_with_the_value():
    with pytest.raises(ValueError, match=r"mixed_precision='fp8'.*'no'.*'fp16'.*'bf16'"):
        environment_summary("fp8")


def _fake_machine(monkeypatch, *, cuda_build: str | None, nvidia_smi: bool, proc_driver: bool):
    """torch's build (torch.version.cuda) and what the machine says about an NVIDIA driver."""
    import os
    import shutil

    import lowvram.environment as env

    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # make test hides CUDA with it
    real_which, real_exists = shutil.which, os.path.exists
    monkeypatch.setattr(
        env.shutil,
        "which",
        lambda name: ("/usr/bin/nvidia-smi" if nvidia_smi else None)
        if name == "nvidia-smi"
        else real_which(name),
    )
    monkeypatch.setattr(
        env.os.path,
        "exists",
        lambda path: proc_driver if path == "/proc/driver/nvidia/version" else real_exists(path),
    )


@pytest.mark.parametrize(("nvidia_smi", "proc_driver"), [(True, False), (False, True)])
def test_a_cpu_build_on_a_gpu_machine_is_said_loudly_first(monkeypatch, nvidia_smi, proc_driver):
    from lowvram.environment import CUDA_TORCH_FIX, cpu_build_on_gpu_machine

    _fake_machine(monkeypatch, cuda_build=None, nvidia_smi=nvidia_smi, proc_driver=proc_driver)
    problem = cpu_build_on_gpu_machine()
    assert problem is not None and problem.startswith("WARNING: this machine has an NVIDIA GPU")
    assert "CPU build" in problem and CUDA_TORCH_FIX in problem
    summary = environment_summary("fp16")
    assert summary.startswith(problem)  # before the versions, where a learner looks first
    assert "torch==2.13.0" in CUDA_TORCH_FIX and "--index-url" in CUDA_TORCH_FIX


@pytest.mark.parametrize(("cuda_build", "nvidia_smi"), [(None, False), ("12.8", False)])
def test_no_warning_without_a_gpu_or_with_a_cuda_build(monkeypatch, cuda_build, nvidia_smi):
    """A CPU machine says nothing, with a CPU build or Linux's PyPI torch (a CUDA build)."""
    from lowvram.environment import cpu_build_on_gpu_machine, gpu_left_unused

    _fake_machine(monkeypatch, cuda_build=cuda_build, nvidia_smi=nvidia_smi, proc_driver=False)
    assert cpu_build_on_gpu_machine() is None and gpu_left_unused() is None
    assert environment_summary("fp16").startswith("python ")


def test_the_fix_pins_the_torch_that_ci_installs():
    """The CUDA command installs the same torch version as the Makefile's CI default."""
    from pathlib import Path

    from lowvram.environment import CUDA_TORCH_FIX

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    pinned = next(line.split("?=")[1].strip() for line in makefile.splitlines()
                  if line.startswith("TORCH_SPEC ?="))
    assert pinned in CUDA_TORCH_FIX


@pytest.mark.parametrize(("platform_name", "methods", "skipped"), [
    ("win32", ["spawn"], True),
    ("linux", ["fork", "spawn", "forkserver"], False),
    ("darwin", ["spawn", "fork", "forkserver"], False),
    ("emscripten", ["spawn"], True),  # any platform without fork
])
def test_notebook_launcher_cell_skips_itself_where_there_is_no_fork(
    monkeypatch, platform_name, methods, skipped
):
    import multiprocessing
    import sys

    from lowvram.environment import notebook_launcher_problem

    monkeypatch.setattr(sys, "platform", platform_name)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: methods)
    problem = notebook_launcher_problem(2)
    assert (problem is not None) == skipped
    if skipped:
        assert problem.startswith("skipped:") and "fork()" in problem
        assert "accelerate launch --multi_gpu --num_processes 2" in problem and "WSL2" in problem
    assert notebook_launcher_problem(1) is None  # one process runs in the kernel: no fork


def test_verify_gpu_says_loudly_that_torch_is_a_cpu_build(monkeypatch, capsys):
    from lowvram import memory
    from lowvram.environment import CUDA_TORCH_FIX

    _fake_machine(monkeypatch, cuda_build=None, nvidia_smi=True, proc_driver=False)
    assert memory.main(["--preset", "tiny", "--verify-gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("WARNING: this machine has an NVIDIA GPU") and CUDA_TORCH_FIX in err
    assert "error: --verify-gpu needs a CUDA GPU" in err


# --------------------------------------------------------------- a CUDA build on an old driver

_SMI = """Fri Dec  4 14:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA GeForce RTX 2050        Off |   00000000:01:00.0 Off |                  N/A |
"""


def _driver(monkeypatch, *, smi: str | None = None, proc: str | None = None) -> None:
    """What nvidia-smi prints (None: missing or failing) and /proc/driver/nvidia/version holds."""
    import lowvram.environment as env

    monkeypatch.setattr(env, "_run_nvidia_smi", lambda: smi)
    monkeypatch.setattr(env, "_read_proc_driver", lambda: proc)


@pytest.mark.parametrize(("smi", "proc", "expected"), [
    (_SMI.format(driver="550.54.15", cuda="12.4"), None, ("550.54.15", (12, 4))),
    (_SMI.format(driver="572.16", cuda="12.8"), None, ("572.16", (12, 8))),  # Windows
    (_SMI.format(driver="580.65.06", cuda="13.0"), None, ("580.65.06", (13, 0))),
    # without a working nvidia-smi: the driver from /proc, the CUDA from its branch (at least)
    (None, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 "
           "UTC 2023\nGCC version:  gcc version 12.3.0", ("535.104.05", (12, 0))),
    (None, "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.07  Release Build",
     ("570.133.07", (12, 8))),
    (None, "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02", ("470.256.02", None)),
    (None, None, (None, None)),
])  # fmt: skip
def test_the_drivers_version_and_cuda_are_read(monkeypatch, smi, proc, expected):
    from lowvram.environment import nvidia_driver

    _driver(monkeypatch, smi=smi, proc=proc)
    assert nvidia_driver() == expected


@pytest.mark.parametrize(("driver_cuda", "wheel"), [
    ((13, 1), "cu130"), ((13, 0), "cu130"), ((12, 9), "cu128"), ((12, 8), "cu128"),
    ((12, 7), "cu126"), ((12, 6), "cu126"),
    ((12, 2), "cu126"),  # CUDA 12 minor version compatibility: any 12.x driver (>= 525)
    ((11, 8), None),  # no CUDA 11 build of this torch
])  # fmt: skip
def test_the_wheel_for_a_driver(driver_cuda, wheel):
    from lowvram.environment import cuda_wheel_for

    assert cuda_wheel_for(driver_cuda) == wheel


@pytest.mark.parametrize(("driver", "cuda", "wheel"), [
    ("550.54.15", "12.4", "cu126"), ("572.16", "12.8", "cu128"), ("565.90", "12.7", "cu126"),
])  # fmt: skip
def test_a_cuda_13_build_on_a_cuda_12_driver_names_the_wheel_that_runs(monkeypatch, driver,
                                                                       cuda, wheel):
    from lowvram.environment import (
        cpu_build_on_gpu_machine,
        cuda_build_on_old_driver,
        cuda_torch_fix,
        gpu_left_unused,
    )

    _fake_machine(monkeypatch, cuda_build="13.0", nvidia_smi=True, proc_driver=False)
    _driver(monkeypatch, smi=_SMI.format(driver=driver, cuda=cuda))
    problem = cuda_build_on_old_driver()
    assert problem is not None and problem.startswith("WARNING: this machine has an NVIDIA GPU")
    assert "(a CUDA 13.0 build) cannot use it: torch.cuda.is_available() is False" in problem
    assert f"The driver is too old for a CUDA 13.0 build (driver {driver}: CUDA up to {cuda})" \
        in problem
    assert f"\n    {cuda_torch_fix(wheel)}\n" in problem
    assert "or update the NVIDIA driver (a driver >= 580 runs every build" in problem
    assert cpu_build_on_gpu_machine() is None and gpu_left_unused() == problem
    assert environment_summary("fp16").startswith(problem + "\n")  # first, as the CPU build's


def test_a_driver_too_old_for_any_build_says_update_it(monkeypatch):
    from lowvram.environment import cuda_build_on_old_driver

    _fake_machine(monkeypatch, cuda_build="12.8", nvidia_smi=True, proc_driver=False)
    _driver(monkeypatch, smi=_SMI.format(driver="470.256.02", cuda="11.4"))
    problem = cuda_build_on_old_driver()
    assert "too old for a CUDA 12.8 build (driver 470.256.02: CUDA up to 11.4)" in problem
    assert "CUDA 12 needs a driver >= 525): update the NVIDIA driver" in problem
    assert "pip install" not in problem


def test_an_unreadable_driver_version_says_how_to_read_it(monkeypatch):
    from lowvram.environment import cuda_build_on_old_driver, cuda_torch_fix

    _fake_machine(monkeypatch, cuda_build="13.0", nvidia_smi=False, proc_driver=True)
    _driver(monkeypatch)  # nvidia-smi fails, /proc unreadable
    problem = cuda_build_on_old_driver()
    assert "probably too old for CUDA 13.0" in problem and "run nvidia-smi" in problem
    assert cuda_torch_fix("cu126") in problem


def test_a_new_enough_driver_is_not_blamed(monkeypatch):
    from lowvram.environment import cuda_build_on_old_driver

    _fake_machine(monkeypatch, cuda_build="12.8", nvidia_smi=True, proc_driver=False)
    _driver(monkeypatch, smi=_SMI.format(driver="580.65.06", cuda="13.0"))
    problem = cuda_build_on_old_driver()
    assert "The driver is not too old (driver 580.65.06: CUDA up to 13.0)" in problem
    assert "torch.cuda.init()" in problem and "too old for" not in problem


def test_no_old_driver_warning_where_torch_uses_the_gpu_or_it_is_hidden(monkeypatch):
    from lowvram.environment import cuda_build_on_old_driver

    _fake_machine(monkeypatch, cuda_build="13.0", nvidia_smi=True, proc_driver=False)
    _driver(monkeypatch, smi=_SMI.format(driver="550.54.15", cuda="12.4"))
    assert cuda_build_on_old_driver() is not None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose (make test's nbval)
    assert cuda_build_on_old_driver() is None
    assert environment_summary("fp16").startswith("python ")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_build_on_old_driver() is None


def test_train_warns_once_it_knows_the_gpu_is_left_unused(monkeypatch, tmp_path):
    from conftest import run

    _fake_machine(monkeypatch, cuda_build="13.0", nvidia_smi=True, proc_driver=False)
    _driver(monkeypatch, smi=_SMI.format(driver="550.54.15", cuda="12.4"))
    with pytest.warns(UserWarning, match="The driver is too old for a CUDA 13.0 build"):
        run(tmp_path / "auto", max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # asked for the CPU: nothing to say
        run(tmp_path / "cpu", max_steps=1, cpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_working_gpu_is_not_reported_and_its_driver_is_read():
    """On a real GPU: nothing to warn, and the real nvidia-smi header parses (a driver that
    runs this CUDA build supports at least its CUDA major version)."""
    from lowvram.environment import gpu_left_unused, nvidia_driver

    assert gpu_left_unused() is None
    driver, cuda = nvidia_driver()
    assert driver is not None and int(driver.split(".")[0]) >= 450
    assert cuda is not None and cuda[0] >= int(torch.version.cuda.split(".")[0])


def test_training_device_follows_cpu(no_gpu):
    assert training_device(cpu=True) == torch.device("cpu")
    assert training_device(cpu=None) == torch.device("cpu")
    with pytest.raises(ValueError, match="cpu=False but no CUDA GPU is visible"):
        training_device(cpu=False)


def test_training_device_cpu_true_on_a_gpu_machine(rtx2050):
    assert training_device(cpu=True) == torch.device("cpu")
    assert training_device(cpu=False) == torch.device("cuda")


def test_one_process_launch(monkeypatch):
    from lowvram.environment import one_process_launch

    for name in ("MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert one_process_launch() is None  # plain python
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "accelerate launch --multi_gpu --num_processes 2" in one_process_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: several processes
    assert one_process_launch() is None


@pytest.mark.parametrize(("cores", "threads", "processes", "expected"),
                         [(2, 3, 2, 1), (8, 3, 2, 3), (8, 8, 2, 4), (2, 2, 4, 1)])
def test_cpu_processes_never_oversubscribe_the_cores(monkeypatch, cores, threads, processes,
                                                     expected):
    from lowvram.environment import threads_per_process

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert threads_per_process(processes) == expected
