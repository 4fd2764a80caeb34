"""A run's output directory: its files, the disk it is on, and who may write to it.

    from lowvram.outputdir import check_output_dir, OutputDirLock
    check_output_dir(Path("runs/cpu-demo"), resume=False, overwrite=False, num_parameters=n)

An output directory holds one run: ``history.json``, ``model.safetensors`` and
``checkpoints/step_XXXXXX`` (``lowvram.checkpoints``). ``lowvram.train.train`` relies on this:

- **It belongs to one run.** A fresh run into a directory that holds another run's
  checkpoints, model or history is refused unless ``overwrite_output_dir``.
- **One writer at a time.** A lock file holds the writer's host and pid; a dead writer's lock
  is stale and replaced.
- **Checked before training:** a directory, writable, with room for one checkpoint. A disk that
  fills later is named (with its mount point) in the error.
- **history.json is written atomically:** a crash leaves the old one or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowvram._files import atomic_write

__all__ = [
    "CHECKPOINTS_DIR",
    "HISTORY_FILE",
    "LOCK_FILE",
    "MODEL_FILE",
    "OutputDirInUseError",
    "OutputDirLock",
    "check_output_dir",
    "claim_output_dir",
    "disk_full",
    "disk_full_error",
    "overwrite_output_dir",
    "save_model_and_history",
    "write_history",
]

HISTORY_FILE = "history.json"
MODEL_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lowvram.lock"  # in the output dir while a training writes to it
_BYTES_PER_PARAMETER = 12  # one checkpoint: fp32 weights + AdamW's two moments


# ----------------------------------------------------------------------------- the disk


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() or not os.path.ismount(path):
        if path.parent == path:
            break
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def disk_full(path: Path, err: BaseException) -> bool:
    """True if ``err``, raised while writing under ``path``, means the disk (or quota) is full."""
    text = str(err)
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        # torch's zip writer turns ENOSPC into "PytorchStreamWriter failed writing file ...:
        # file write failed" or "... unexpected pos N vs M"
        isinstance(err, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)
    )


def disk_full_error(directory: Path, need: int | None, what: str) -> OSError:
    """The ENOSPC error a learner can act on: which disk, how much is free (and ``need``ed),
    ``what`` happened to the files, and what to do."""
    free = _free_bytes(directory) / 2**20
    needs = f"; one checkpoint of this model needs about {need / 2**20:.0f} MiB" if need else ""
    return OSError(
        errno.ENOSPC,
        f"the disk holding {directory} (mounted at {_mount_point(directory)}) is full: "
        f"{free:.0f} MiB free{needs}. {what} Free some space (old runs/, data caches) or choose "
        "another --output-dir, then resume with --resume-from latest",
    )


# ----------------------------------------------------------------------------- history.json


def write_history(output_dir: Path, history: dict[str, Any]) -> None:
    """history.json, written atomically (a crash leaves the old one or the new one)."""
    atomic_write(output_dir / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(history, indent=1)))


# ----------------------------------------------------------------------------- ownership


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool,
                     num_parameters: int) -> None:
    """Refuse, before training, an output dir that cannot take this run's files.

    It must be (or become) a writable directory with room for one checkpoint
    (``12 bytes x parameters``: fp32 weights and AdamW's two moments), and a fresh run
    (``resume=False``) must not mix with another run's files unless ``overwrite``.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"output_dir={str(output_dir)!r} is a file, not a directory: choose another "
            "--output-dir (or move the file away)"
        )
    if not resume and not overwrite:
        found = [n for n in (CHECKPOINTS_DIR, MODEL_FILE, HISTORY_FILE)
                 if (output_dir / n).exists()]  # fmt: skip
        if found:
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} already holds another run's "
                f"{', '.join(found)}: a fresh run there would mix with it. Resume it "
                "(--resume-from latest / resume_from='latest'), choose another --output-dir, or "
                "replace it (--overwrite-output-dir / overwrite_output_dir=True)"
            )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"output_dir={str(output_dir)!r} cannot be created ({type(err).__name__}: "
            f"{err.strerror or err}): choose another --output-dir"
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output_dir={str(output_dir)!r} is not writable: choose another --output-dir, or "
            f"make it writable (chmod u+w {output_dir})"
        )
    need = _BYTES_PER_PARAMETER * num_parameters + 2**20
    if _free_bytes(output_dir) < need:
        raise disk_full_error(output_dir, need, "Nothing was trained.")


class OutputDirInUseError(OSError):
    """Another training (a live process) holds the output dir's lock."""


class OutputDirLock:
    """``<output_dir>/.lowvram.lock`` while one training writes there (the main process's).

    The file holds the writer's host and pid. A lock whose process is gone (killed, the
    machine restarted) is stale: it is replaced, with a line through ``log``.
    """

    def __init__(self, output_dir: Path, log: Callable[[str], None] = print) -> None:
        self.path = output_dir / LOCK_FILE
        self.log = log
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()[:2]
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not _is_stale(*owner):
                    raise OutputDirInUseError(
                        f"another training (pid {owner[1]} on {owner[0]}) is writing to "
                        f"{self.path.parent}: wait for it, stop it, or choose another "
                        f"--output-dir. (If no such training runs, delete {self.path}.)"
                    ) from None
                self.log(f"removing a stale lock {self.path} (pid {owner[1] if owner else '?'} "
                         "is gone)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise OutputDirInUseError(f"could not take the lock {self.path}: another training took it first")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_stale(host: str, pid: int) -> bool:
    """The lock's writer is gone: this host and no such process (another host: not stale)."""
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False  # this process: a second train() in the same kernel while the first runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False


def overwrite_output_dir(output_dir: Path) -> None:
    """Delete an earlier run's checkpoints, model and history (``overwrite_output_dir``)."""
    shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
    for name in (MODEL_FILE, HISTORY_FILE):
        (output_dir / name).unlink(missing_ok=True)


def claim_output_dir(accelerator, lock: OutputDirLock, *, fresh: bool, overwrite: bool,
                     num_parameters: int) -> None:
    """Every process checks the output dir (:func:`check_output_dir`); then the main process
    takes its lock and, for ``overwrite``, deletes the earlier run's files."""
    output_dir = lock.path.parent
    check_output_dir(output_dir, resume=not fresh, overwrite=overwrite, num_parameters=num_parameters)
    accelerator.wait_for_everyone()  # every process checked the dir before it changes
    if accelerator.is_main_process:
        lock.acquire()
        if overwrite and fresh:
            overwrite_output_dir(output_dir)


def save_model_and_history(accelerator, model, output_dir: Path, history: dict[str, Any]) -> None:
    """model.safetensors and history.json at the end of training, and the closing line."""
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(output_dir))  # unwraps; -> model.safetensors
    if accelerator.is_main_process:
        write_history(output_dir, history)
    skipped_note = ""
    if accelerator.scaler is not None:  # fp16: say how many updates the GradScaler dropped
        skipped_note = f" ({history['skipped_steps']} skipped by the GradScaler: fp16 overflow)"
    accelerator.print(
        f"final val loss {history['final_val_loss']:.4f} after {len(history['steps'])} steps"
        f"{skipped_note}; wrote {output_dir / MODEL_FILE} and {output_dir / HISTORY_FILE}"
    )
