"""The cache of prepared rows and its checksums, private to :mod:`lowvram.data`.

``data/v{vocab}-b{block}/meta.json`` records what the rows were made from (the sizes, the
corpus's and the tokenizer's sha256) and the sha256 of ``train_data.pt`` and ``val_data.pt``
when they were written. ``prepare_data`` reuses a split only while all of them still match
(:func:`cached`), and ``load_datasets`` refuses a prepared split that changed on the disk
(:func:`split_problem`). The corpus's and the tokenizer's own ``.sha256`` records are
:mod:`lowvram.corpus`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowvram._files import sha256_file
from lowvram.corpus import _atomic_write, _say

META_FILE = "meta.json"  # written last: it marks a complete split


def meta_path(out_dir: Path) -> Path:
    return out_dir / META_FILE


def read_meta(out_dir: Path) -> dict | None:
    """``out_dir``'s meta.json, or None (missing, unreadable, or not JSON)."""
    try:
        return json.loads(meta_path(out_dir).read_text())
    except (OSError, ValueError):
        return None


def source_meta(vocab_size: int, block_size: int, val_fraction: float, corpus: Path,
                tokenizer: Path) -> dict[str, Any]:
    """What a split is made from: its sizes, and the sha256 of the corpus and the tokenizer."""
    return {
        "vocab_size": vocab_size,
        "block_size": block_size,
        "val_fraction": val_fraction,
        "corpus_sha256": sha256_file(corpus),
        "tokenizer_sha256": sha256_file(tokenizer),
    }


def split_problem(train: Path, val: Path, meta: dict) -> str | None:
    """Why cached train/val tensors cannot be trusted (no checksum, or another one), or None."""
    for name, path in (("train", train), ("val", val)):
        recorded = meta.get(f"{name}_sha256")
        if recorded is None:
            return (f"{path} has no checksum in {meta_path(path.parent)} (made by an older "
                    "lowvram)")
        actual = sha256_file(path)
        if actual != recorded:
            return (f"{path} has sha256 {actual[:12]}..., but {META_FILE} "
                    f"recorded {recorded[:12]}... when it was made: it changed on the disk")
    return None


def cached(train: Path, val: Path, source: dict[str, Any]) -> bool:
    """True if ``train`` and ``val`` were made from ``source`` (:func:`source_meta`) and are
    unchanged since; a file that changed is said, and False (the rows are built again)."""
    meta = read_meta(train.parent)
    if meta is None or any(meta.get(k) != v for k, v in source.items()):
        return False
    if not (train.exists() and val.exists()):
        return False
    problem = split_problem(train, val, meta)
    if problem is not None:
        _say(f"{problem}: not trusted; the rows are built again")
    return problem is None


def write_split(train_path: Path, val_path: Path, train: torch.Tensor, val: torch.Tensor,
                meta: dict[str, Any]) -> None:
    """Write the two splits atomically, then meta.json with their checksums. meta.json goes
    first and comes back last, so an interrupted write leaves no split that looks complete."""
    meta_path(train_path.parent).unlink(missing_ok=True)
    _atomic_write(train_path, lambda tmp: torch.save(train, tmp))
    _atomic_write(val_path, lambda tmp: torch.save(val, tmp))
    # the tensors' checksums, recorded when they are made: load_datasets checks them
    meta = {**meta, "train_sha256": sha256_file(train_path), "val_sha256": sha256_file(val_path)}
    _atomic_write(meta_path(train_path.parent),
                  lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
