"""Helpers shared by the tests: random rows, a tiny run, weights on disk; the no-download guard."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import lowvram.corpus
import lowvram.train
from lowvram.config import ModelConfig, TrainConfig, get_preset
from lowvram.data import random_rows
from lowvram.precision import force_grad_scaler

# Every test records its memory steps afresh (the planner's disk cache is off here, and in the
# processes the tests start): the cache's own tests turn it on in a temporary folder.
os.environ["LOWVRAM_CACHE_DIR"] = "off"

REPO = Path(__file__).resolve().parents[1]
MODEL, TRAIN = get_preset("tiny")  # vocab 96, block 16, 2 x 2 x 32; batch 2 x accum 2


def free_port() -> int:
    """A TCP port that is free now, for a multi-process test's rendezvous: a fixed one collides
    with another run of the same tests on the machine (two checkouts, parallel test parts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(n: int, seed: int = 0, model: ModelConfig = MODEL) -> torch.Tensor:
    """``n`` random rows of block_size + 1 token ids (the package's one helper)."""
    return random_rows(model, n, seed)


@contextlib.contextmanager
def forced_fp16(init_scale: float = 2.0**16):
    """``train`` runs fp16 autocast with a GradScaler on the CPU, as on the 4 GB card.

    The precision policy is patched to answer "fp16", and ``train``'s Accelerator is one that
    forces the GradScaler (``force_grad_scaler``) as soon as it is created, before ``prepare``.
    """
    reason = "fp16 autocast with a GradScaler forced on the CPU (demonstration)"

    class ForcedFp16Accelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            force_grad_scaler(self, init_scale=init_scale)

    with mock.patch.object(lowvram.train, "resolve_precision",
                           lambda requested, device: ("fp16", reason)), \
            mock.patch.object(lowvram.train, "Accelerator", ForcedFp16Accelerator):
        yield


def run(out: Path, model: ModelConfig = MODEL, n_train: int = 32, *, fp16: bool = False,
        init_scale: float = 2.0**16, **kwargs) -> dict:
    """Train ``model`` (tiny) on ``n_train`` random rows into ``out``; return the history.

    TrainConfig fields in ``kwargs`` change the config; the rest go to ``train``. ``fp16``:
    fp16 autocast with a GradScaler on the CPU (:func:`forced_fp16`).
    """
    changes = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainConfig.__dataclass_fields__}
    train_config = TRAIN.replace(output_dir=str(out), **changes)
    with forced_fp16(init_scale) if fp16 else contextlib.nullcontext():
        return lowvram.train.train(model, train_config, train_data=rows(n_train, model=model),
                                   val_data=rows(8, seed=1, model=model), progress=False, **kwargs)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def write_data(data_dir: Path, n_train: int) -> None:
    """The learner's "own" train_data.pt / val_data.pt in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rows(n_train), data_dir / "train_data.pt")
    torch.save(rows(8, seed=1), data_dir / "val_data.pt")


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly if anything tries to download the corpus (tests/test_data.py, test_corpus.py)."""

    def refuse(dest, progress):
        raise AssertionError("the test tried to download the corpus")

    # patched where ensure_corpus looks it up: lowvram.data only re-exports the corpus's names
    monkeypatch.setattr(lowvram.corpus, "_download_archive", refuse)
