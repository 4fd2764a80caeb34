"""Two small file helpers that the data cache, the checkpoints and history.json share.

    from lowvram._files import atomic_write, sha256_file
    atomic_write(path, lambda tmp: tmp.write_text(text))   # a crash leaves no half file
    sha256_file(path)                                        # hex digest, read in 4 MiB blocks

Only the standard library: importing it loads no other lowvram module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "sha256_file"]


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (about 1-2 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and move tmp onto ``path``: a crash leaves no half file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only dir: keep the first error, not this one
            tmp.unlink(missing_ok=True)
        raise
