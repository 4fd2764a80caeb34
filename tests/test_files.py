"""lowvram._files: the one atomic write and the one file hash that data, checkpoints and
history.json share."""

from __future__ import annotations

import hashlib

import pytest

from lowvram._files import atomic_write, sha256_file


def test_sha256_file_reads_a_file_larger_than_one_block(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc" * 2_000_000)  # 6 MB: two 4 MiB blocks
    assert sha256_file(f) == hashlib.sha256(b"abc" * 2_000_000).hexdigest()


def test_atomic_write_leaves_the_old_file_and_no_tmp_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))  # creates the directory
    assert path.read_text() == "old"

    def half_then_fail(tmp):
        tmp.write_text("ha")
        raise KeyboardInterrupt  # a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_the_package_has_one_atomic_write_and_one_hash():
    import lowvram._datacache
    import lowvram.checkpoints
    import lowvram.corpus
    import lowvram.data

    # the data cache names a full or read-only disk around the one atomic write
    assert lowvram._datacache._atomic_write is lowvram.corpus._atomic_write
    assert lowvram.corpus._plain_atomic_write is atomic_write
    assert lowvram.corpus.sha256_file is lowvram.data.sha256_file is sha256_file
    assert lowvram.checkpoints.sha256_file is sha256_file
