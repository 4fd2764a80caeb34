"""The planner's recordings on disk (lowvram/memory/_diskcache.py): read back instead of recorded
again, keyed on the step, the torch version and lowvram's source; corrupt files and unwritable
folders cost time, never a wrong answer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

import lowvram.memory.tracker as tracker
from lowvram.config import get_preset
from lowvram.memory import _diskcache, measure_step

TINY, _ = get_preset("tiny")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The disk cache on, in a fresh folder; record_fake's in-process memo empty before and after."""
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(tmp_path / "recordings"))
    tracker.record_fake.cache_clear()
    yield tmp_path / "recordings"
    tracker.record_fake.cache_clear()


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pkl"))


def _no_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a fresh recording impossible: the step must come from the disk."""
    def refuse(*args, **kwargs):
        raise AssertionError("the step was recorded again instead of read from the disk cache")

    monkeypatch.setattr(tracker, "StorageTracker", refuse)


def _same(a, b) -> bool:
    skip = {"recipe", "allocator_requests"}  # a closure over the replay: compared by its result
    same = all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name not in skip)
    return same and (a.target != "cuda" or a.capped_reserved_bytes == b.capped_reserved_bytes)


def test_a_recorded_step_is_read_back_not_recorded_again(cache: Path, monkeypatch) -> None:
    first = measure_step(TINY, 3, precision="fp16", gradient_accumulation_steps=2)
    files = _files(cache)
    assert len(files) == 1 and files[0].parent.parent == cache  # <cache>/<code version>/<step>.pkl
    tracker.record_fake.cache_clear()  # a new process, as far as the memo knows
    _no_recording(monkeypatch)
    again = measure_step(TINY, 3, precision="fp16", gradient_accumulation_steps=2)
    assert _same(first, again) and again.peak_bytes > 0
    with pytest.raises(AssertionError, match="recorded again"):  # another step is not on disk
        measure_step(TINY, 3, precision="no", gradient_accumulation_steps=2)


def test_a_corrupt_or_foreign_file_is_recorded_again(cache: Path) -> None:
    first = measure_step(TINY, 2, target="cpu")
    (path,) = _files(cache)
    for junk in (b"", b"\x80\x05 truncated", path.read_bytes()[:100]):
        path.write_bytes(junk)
        tracker.record_fake.cache_clear()
        assert _same(first, measure_step(TINY, 2, target="cpu"))
        assert path.stat().st_size > 100  # replaced by the new recording
    # a file whose stored arguments are another step's (e.g. a hash collision) is not used
    other = _diskcache._path(path.parent, ("another step",))
    other.write_bytes(path.read_bytes())
    assert _diskcache.load(("another step",)) is None and not other.exists()


def test_an_unwritable_cache_warns_once_and_the_answer_stands(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(blocker / "recordings"))  # mkdir fails
    monkeypatch.setattr(_diskcache, "_warned", [])
    tracker.record_fake.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not keep the memory planner's recordings"):
            a = measure_step(TINY, 2, target="cpu")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second failure is silent
            b = measure_step(TINY, 3, target="cpu")
    finally:
        tracker.record_fake.cache_clear()
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", "off")
    assert _same(a, measure_step(TINY, 2, target="cpu")) and b.peak_bytes > a.peak_bytes


@pytest.mark.parametrize("value", ["off", "0", "", "OFF"])
def test_the_cache_can_be_turned_off(value: str, monkeypatch) -> None:
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", value)
    assert _diskcache.cache_dir() is None


def test_the_default_folder_and_the_code_version(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOWVRAM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = _diskcache.cache_dir()
    assert folder.parent == tmp_path / "lowvram" / "recordings"
    # another torch is another code version: its recordings are kept apart
    _diskcache._code_version.cache_clear()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    try:
        assert _diskcache.cache_dir() != folder and _diskcache.cache_dir().parent == folder.parent
    finally:
        _diskcache._code_version.cache_clear()


def test_only_the_most_recently_used_code_versions_are_kept(cache: Path) -> None:
    for i in range(6):
        old = cache / f"old-version-{i}"
        old.mkdir(parents=True)
        (old / "x.pkl").write_bytes(b"")
        os.utime(old, (1000 + i, 1000 + i))
    measure_step(TINY, 2, target="cpu")  # the first write of this code version prunes
    kept = sorted(p.name for p in cache.iterdir())
    assert kept == sorted([_diskcache.cache_dir().name] + [f"old-version-{i}" for i in (3, 4, 5)])


def test_the_command_line_reads_its_step_back_in_a_new_process(tmp_path: Path) -> None:
    """The command line twice, as a learner runs it: the second run records nothing and prints
    the same report (``--plan`` takes the same path, with more steps)."""
    env = {**os.environ, "LOWVRAM_CACHE_DIR": str(tmp_path / "rec"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lowvram.memory", "--preset", "tiny", "--json"]

    def run() -> dict:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
        return json.loads(done.stdout)

    first = run()
    stamps = {p: p.stat().st_mtime_ns for p in _files(tmp_path / "rec")}
    assert len(stamps) >= 1
    assert run() == first
    assert {p: p.stat().st_mtime_ns for p in _files(tmp_path / "rec")} == stamps  # none re-written
