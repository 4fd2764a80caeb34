"""A run's output directory: its files, the disk it is on, and who may write to it.

    from lowvram.outputdir import check_output_dir, OutputDirLock
    check_output_dir(Path("runs/cpu-demo"), resume=False, overwrite=False, num_parameters=n)

An output directory holds one run: ``history.json``, ``model.safetensors`` and
``checkpoints/step_XXXXXX`` (``lowvram.checkpoints``). ``lowvram.train.train`` relies on this:

- **It belongs to one run, whatever the route in.** A fresh run, or a run resumed from a
  checkpoint *outside* the directory, into a directory that holds a run's checkpoints, model
  or history is refused unless ``overwrite_output_dir`` (which deletes them first; the
  checkpoint resumed from is never under them). Resuming another run's checkpoint into a new
  or empty directory works. A run resumed from one of the directory's own checkpoints
  (``--resume-from latest`` or its path) was checked by ``lowvram.checkpoints`` to be this
  run's; its later checkpoints (an abandoned timeline, or another run's) are moved aside into
  ``checkpoints/abandoned-<time>/``, kept and named, so ``latest`` never picks them.
- **One writer at a time.** An atomic lock (``fcntl.flock`` on ``.lowvram.lock``, which also
  holds the writer's host and pid); a dead writer's lock is free again and replaced.
- **Checked before training:** a directory, writable, with room for one checkpoint. A disk that
  fills later is named (with its mount point) in the error.
- **history.json is written atomically:** a crash leaves the old one or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # POSIX: an atomic lock that the kernel drops when its process dies
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

from lowvram._files import atomic_write

__all__ = [
    "CHECKPOINTS_DIR",
    "HISTORY_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OutputDirInUseError",
    "OutputDirLock",
    "check_output_dir",
    "claim_output_dir",
    "complete_checkpoints",
    "disk_full",
    "disk_full_error",
    "latest_checkpoint",
    "overwrite_output_dir",
    "set_aside_later_checkpoints",
    "save_model_and_history",
    "write_history",
]

HISTORY_FILE = "history.json"
MODEL_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"  # a checkpoint's last file: step, configs, identity, file hashes
_COMPLETE = re.compile(r"step_\d{6,}")  # a complete checkpoint's directory name
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


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # not POSIX
        return False


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def disk_full(path: Path, err: BaseException) -> bool:
    """True if ``err``, raised while writing under ``path``, means the disk (or quota) is full."""
    text = str(err)
    if "No space left on device" in text or "(os error 28)" in text:  # safetensors' Rust error
        return True
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


def _run_files(output_dir: Path) -> list[str]:
    """The names of a run's files in ``output_dir``: checkpoints, model, history."""
    return [n for n in (CHECKPOINTS_DIR, MODEL_FILE, HISTORY_FILE)
            if os.path.lexists(output_dir / n)]  # fmt: skip


