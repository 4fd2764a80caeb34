"""Checkpoints of a training run: atomic, hashed saves; one resume check; loading.

    from lowvram.checkpoints import latest_checkpoint
    latest_checkpoint("runs/cpu-demo")   # runs/cpu-demo/checkpoints/step_000200, or None

What ``lowvram.train.train`` relies on:

- **Atomic saves.** A checkpoint (``<output_dir>/checkpoints/step_000100``) is written into
  ``step_000100.tmp``; ``manifest.json`` (step, configs, the run's identity, a size and sha256
  per file) is its last file, and the directory is renamed into place only then. A crash
  leaves the older checkpoints intact; a failed save (a full disk) leaves no ``.tmp`` behind.
- **One resume check for every route** (an explicit path or ``"latest"``): the model, the
  batch settings, the process count, the batches per epoch, the seed and a hash of the train
  rows must be this run's; every file must have its recorded size and sha256, and the RNG
  state of every process must be there. ``"latest"`` skips (and names) checkpoints of another
  run; it never calls them corrupt.
- **One timeline.** A run resumed from an older checkpoint of its directory moves the later
  ones aside (``lowvram.outputdir.set_aside_later_checkpoints``), so the highest step in
  ``checkpoints/`` is always the current timeline's and ``"latest"`` never picks an abandoned
  one. Each resume is recorded (``history["resumed_from"]``, and in every later manifest).
- **Only good states.** Weights that hold NaN or inf are never saved: the run stops with a
  ``NonFiniteLossError`` instead, so the last checkpoint is the last good state.

The output directory they live in (its lock, its other files, the disk) is
``lowvram.outputdir``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowvram._files import sha256_file  # one file hash for the data cache and checkpoints
from lowvram.outputdir import (  # the listing lives there: outputdir needs it, and imports nothing here
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    MODEL_FILE,
    complete_checkpoints,
    disk_full,
    disk_full_error,
    latest_checkpoint,
)

__all__ = [
    "MANIFEST_FILE",
    "LoopState",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "resume",
    "run_identity",
    "save_checkpoint",
    "sha256_file",
]

LOOP_STATE_FILE = "loop_state.json"  # next to accelerate's files in each checkpoint
MANIFEST_FORMAT = 2  # 2: files as {name: {"bytes", "sha256"}}, plus the run identity
_UNFINISHED = re.compile(r"step_\d{6,}\.(tmp|old)")  # a save in progress, or killed mid-way


@dataclasses.dataclass
class LoopState:
    """Where the loop stands; saved with each checkpoint, enough to continue from it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch to continue in
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed (per process)
    tokens: int = 0  # input tokens seen, all processes together


# ----------------------------------------------------------------------------- identity


def run_identity(model_config, train_config, num_processes: int, batches_per_epoch: int,
                 train_data_sha256: str) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (the manifest's view)."""
    return {
        "model": dataclasses.asdict(model_config),
        "per_device_train_batch_size": train_config.per_device_train_batch_size,
        "gradient_accumulation_steps": train_config.gradient_accumulation_steps,
        "num_processes": num_processes,
        "batches_per_epoch": batches_per_epoch,
        "seed": train_config.seed,
        "optimizer": train_config.optimizer,  # not adamw_impl: another kernel, the same state
        "train_data_sha256": train_data_sha256,
    }


def _identity_of(manifest: dict[str, Any]) -> dict[str, Any]:
    train = manifest.get("train", {})
    return {
        "model": manifest.get("model"),
        "per_device_train_batch_size": train.get("per_device_train_batch_size"),
        "gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
        "num_processes": manifest.get("num_processes"),
        "batches_per_epoch": manifest.get("batches_per_epoch"),
        "seed": train.get("seed"),
        "optimizer": train.get("optimizer", "adamw"),  # written before the option existed
        "train_data_sha256": manifest.get("train_data_sha256"),
    }


_POSITION = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_processes",
             "batches_per_epoch")  # fmt: skip


