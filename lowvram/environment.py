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
import shutil
import sys
import textwrap
import warnings
from importlib import metadata

import torch

from lowvram.precision import PRECISION_LABELS, resolve_precision

__all__ = [
    "CUDA_TORCH_FIX",
    "LIBRARIES",
    "cpu_build_on_gpu_machine",
    "environment_info",
    "environment_summary",
    "notebook_launcher_problem",
    "one_process_launch",
    "threads_per_process",
    "training_device",
]

# The libraries whose versions a learner compares first when a notebook misbehaves.
LIBRARIES = ("torch", "accelerate", "transformers", "tokenizers")

# The one command that replaces a CPU build of torch with the CUDA build of the version that
# constraints.txt and the stored outputs are made for. PyTorch's install page lists cu126, cu128
# and cu130 wheel indexes for its recent releases; cu130 is the newest (driver >= 580). The exact
# version pin makes pip fail loudly, instead of falling back to a CPU build, if the index lacks it.
CUDA_TORCH_FIX = (
    "pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
)

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
    if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia/version"):
        return None
    return (
        f"WARNING: this machine has an NVIDIA GPU (its driver is installed), but torch "
        f"{torch.__version__} is a CPU build (torch.version.cuda is None), so everything "
        f"runs on the CPU. Install the CUDA build:\n    {CUDA_TORCH_FIX}"
    )


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
    problem = cpu_build_on_gpu_machine()
    if problem:  # loud, first: every other line is about the CPU it will run on
        lines.insert(0, problem + "\n")
    return "\n".join(lines)