def _inside(path: Path, directory: Path) -> bool:
    """``path`` lies under ``directory`` (its parents resolved; ``path`` itself may be a link
    to a checkpoint elsewhere: it still is an entry of ``directory``)."""
    try:
        return (Path(path).absolute().parent.resolve() / Path(path).name).is_relative_to(
            directory.resolve())
    except OSError:
        return False


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool,
                     num_parameters: int, resume_from: Path | None = None) -> None:
    """Refuse, before training, an output dir that cannot take this run's files.

    It must be (or become) a writable directory with room for one checkpoint
    (``12 bytes x parameters``: fp32 weights and AdamW's two moments), and it must not mix
    with another run's files unless ``overwrite``: a fresh run (``resume=False``) and a run
    resumed from a checkpoint outside ``output_dir/checkpoints`` (``resume_from``) need a
    directory without checkpoints, model or history.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"output_dir={str(output_dir)!r} is a file, not a directory: choose another "
            "--output-dir (or move the file away)"
        )
    external = resume and resume_from is not None and not _inside(
        resume_from, output_dir / CHECKPOINTS_DIR)
    if (not resume or external) and not overwrite:
        found = _run_files(output_dir)
        if found and not resume:
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} already holds another run's "
                f"{', '.join(found)}: a fresh run there would mix with it. Resume it "
                "(--resume-from latest / resume_from='latest'), choose another --output-dir, or "
                "replace it (--overwrite-output-dir / overwrite_output_dir=True)"
            )
        if found:
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} already holds another run's "
                f"{', '.join(found)}, and the checkpoint to resume, {resume_from}, is not one of "
                "its checkpoints: continuing there would overwrite that run's model and history "
                "and rotate away its checkpoints. Choose another --output-dir (a new or empty "
                "one: the resumed run continues there), or replace that run "
                f"(--overwrite-output-dir deletes its {', '.join(found)} first; {resume_from} "
                "itself is kept)"
            )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"output_dir={str(output_dir)!r} cannot be created ({type(err).__name__}: "
            f"{err.strerror or err}): choose another --output-dir"
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK) and _read_only_mount(output_dir):
        raise PermissionError(  # n77: chmod cannot help there
            f"output_dir={str(output_dir)!r} is on a read-only file system (mounted at "
            f"{_mount_point(output_dir)}): choose another --output-dir on a writable disk"
        )
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

    Taking it is atomic: the file is held with ``fcntl.flock`` (an exclusive, non-blocking
    lock that the kernel drops when the process dies, however it dies), so two processes can
    never both hold it, and a killed run's lock is free again at once. The file also holds
    the writer's host and pid, for the messages: a leftover file of a dead writer is replaced
    with a line through ``log``; one that names a live process (or another host) that does
    not hold the lock is respected (a hand-written lock, or a lowvram from before flock).
    Without ``fcntl`` (Windows) the file is created with ``O_CREAT | O_EXCL`` instead.
    """

    def __init__(self, output_dir: Path, log: Callable[[str], None] = print) -> None:
        self.path = output_dir / LOCK_FILE
        self.log = log
        self.held = False
        self._fd: int | None = None

    def _owner(self) -> tuple[str, int] | None:
        try:
            return _parse_owner(self.path.read_text())
        except OSError:
            return None

    def _in_use(self, owner: tuple[str, int] | None) -> OutputDirInUseError:
        who = f"pid {owner[1]} on {owner[0]}" if owner else "a process that is starting"
        return OutputDirInUseError(
            f"another training ({who}) is writing to {self.path.parent}: wait for it, stop it, "
            f"or choose another --output-dir. (If no such training runs, delete {self.path}.)"
        )

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover (Windows)
            self._acquire_exclusive()
            return
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(100):  # a retry only when the file was replaced under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise OutputDirInUseError(
                    f"{self.path} is a directory, not lowvram's lock file: remove it "
                    f"(rmdir {self.path}) and start again"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process holds it
                os.close(fd)
                raise self._in_use(self._owner()) from None
            # held; but a releasing writer may have unlinked this file meanwhile: then the
            # lock that counts is the file now at self.path (or none yet). Try again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            text = os.read(fd, 4096).decode(errors="replace")
            owner = _parse_owner(text)
            if owner is not None and not _is_stale(*owner) and owner != (socket.gethostname(), os.getpid()):
                os.close(fd)  # named, alive, but not flock-ing: respect it
                raise self._in_use(owner)
            if text.strip():
                self.log(f"removing a stale lock {self.path} (pid {owner[1] if owner else '?'} "
                         "is gone)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            self._fd, self.held = fd, True
            return
        raise OutputDirInUseError(f"could not take the lock {self.path}: other trainings keep "
                                  "replacing it; try again")

    def _acquire_exclusive(self) -> None:  # pragma: no cover (Windows: no fcntl)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or not _is_stale(*owner):  # empty: a writer is starting
                    raise self._in_use(owner) from None
                self.log(f"removing a stale lock {self.path} (pid {owner[1]} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise OutputDirInUseError(f"could not take the lock {self.path}: another training took it first")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)  # while still held: nobody takes the old file
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.held = False

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse_owner(text: str) -> tuple[str, int] | None:
    try:
        host, pid = text.split()[:2]
        return host, int(pid)
    except ValueError:
        return None


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
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    if checkpoints_dir.is_symlink() or checkpoints_dir.is_file():
        checkpoints_dir.unlink()
    else:
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
    for name in (MODEL_FILE, HISTORY_FILE):
        (output_dir / name).unlink(missing_ok=True)


def claim_output_dir(accelerator, lock: OutputDirLock, *, fresh: bool, overwrite: bool,
                     num_parameters: int, resume_from: Path | None = None) -> None:
    """Every process checks the output dir (:func:`check_output_dir`); then the main process
    takes its lock and, for ``overwrite``, deletes the earlier run's files (of a fresh run, or
    of one resumed from a checkpoint outside the dir). A run resumed from one of the dir's own
    checkpoints moves the later ones aside (:func:`set_aside_later_checkpoints`)."""
    output_dir = lock.path.parent
    check_output_dir(output_dir, resume=not fresh, overwrite=overwrite,
                     num_parameters=num_parameters, resume_from=resume_from)
    accelerator.wait_for_everyone()  # every process checked the dir before it changes
    if accelerator.is_main_process:
        lock.acquire()
        checkpoints_dir = output_dir / CHECKPOINTS_DIR
        if resume_from is not None and _inside(resume_from, checkpoints_dir):
            set_aside_later_checkpoints(checkpoints_dir, resume_from, log=lock.log)
        elif overwrite and (fresh or resume_from is not None):
            overwrite_output_dir(output_dir)
    accelerator.wait_for_everyone()  # nobody reads the dir before it is settled


# ----------------------------------------------------------------------------- its checkpoints


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints (renamed into place, manifest present), oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        p for p in checkpoints_dir.iterdir()
        if _COMPLETE.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len("step_"):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None.

    A save that was interrupted (``step_XXXXXX.tmp``) is never returned. (``train`` with
    ``resume_from="latest"`` also skips checkpoints of another run:
    :func:`lowvram.checkpoints.resolve_checkpoint`.)
    """
    complete = complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIR)
    return complete[-1] if complete else None


def _step_of(name: str) -> int | None:
    return int(name[5:]) if _COMPLETE.fullmatch(name) else None


def set_aside_later_checkpoints(checkpoints_dir: Path, resume_from: Path,
                                log: Callable[[str], None] = print) -> Path | None:
    """Move the checkpoints past ``resume_from``'s step into ``abandoned-<time>/`` (kept).

    A run that continues from an older checkpoint of its own directory (a redo, or ``latest``
    next to another run's later checkpoint) starts a new timeline: the later checkpoints
    belong to the abandoned one. Left in place, ``latest`` (the highest step) would pick
    them, and a save of the same step would replace one. Returns the folder, or None.
    """
    step = _step_of(resume_from.name)
    if step is None:
        return None
    later = sorted((p for p in checkpoints_dir.iterdir()
                    if (_step_of(p.name) or -1) > step), key=lambda p: p.name)  # fmt: skip
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = checkpoints_dir / f"abandoned-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = checkpoints_dir / f"abandoned-{stamp}-{n}"
    aside.mkdir()
    for p in later:
        os.replace(p, aside / p.name)
    log(f"resuming from {resume_from.name} starts a new timeline: the later checkpoints "
        f"{', '.join(p.name for p in later)} (of the abandoned timeline, or of another run) were "
        f"moved to {aside}, kept; `latest` will not pick them. Delete that folder when you no "
        "longer need them (or move them back to continue that timeline)")
    return aside


def save_model_and_history(accelerator, model, output_dir: Path, history: dict[str, Any]) -> None:
    """model.safetensors and history.json at the end of training, and the closing line.

    The model is written next to its place and renamed into it (a crash leaves the old file
    or the new one); a full disk is named, with the checkpoint that holds the same weights.
    """
    accelerator.wait_for_everyone()
    tmp = output_dir / ".model.tmp"  # one name for every process; the lock keeps others out
    try:
        accelerator.save_model(model, str(tmp))  # unwraps; -> model.safetensors
        # Every process enters save_model (it creates and lists the folder; only the main one
        # writes): the main process must not move or remove the folder before all have left it.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp / MODEL_FILE, output_dir / MODEL_FILE)
            write_history(output_dir, history)
    except Exception as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(output_dir, err):
            last = latest_checkpoint(output_dir)
            kept = (f"The last checkpoint, {last}, holds the trained weights: after freeing "
                    "space, --resume-from latest writes the model again without training" if last
                    else "No checkpoint holds these weights")
            raise disk_full_error(output_dir, None, f"Writing {MODEL_FILE} (or {HISTORY_FILE}) "
                                  f"failed and its partial file was removed. {kept}.") from None
        raise
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    skipped_note = ""
    if accelerator.scaler is not None:  # fp16: say how many updates the GradScaler dropped
        skipped_note = f" ({history['skipped_steps']} skipped by the GradScaler: fp16 overflow)"
    accelerator.print(
        f"final val loss {history['final_val_loss']:.4f} after {len(history['steps'])} steps"
        f"{skipped_note}; wrote {output_dir / MODEL_FILE} and {output_dir / HISTORY_FILE}"
    )