def _mismatch(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the checkpoint at ``path`` is another run's (a sentence ending in what to do), or None."""
    if saved["model"] != now["model"]:
        return (f"was written for the model {saved['model']}, not {now['model']}: resume with "
                "the same model config")
    if any(saved[k] != now[k] for k in _POSITION):
        names = "per_device_train_batch_size, gradient_accumulation_steps, processes, batches per epoch"
        was, has = tuple(saved[k] for k in _POSITION), tuple(now[k] for k in _POSITION)
        why = ""
        if saved["num_processes"] != now["num_processes"]:
            why = (f" The process count differs ({saved['num_processes']} -> "
                   f"{now['num_processes']}): the saved data position, RNG states and LR ticks "
                   "are per process, so it cannot continue correctly.")
        return (f"was written with ({names}) = {was}, this run has {has}: the checkpoint's data "
                f"position would mean other rows.{why} Resume with the same batch settings, "
                "process count and train data, or start a new run")
    if saved["seed"] != now["seed"]:
        return (f"was written with seed={saved['seed']}, this run has seed={now['seed']}: the "
                "seed fixes the data order, so the rest of the epoch would repeat and skip rows. "
                f"Resume with --seed {saved['seed']}, or start a new run")
    if saved["optimizer"] != now["optimizer"]:
        return (f"was written with optimizer={saved['optimizer']!r}, this run has "
                f"optimizer={now['optimizer']!r}: the saved optimizer state is the other "
                f"optimizer's. Resume with --optimizer {saved['optimizer']}, or start a new run")
    if saved["train_data_sha256"] != now["train_data_sha256"]:
        return ("was written for other train data (the sha256 of its rows differs, same "
                "number of batches): resume with the train data it was trained on, or start "
                "a new run")
    return None


# ----------------------------------------------------------------------------- files


def _fsync(directory: Path) -> None:
    """Flush a directory's files (and, on POSIX, the directory itself) to the disk, so that a
    rename after it cannot point at data that a power cut would lose."""
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if os.name == "posix":  # Windows cannot open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)



def _remove(path: Path) -> None:
    """Delete a checkpoint directory; a symlink to one is unlinked (its target is not ours)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- save


def _refuse_non_finite_weights(accelerator, output_dir: Path, loop: LoopState,
                               history: dict[str, Any], path: Path) -> None:
    """A checkpoint is a good state or nothing: weights that hold NaN or inf (the loss and the
    gradient norm can still be finite) stop the run before the save, so the last checkpoint
    really is the last good one."""
    import torch

    models = getattr(accelerator, "_models", None)  # what save_state saves: the prepared models
    if not models:
        return
    broken = [n for model in models for n, p in accelerator.unwrap_model(model).named_parameters()
              if not torch.isfinite(p.detach()).all()]  # fmt: skip
    if not broken:
        return
    from lowvram.failures import stop_non_finite  # lazily: failures imports this module

    last = history["steps"][-1] if history.get("steps") else {}
    record = {"step": loop.step, "epoch": loop.epoch, "lr": last.get("lr", 0.0)}
    names = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
    stop_non_finite(accelerator, output_dir, history, record,
                    f"the weights hold NaN or inf ({names}) although the loss and the gradient "
                    f"norm were finite, so {path.name} was not saved",
                    history["config"]["train"]["max_lr"])


def _required_files(num_processes: int) -> set[str]:
    """Files every checkpoint must hold: accelerate's state (the RNG states of every process)
    and the loop state."""
    rng = {f"random_states_{i}.pkl" for i in range(num_processes)}
    return {MODEL_FILE, "optimizer.bin", "scheduler.bin", LOOP_STATE_FILE} | rng


def save_checkpoint(accelerator, output_dir: Path, loop: LoopState, history: dict[str, Any],
                    keep: int, identity: dict[str, Any]) -> Path:
    """``accelerator.save_state`` plus the loop state, the history and a manifest, atomically.

    Everything goes into ``step_XXXXXX.tmp``; ``manifest.json`` (with a size and sha256 per
    file) is written last, and the directory is renamed into place only then. A crash at any
    moment leaves either the whole checkpoint or none of it, and the older checkpoints
    untouched; the oldest are deleted only after the new one is complete. A save that fails
    (a full disk) removes its ``.tmp`` and says which disk.
    """
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    path = checkpoints_dir / f"step_{loop.step:06d}"
    tmp = path.with_name(path.name + ".tmp")  # the same name in every process
    _refuse_non_finite_weights(accelerator, output_dir, loop, history, path)
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.iterdir():  # left by a run killed while saving
            if _UNFINISHED.fullmatch(stale.name):
                _remove(stale)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # every process takes part: each writes its RNG states
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"loop": dataclasses.asdict(loop), "history": history}
            (tmp / LOOP_STATE_FILE).write_text(json.dumps(state, indent=1))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(tmp.iterdir())}  # fmt: skip
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": loop.step,
                "tokens": loop.tokens,
                "epoch": loop.epoch,
                "batches_in_epoch": loop.batches_in_epoch,
                "model": history["config"]["model"],
                "train": history["config"]["train"],
                "precision": history["precision"],
                "num_processes": identity["num_processes"],
                "batches_per_epoch": identity["batches_per_epoch"],
                "train_data_sha256": identity["train_data_sha256"],
                "resumed_from": history.get("resumed_from", []),  # this timeline's resumes
                "files": files,
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            _fsync(tmp)
    except Exception as err:  # not KeyboardInterrupt: a killed run's .tmp is cleaned next time
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(checkpoints_dir, err):
            last = latest_checkpoint(output_dir)
            kept = f"The last complete checkpoint is {last}." if last else "No checkpoint was kept."
            raise disk_full_error(checkpoints_dir, None,
                                   f"Saving {path.name} failed and its partial files were "
                                   f"removed. {kept}") from None
        raise
    if accelerator.is_main_process:
        old = path.with_name(path.name + ".old")
        if path.exists():  # the same step saved again (a resumed run): swap, then delete
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(checkpoints_dir)
        if os.path.lexists(old):
            _remove(old)
        for older in complete_checkpoints(checkpoints_dir)[:-keep]:
            if older != path:
                _remove(older)
    accelerator.wait_for_everyone()
    return path


# ----------------------------------------------------------------------------- check and load


def _checkpoint_problem(path: Path, what: str) -> ValueError:
    """A ValueError for an unusable checkpoint, naming the complete ones next to it."""
    others = [p.name for p in complete_checkpoints(path.parent) if p != path]
    where = (
        f"complete checkpoints next to it: {', '.join(others)}" if others
        else "there is no other complete checkpoint next to it: train from the start"
    )  # fmt: skip
    return ValueError(f"resume_from={str(path)!r} {what}. Delete it and resume from another; {where}")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        dict(manifest["files"]), manifest["model"], manifest["train"]  # noqa: B018 (shape check)
    except (ValueError, KeyError, TypeError) as err:
        raise _checkpoint_problem(
            path, f"is corrupt: {MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
        ) from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"resume_from={str(path)!r} was written by an older lowvram (its {MANIFEST_FILE} "
            "records no file hashes, seed or data identity), so it cannot be checked: start a "
            "new run"
        )
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists (and every file a checkpoint needs) has its size and
    sha256; sizes first (cheap, and a truncation says so)."""
    files = manifest["files"]
    for name in sorted(_required_files(manifest["num_processes"]) - set(files)):
        raise _checkpoint_problem(path, f"is corrupt: {name} is missing (not in its manifest)")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise _checkpoint_problem(path, f"is corrupt: {name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise _checkpoint_problem(
                path,
                f"is corrupt: {name} has {f.stat().st_size} bytes, its manifest says "
                f"{meta['bytes']} (truncated or overwritten)",
            )
    for name, meta in files.items():
        actual = sha256_file(path / name)
        if actual != meta["sha256"]:
            raise _checkpoint_problem(
                path,
                f"is corrupt: {name} has sha256 {actual[:12]}..., its manifest says "
                f"{meta['sha256'][:12]}... (changed on the disk since it was saved)",
            )


def _check_one(path: Path, identity: dict[str, Any]) -> None:
    """The check of one checkpoint directory: complete, this run's, every file intact."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume_from={str(path)!r} does not exist or is not a directory, so it is not a "
            f"lowvram checkpoint: pass one such as <output_dir>/{CHECKPOINTS_DIR}/step_000100, "
            "or 'latest'"
        )
    if _UNFINISHED.fullmatch(path.name):
        raise _checkpoint_problem(
            path, "is an incomplete checkpoint: a save was interrupted while writing it"
        )
    if not (path / MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from={str(path)!r} is not a lowvram checkpoint ({MANIFEST_FILE}, the file "
            f"written last, is missing): pass a directory such as "
            f"<output_dir>/{CHECKPOINTS_DIR}/step_000100, or 'latest'"
        )
    manifest = _read_manifest(path)
    why = _mismatch(path, _identity_of(manifest), identity)
    if why:
        raise ValueError(f"resume_from={str(path)!r} {why}")
    _check_files(path, manifest)


def resolve_checkpoint(resume_from: str | Path, output_dir: Path, identity: dict[str, Any],
                       log: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from, checked against this run before anything is built.

    ``"latest"`` is the newest complete checkpoint of *this* run under ``output_dir``: those of
    another run (other model, batch, processes, seed or data) are skipped with a line through
    ``log`` saying why. Then the same check as an explicit path: every file's size and sha256.
    """
    if str(resume_from) != "latest":
        path = Path(resume_from)
        _check_one(path, identity)
        return path
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    skipped = []
    for path in reversed(complete_checkpoints(checkpoints_dir)):
        try:
            manifest = _read_manifest(path)
        except ValueError as err:  # unreadable or of an older format: not this run's either
            skipped.append(f"{path.name} ({str(err).split(': ', 1)[-1][:120]})")
            log(f"resume_from='latest': skipping {path}: {str(err).split(' ', 1)[-1][:200]}")
            continue
        why = _mismatch(path, _identity_of(manifest), identity)
        if why is None:
            _check_files(path, manifest)
            return path
        reason = why.split(": ")[0]
        skipped.append(f"{path.name} ({reason})")
        log(f"resume_from='latest': skipping {path}, a checkpoint of another run: it {reason}")
    if skipped:
        raise FileNotFoundError(
            f"resume_from='latest' but {checkpoints_dir} holds no checkpoint of this run, only "
            f"of others: {'; '.join(skipped)}. Resume from one of them with the settings it was "
            "written with (the same launcher and --num_processes if the process count differs), "
            "or start a new run in another --output-dir (--overwrite-output-dir would delete "
            "these checkpoints)"
        )
    raise FileNotFoundError(
        f"resume_from='latest' but {checkpoints_dir} holds no complete checkpoint: train "
        "without resume_from first (checkpoints are saved at each epoch end and every "
        "checkpoint_interval steps)"
    )


def load_checkpoint(accelerator, path: Path, model) -> tuple[LoopState, dict[str, Any]]:
    """``accelerator.load_state`` plus the loop state and history saved next to it (the
    checkpoint was checked by :func:`resolve_checkpoint`; what still fails to load is corrupt).
    Weights that are NaN or inf are refused: such a checkpoint is not a good state."""
    import torch  # only this function needs it (lowvram/__init__ has loaded it already)

    try:
        state = json.loads((path / LOOP_STATE_FILE).read_text())
        loop = LoopState(**state["loop"])
        history = state["history"]
        # accelerate also loads the RNG states, the scheduler, AdamW and the GradScaler
        accelerator.load_state(str(path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise _checkpoint_problem(
            path, f"is corrupt: it could not be loaded ({type(err).__name__}: {first})"
        ) from err
    broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise _checkpoint_problem(
            path, f"holds NaN or inf weights ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}): it was saved after training had diverged"
        )
    return loop, history


def resume(accelerator, path: Path, model, history: dict[str, Any]) -> LoopState:
    """Load the checked checkpoint ``path`` into the prepared objects and its steps into
    ``history``; return its loop state. A checkpoint past this run's ``total_steps`` is refused."""
    loop, saved = load_checkpoint(accelerator, path, model)
    if loop.step > history["total_steps"]:
        raise ValueError(
            f"resume_from={str(path)!r} is at step {loop.step}, past this run's "
            f"total_steps={history['total_steps']}: raise max_steps (or num_epochs) to train further"
        )
    history.update(steps=saved["steps"], val=saved["val"], skipped_steps=saved["skipped_steps"])
    # the timeline: which checkpoint each resume continued from (also in every later manifest)
    history["resumed_from"] = [*saved.get("resumed_from", []),
                               {"step": loop.step, "checkpoint": str(path)}]
    accelerator.print(f"resumed from {path} at step {loop.step}")
    return loop
