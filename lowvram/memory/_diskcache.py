"""The planner's recordings kept on disk: a step recorded once on a machine is not recorded
again, in this process or the next (a notebook re-run, the command line after the notebook).

Private: :func:`lowvram.memory.tracker.record_fake` reads and writes it. Layer 4 of the package
(``_allocator`` -> ``report`` -> ``replay`` -> ``_diskcache`` -> ``tracker`` -> ...): it stores
:class:`~lowvram.memory.replay.Recording` objects and imports no torch at import time.

Why a cache on top of a faster recording: a recording is every ATen op of the step through
``FakeTensorMode`` at ~100 us each: 1.5-2 s for the lesson's 12-layer model on one core, or
0.4-0.6 s at the 2 or 3 layers that :mod:`lowvram.memory.depth` builds it from; a plan still
makes about 25 of those. A recording depends only on the step's arguments, the torch version
and lowvram's own code, so it is keyed on exactly those: any change to lowvram's source or
another torch records afresh (the old entries are then never read, and the oldest code
versions' folders are removed).

Where: ``$LOWVRAM_CACHE_DIR`` if set (empty, ``0`` or ``off``: no disk cache), else
``$XDG_CACHE_HOME/lowvram/recordings`` (``~/.cache/...``; ``%LOCALAPPDATA%`` on Windows). A
file that cannot be read back (truncated by a crash, another format) is removed and the step is
recorded again; a cache that cannot be written (read-only, full disk) is skipped with one
warning: the plan stays the same, only slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from lowvram._files import atomic_write
from lowvram.memory.replay import Recording

__all__ = ["cache_dir", "load", "store"]

KEEP_VERSIONS = 4  # folders of older code versions beyond these (least recently used) are removed
_OFF = {"", "0", "off", "no", "false"}
_warned: list[str] = []


def cache_dir() -> Path | None:
    """The folder of this code version's recordings, or None when the disk cache is off."""
    env = os.environ.get("LOWVRAM_CACHE_DIR")
    if env is not None:
        if env.strip().lower() in _OFF:
            return None
        root = Path(env).expanduser()
    elif sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        root = Path(os.environ["LOCALAPPDATA"], "lowvram", "recordings")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base, "lowvram", "recordings")
    return root / _code_version()


@lru_cache(maxsize=1)
def _code_version() -> str:
    """A digest of what a recording depends on besides its arguments: the torch and Python
    versions and every source file of the lowvram package."""
    import torch

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"{torch.__version__}|{sys.version_info[:2]}".encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _path(folder: Path, args: tuple[Any, ...]) -> Path:
    # the arguments are frozen dataclasses, strings, numbers and tuples: their repr is stable
    return folder / (hashlib.sha256(repr(args).encode()).hexdigest()[:32] + ".pkl")


def load(args: tuple[Any, ...]) -> Recording | None:
    """The recording stored for ``record_fake(*args)`` by this code version, or None."""
    folder = cache_dir()
    if folder is None:
        return None
    path = _path(folder, args)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        stored_args, recording = pickle.loads(data)
        ok = stored_args == args and isinstance(recording, Recording)
    except Exception:  # noqa: BLE001 -- a truncated or foreign file: record the step again
        ok = False
    if not ok:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(folder)  # this code version is in use: keep it over older ones
    return recording


def store(args: tuple[Any, ...], recording: Recording) -> None:
    """Keep ``recording`` for ``record_fake(*args)``; on failure warn once and go on."""
    folder = cache_dir()
    if folder is None:
        return
    fresh = not folder.exists()
    data = pickle.dumps((args, recording), protocol=pickle.HIGHEST_PROTOCOL)
    try:
        atomic_write(_path(folder, args), lambda tmp: tmp.write_bytes(data))
    except OSError as e:
        if not _warned:
            _warned.append(str(folder))
            warnings.warn(
                f"could not keep the memory planner's recordings in {folder} ({e}): plans stay "
                "the same, only slower (each step is recorded again). Set LOWVRAM_CACHE_DIR to "
                "a writable folder, or to 'off'.", RuntimeWarning, stacklevel=3)
        return
    if fresh:
        _prune(folder.parent, keep=folder)


def _prune(root: Path, keep: Path) -> None:
    """Remove the folders of all but the ``KEEP_VERSIONS`` most recently used code versions."""
    with contextlib.suppress(OSError):
        others = sorted((p for p in root.iterdir() if p.is_dir() and p != keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP_VERSIONS - 1:]:
            shutil.rmtree(old, ignore_errors=True)
