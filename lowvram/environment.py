"""The versions-and-device cell that opens every notebook, written once.

    from lowvram.environment import environment_summary
    print(environment_summary("fp16"))     # the precision the notebook asks for

prints the library versions, the device that ``lowvram.train.train`` will use, and which
precision will actually run there and why (``lowvram.precision.resolve_precision``, the one place
that decides it). Every notebook calls this function instead of pasting its own checks, so the
first cells of the series cannot drift apart.

Its output is stored in the notebooks and re-checked by nbval in CI, so it shows only what is
pinned (the versions in ``constraints.txt`` and ``TORCH_SPEC``) or decided (the device type and
the precision): no thread counts, host names, paths or host memory. On a GPU the card's name and
memory are shown; a learner's stored outputs are theirs to differ.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata

import torch

from lowvram.precision import PRECISION_LABELS, resolve_precision

__all__ = [
    "CUDA_TORCH_FIX",
    "CUDA_WHEELS",
    "LIBRARIES",
    "cpu_build_on_gpu_machine",
    "cuda_build_on_old_driver",
    "cuda_torch_fix",
    "cuda_wheel_for",
    "environment_info",
    "environment_summary",
    "gpu_left_unused",
    "notebook_launcher_problem",
    "nvidia_driver",
    "one_process_launch",
    "threads_per_process",
    "training_device",
    "warn_if_gpu_left_unused",
]

# The libraries whose versions a learner compares first when a notebook misbehaves.
LIBRARIES = ("torch", "accelerate", "transformers", "tokenizers")

# PyTorch's CUDA wheel indexes (its install page lists cu126, cu128 and cu130 for its recent
# releases), newest first: (index, the CUDA it is built for, the oldest driver branch whose
# nvidia-smi shows that "CUDA Version"). nvidia-smi's "CUDA Version" is the newest CUDA the
# driver supports. The driver numbers, as NVIDIA documents them:
# - the CUDA Toolkit release notes, table "CUDA Toolkit and Corresponding Driver Versions"
#   (Linux): CUDA 13.0 GA >= 580.65.06, 12.8 GA >= 570.26, 12.6 GA >= 560.28.03;
# - the CUDA Compatibility guide, "Minor Version Compatibility" (docs.nvidia.com/deploy/
#   cuda-compatibility/minor-version-compatibility.html), table 1: CUDA 13.x needs a driver
#   >= 580, CUDA 12.x >= 525, CUDA 11.x >= 450. So a cu126 (or cu128) wheel also runs on a
#   CUDA 12.0-12.5 driver (525-559), with a limited feature set, and nothing of CUDA 13 does.
CUDA_WHEELS = (("cu130", (13, 0), 580), ("cu128", (12, 8), 570), ("cu126", (12, 6), 560))
_CUDA12_MINIMUM_DRIVER = 525  # the oldest driver a CUDA 12.x build runs on (minor version compat.)


def cuda_torch_fix(index: str = "cu130") -> str:
    """The command that installs the CUDA build (wheel ``index``, e.g. ``"cu128"``) of the torch
    that constraints.txt and the stored outputs are made for. The exact version pin makes pip
    fail loudly, instead of falling back to a CPU build, if the index lacks it."""
    return (
        "pip install --force-reinstall torch==2.13.0 "
        f"--index-url https://download.pytorch.org/whl/{index}"
    )


# The one command that replaces a CPU build of torch with the CUDA build (the newest index:
# a driver >= 580, whose nvidia-smi shows "CUDA Version: 13.0" or newer).
CUDA_TORCH_FIX = cuda_torch_fix("cu130")

_LABEL_WIDTH = 14


def training_device(cpu: bool | None = None) -> torch.device:
    """The device ``lowvram.train.train(cpu=...)`` trains on. ``cpu=None``: the first CUDA GPU,
    else the CPU; ``True``: the CPU; ``False``: the GPU, and a ValueError if there is none.

    Read from torch, not from an ``Accelerator``: creating accelerate's state in the kernel would
    make a later ``notebook_launcher`` refuse to start.
    """
    if cpu is False and not torch.cuda.is_available():
        raise ValueError("cpu=False but no CUDA GPU is visible: use cpu=None (the GPU if any)")
    return torch.device("cuda" if not cpu and torch.cuda.is_available() else "cpu")


def threads_per_process(num_processes: int) -> int:
    """Threads for each of several CPU processes: never more than their share of the cores.

    More threads than cores in all only spin-wait on each other: OMP_NUM_THREADS=3 (set for one
    process) in each of 2 processes on 2 cores made notebook 25_4's launched run several times
    slower. accelerate keeps such a variable as it is, so ``train`` applies this share.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(torch.get_num_threads(), max(1, (cores or 1) // num_processes))


def cpu_build_on_gpu_machine() -> str | None:
    """A warning when this machine has an NVIDIA GPU but torch is a CPU build, else None.

    The usual way a Windows RTX 2050 laptop ends up training on its CPU: pip took PyPI's torch,
    which is CPU-only on Windows. The GPU is detected without torch (``nvidia-smi`` on the PATH,
    or the Linux driver's ``/proc/driver/nvidia/version``), since a CPU build cannot see it.
    """
    if torch.version.cuda is not None:  # a CUDA build: torch.cuda reports the GPU itself
        return None
    if not _nvidia_driver_present():
        return None
    return (
        f"WARNING: this machine has an NVIDIA GPU (its driver is installed), but torch "
        f"{torch.__version__} is a CPU build (torch.version.cuda is None), so everything "
        f"runs on the CPU. Install the CUDA build:\n    {CUDA_TORCH_FIX}"
    )


def _nvidia_driver_present() -> bool:
    """An NVIDIA driver is installed (seen without torch, which a CPU build cannot ask)."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


def _run_nvidia_smi() -> str | None:
    """``nvidia-smi``'s output, or None where it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_proc_driver() -> str | None:
    """Linux's ``/proc/driver/nvidia/version``, or None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.read()
    except OSError:
        return None


def nvidia_driver() -> tuple[str | None, tuple[int, int] | None]:
    """The NVIDIA driver's version and the newest CUDA it supports, e.g. ``("550.54.15", (12, 4))``.

    Read from the header of ``nvidia-smi`` ("Driver Version: 550.54.15 ... CUDA Version: 12.4").
    Without a working nvidia-smi the version comes from Linux's ``/proc/driver/nvidia/version``
    and the CUDA from its branch (the oldest branch that shows it, :data:`CUDA_WHEELS`: a lower
    bound). ``(None, None)`` where neither says.
    """
    version, cuda = None, None
    text = _run_nvidia_smi()
    if text:
        found = re.search(r"Driver Version:\s*(\d+(?:\.\d+)*)", text)
        version = found.group(1) if found else None
        found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
        cuda = (int(found.group(1)), int(found.group(2))) if found else None
    if version is None:  # "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64]  535.104.05 ..."
        found = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)",
                          _read_proc_driver() or "")
        version = found.group(1) if found else None
    if cuda is None and version is not None:
        branch = int(version.split(".")[0])
        cuda = next((c for _, c, oldest in CUDA_WHEELS if branch >= oldest), None)
        if cuda is None and branch >= _CUDA12_MINIMUM_DRIVER:
            cuda = (12, 0)
    return version, cuda


def cuda_wheel_for(driver_cuda: tuple[int, int]) -> str | None:
    """The newest CUDA wheel index of torch a driver supporting CUDA ``driver_cuda`` runs, or None.

    ``(12, 4)`` -> ``"cu126"``: a CUDA 12.x build runs on any CUDA 12 driver (>= 525) through
    minor version compatibility; below CUDA 12 no wheel of this torch runs: update the driver.
    """
    for index, cuda, _ in CUDA_WHEELS:
        if driver_cuda >= cuda:
            return index
    return CUDA_WHEELS[-1][0] if driver_cuda[0] == 12 else None


def _parse_cuda(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def cuda_build_on_old_driver() -> str | None:
    """A warning when torch is a CUDA build that cannot use this machine's NVIDIA GPU, else None.

    The case: an NVIDIA driver is installed (``nvidia-smi`` or ``/proc/driver/nvidia``),
    ``torch.version.cuda`` is set, but ``torch.cuda.is_available()`` is False. Usually the driver
    is older than the build's CUDA (e.g. the default cu130 wheel on a laptop whose driver shows
    "CUDA Version: 12.4"); the fix is the wheel the driver runs, or a newer driver. Nothing is
    said where CUDA_VISIBLE_DEVICES is set: the GPU was hidden on purpose (``make test`` does).
    """
    build = torch.version.cuda
    if build is None or "CUDA_VISIBLE_DEVICES" in os.environ or not _nvidia_driver_present():
        return None
    if torch.cuda.is_available():
        return None
    driver, driver_cuda = nvidia_driver()
    head = (
        f"WARNING: this machine has an NVIDIA GPU, but torch {torch.__version__} (a CUDA "
        f"{build} build) cannot use it: torch.cuda.is_available() is False, so everything runs "
        "on the CPU."
    )
    update = ("or update the NVIDIA driver (a driver >= 580 runs every build: cu130, cu128, "
              "cu126)")
    if driver_cuda is None:
        return (
            f"{head} Its driver is probably too old for CUDA {build} (its version could not be "
            "read: run nvidia-smi, whose 'CUDA Version' is the newest CUDA the driver supports). "
            "Install the build for that CUDA version (cu130: 13.0 or newer; cu128: 12.8; cu126: "
            f"any 12.x), e.g.\n    {cuda_torch_fix('cu126')}\n{update}"
        )
    shown = f"driver {driver or '(version unknown)'}: CUDA up to {driver_cuda[0]}.{driver_cuda[1]}"
    if driver_cuda >= _parse_cuda(build):
        return (
            f"{head} The driver is not too old ({shown}): see torch's own reason with "
            "python -c \"import torch; torch.cuda.init()\" (after a driver update without a "
            "reboot, reboot)"
        )
    wheel = cuda_wheel_for(driver_cuda)
    fix = (f"Install the build this driver runs:\n    {cuda_torch_fix(wheel)}\n{update}" if wheel
           else "No build of this torch runs on it (CUDA 12 needs a driver >= 525): update the "
                "NVIDIA driver")
    return f"{head} The driver is too old for a CUDA {build} build ({shown}). {fix}"


def gpu_left_unused() -> str | None:
    """Why the NVIDIA GPU of this machine goes unused (a CPU build of torch, or a CUDA build its
    driver is too old for), with the fix; None where there is no such GPU or torch uses it."""
    return cpu_build_on_gpu_machine() or cuda_build_on_old_driver()


def warn_if_gpu_left_unused(cpu: bool | None = None) -> str | None:
    """``train``'s warning (a UserWarning) of :func:`gpu_left_unused`, unless ``cpu`` asked for the
    CPU (``lowvram.train.train(cpu=True)``); returns what it warned, or None."""
    problem = gpu_left_unused() if cpu is None else None
    if problem:
        warnings.warn(problem, UserWarning, stacklevel=3)  # points at the caller of train()
    return problem


def notebook_launcher_problem(num_processes: int) -> str | None:
    """Why ``accelerate.notebook_launcher(..., num_processes)`` cannot run here, else None.

    With more than one process, accelerate's ``notebook_launcher`` starts them with
    ``start_method="fork"`` (its source: ``torch.multiprocessing.start_processes(...,
    start_method="fork")``). Windows has no ``fork()``, so there it fails; a notebook cell asks
    this first and skips itself with the message instead of failing.
    """
    if num_processes <= 1:
        return None  # one process: notebook_launcher calls the function in the kernel itself
    if sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods():
        return (
            f"skipped: notebook_launcher needs fork() to start {num_processes} processes from a "
            f"notebook, and {sys.platform} has none. Run the same training as a script in a "
            f"terminal instead: accelerate launch --multi_gpu --num_processes {num_processes} "
            f"-m lowvram.train --preset cpu-demo (or use WSL2, where fork works)"
        )
    return None


def one_process_launch() -> str | None:
    """A warning when ``accelerate launch`` was asked for several processes but started one.

    accelerate's "simple" launcher sets MASTER_ADDR only for --num_processes > 1, yet starts
    one process: ``accelerate launch --cpu --num_processes 2`` trains on one process.
    """
    if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" in os.environ:
        return None
    return (
        "this is one process although accelerate launch was asked for several: with --cpu it "
        "starts only one (without mpirun). On a machine without a GPU use `accelerate launch "
        "--multi_gpu --num_processes 2 -m lowvram.train ...` (or `torchrun --nproc_per_node 2 "
        "-m lowvram.train ...`): each process then trains on the CPU, data-parallel over gloo"
    )


def _version(package: str) -> str:
    if package == "torch":
        return torch.__version__  # the installed build, e.g. 2.13.0+cpu or 2.5.1+cu121
    try:
        return metadata.version(package)  # no import: transformers alone costs ~1-2 s
    except metadata.PackageNotFoundError:
        return "not installed"


def _describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU (torch sees no CUDA GPU)"
    count = torch.cuda.device_count()  # does not initialise CUDA
    if count > 1:
        # notebook_launcher forks one process per GPU and refuses once CUDA is initialised
        # in the kernel; reading a card's properties would initialise it
        return f"CUDA: {count} GPUs (not queried here, so that notebook_launcher can fork)"
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    return f"CUDA: {props.name}, {gib:.1f} GiB, compute capability {props.major}.{props.minor}"


def environment_info(requested_precision: str = "fp16") -> dict[str, str]:
    """The summary's rows as a dict: versions, ``device``, ``precision`` and ``precision_reason``.

    Args:
        requested_precision: what the notebook asks for (``"no"``, ``"fp16"`` or ``"bf16"``).

    Returns:
        ``{"python": "3.11", "torch": ..., "device": "CPU (...)", "precision": "no", ...}``;
        ``precision`` is what will run (accelerate's name, ``"no"`` meaning fp32).
    """
    device = training_device()
    with warnings.catch_warnings():
        # resolve_precision warns when it runs something other than what was requested; the
        # summary prints that reason itself, and a warning would also print this file's path
        warnings.simplefilter("ignore", UserWarning)
        precision, reason = resolve_precision(requested_precision, device)
    info = {"python": ".".join(platform.python_version_tuple()[:2])}  # 3.11: patch levels vary
    info.update({name: _version(name) for name in LIBRARIES})
    info.update(
        device=_describe_device(device),
        requested_precision=requested_precision,
        precision=precision,
        precision_reason=reason,
    )
    return info


def environment_summary(requested_precision: str = "fp16") -> str:
    """A few aligned lines for a notebook's first cell: versions, device, precision and why."""
    info = environment_info(requested_precision)
    lines = [f"{name:<{_LABEL_WIDTH}}{info[name]}" for name in ("python", *LIBRARIES)]
    lines.append(f"{'device':<{_LABEL_WIDTH}}{info['device']}")
    requested, runs = info["requested_precision"], info["precision"]
    lines.append(
        f"{'precision':<{_LABEL_WIDTH}}requested {requested!r} -> runs {runs!r} "
        f"({PRECISION_LABELS[runs]})"
    )
    indent = " " * _LABEL_WIDTH
    lines += textwrap.wrap(
        info["precision_reason"], width=90, initial_indent=indent, subsequent_indent=indent
    )
    problem = gpu_left_unused()
    if problem:  # loud, first: every other line is about the CPU it will run on
        lines.insert(0, problem + "\n")
    return "\n".join(lines)
