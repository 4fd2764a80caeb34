"""The measurements of ``lowvram._bench`` outside the training loop: the memory planner's run
time and error, import cost in fresh interpreters, and strict nbval of each notebook.

The method is in the package's docstring, items 3-5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lowvram._bench.paths import REPO
from lowvram.config import ModelConfig, get_preset

__all__ = ["import_cost", "notebook_times", "planner_bench"]


# --------------------------------------------------------------------------- planner


def planner_bench(
    planner_model: ModelConfig,
    micro_batch: int,
    real_model: ModelConfig,
    real_micro_batch: int,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run time of ``measure_step(planner_model, fp32, target="cuda")`` (cache cleared each
    time), of notebook 25_2's plan and of the whole plan (``plan(..., largest=True)``, what
    ``--plan`` runs), each recorded afresh; of the same plans with their steps in the disk cache
    (in this process, and ``--plan`` in a new one); and the CPU-target peak's relative error
    against the real CPU allocator."""
    from lowvram import memory

    with tempfile.TemporaryDirectory(prefix="lowvram-bench-") as tmp:
        # every step recorded afresh (the disk cache off), except the whole plan's run, which
        # fills a fresh cache folder for the two "from the disk" measurements after it
        with _cache_dir("off"):
            return _planner_runs(memory, planner_model, micro_batch, real_model, real_micro_batch,
                                 repeats, Path(tmp))


@contextlib.contextmanager
def _cache_dir(value: str) -> Iterator[None]:
    """``LOWVRAM_CACHE_DIR`` set to ``value`` for the block (the planner's disk cache)."""
    old = os.environ.get("LOWVRAM_CACHE_DIR")
    os.environ["LOWVRAM_CACHE_DIR"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWVRAM_CACHE_DIR"]
        else:
            os.environ["LOWVRAM_CACHE_DIR"] = old


def _planner_runs(memory: Any, planner_model: ModelConfig, micro_batch: int, real_model: ModelConfig,
                  real_micro_batch: int, repeats: int, cache: Path) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        memory._measure_cached.cache_clear()  # measure_step memoises its reports
        t0 = time.perf_counter()
        report = memory.measure_step(planner_model, micro_batch, "no", target="cuda")
        times.append(time.perf_counter() - t0)
    # the plan as notebook 25_2 makes it (4 GiB, effective batch 16), then the whole plan as
    # `python -m lowvram.memory --plan` runs it (also the largest-that-fits search), each from
    # an empty memo: the learner's wait
    from lowvram.memory import tracker
    from lowvram.memory.plan import DEFAULT_RECIPES, _worker_count

    workers = _worker_count(None, len(DEFAULT_RECIPES))
    _forget_recordings(memory, tracker)
    t0 = time.perf_counter()
    memory.plan(planner_model, 4.0, 16)
    plan_target_s = time.perf_counter() - t0
    plan_target_measurements = memory._measure_cached.cache_info().misses
    _forget_recordings(memory, tracker)
    t0 = time.perf_counter()
    with _cache_dir(str(cache)):  # (writing the recordings costs milliseconds)
        rows = memory.plan(planner_model, 4.0, 16, largest=True)
    plan_s = time.perf_counter() - t0
    plan_measurements = memory._measure_cached.cache_info().misses
    # the learner's second wait: the same plans with their recordings on disk, 25_2's cell in
    # this process (its memo emptied) and `--plan` in a new one (imports included)
    _forget_recordings(memory, tracker)
    with _cache_dir(str(cache)):
        t0 = time.perf_counter()
        memory.plan(planner_model, 4.0, 16)
        plan_target_disk_s = time.perf_counter() - t0
        plan_target_disk_recorded = memory._measure_cached.cache_info().misses
        cli_disk_s = None
        if planner_model == get_preset("rtx2050")[0]:  # the command line plans a preset's model
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lowvram.memory", "--preset", "rtx2050", "--plan"],
                           capture_output=True, text=True, check=True, cwd=REPO)
            cli_disk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    real = memory.real_cpu_peaks(real_model, real_micro_batch, "no")
    real_s = time.perf_counter() - t0
    estimate = memory.measure_step(real_model, real_micro_batch, "no", target="cpu")
    real_peak = max(real.values())
    return {
        "planner_model": dataclasses.asdict(planner_model),
        "planner_micro_batch": micro_batch,
        "planner_parameters": report.num_parameters,
        "planner_peak_bytes": report.peak_bytes,
        "planner_times_s": times,
        "planner_first_s": times[0],
        "planner_median_s": statistics.median(times),
        "plan_s": plan_s,  # plan(planner_model, 4 GiB, 16, largest=True) from an empty memo
        "plan_measurements": plan_measurements,  # fake-tensor steps it recorded (shallow ones included)
        "plan_rows": [(r.recipe.name, r.micro_batch, r.accumulation) for r in rows],
        "plan_target_s": plan_target_s,  # plan(planner_model, 4 GiB, 16): notebook 25_2's cell
        "plan_target_measurements": plan_target_measurements,
        "plan_workers": workers,  # recording processes plan() used (1: none, it recorded here)
        # with the recordings on disk (lowvram/memory/_diskcache.py): plan(..., 4 GiB, 16) in
        # this process, its memo emptied, and `python -m lowvram.memory --preset rtx2050 --plan`
        # in a new process (None: the planner model is not the preset's)
        "plan_target_disk_s": plan_target_disk_s,
        "plan_target_disk_lookups": plan_target_disk_recorded,  # memo misses: read from disk
        "plan_cli_disk_s": cli_disk_s,
        "real_model": dataclasses.asdict(real_model),
        "real_micro_batch": real_micro_batch,
        "real_peak_bytes": real_peak,
        "estimated_peak_bytes": estimate.peak_bytes,
        "relative_error": (estimate.peak_bytes - real_peak) / real_peak,
        "real_run_s": real_s,
    }


def _forget_recordings(memory: Any, tracker: Any) -> None:
    """Empty the planner's memo of recorded steps (and its hint of what it holds, which plan()
    reads to skip its worker processes)."""
    memory._measure_cached.cache_clear()
    tracker._recorded.clear()


# --------------------------------------------------------------------------- subprocesses


_IMPORT_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch, accelerate
t1 = time.perf_counter()
import lowvram
t2 = time.perf_counter()
import lowvram.train
t3 = time.perf_counter()
after_train = "transformers" in sys.modules
lowvram.train.lr_schedule(1, 2, 1e-3)
t4 = time.perf_counter()
print(json.dumps({"torch_accelerate_s": t1 - t0, "lowvram_s": t2 - t1, "lowvram_train_s": t3 - t2,
                  "schedule_s": t4 - t3, "transformers_after_import": after_train,
                  "transformers_after_schedule": "transformers" in sys.modules}))
"""


def import_cost(repeats: int = 3) -> dict[str, Any]:
    """Import times in ``repeats`` fresh interpreters (medians), and when transformers comes in.

    ``lowvram_s``: ``import lowvram`` after torch + accelerate; ``lowvram_train_s``: then
    ``import lowvram.train``; ``schedule_s``: then building the LR schedule (imports transformers).
    """
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True,
            cwd=REPO,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {"repeats": repeats}
    for key in ("torch_accelerate_s", "lowvram_s", "lowvram_train_s", "schedule_s"):
        result[key] = statistics.median(r[key] for r in runs)
    result["transformers_after_import"] = any(r["transformers_after_import"] for r in runs)
    result["transformers_after_schedule"] = all(r["transformers_after_schedule"] for r in runs)
    return result


def notebook_times(
    notebooks: Sequence[str | Path],
    sanitize: str | Path = REPO / "notebooks" / "sanitize.cfg",
    timeout: float = 1800,
    log: Callable[[str], None] = lambda msg: None,
) -> list[dict[str, Any]]:
    """Seconds to validate each notebook with strict nbval, one pytest subprocess each.

    The subprocesses inherit this process's environment: ``make bench`` runs under the
    Makefile's ``NB_ENV`` (``PYTHONHASHSEED=0``), the one definition ``make test`` uses too.
    """
    results = []
    for nb in notebooks:
        nb = Path(nb)
        if not nb.is_file():
            raise FileNotFoundError(f"notebook {str(nb)!r} does not exist: pass existing .ipynb files")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
               "--nbval-current-env", "--nbval-sanitize-with", str(sanitize), str(nb)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=REPO)  # the environment `make bench` got: NB_ENV
            rc, tail = proc.returncode, proc.stdout.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            rc, tail = None, [f"timed out after {timeout:.0f} s"]
        seconds = time.perf_counter() - t0
        results.append({"notebook": nb.name, "seconds": seconds, "passed": rc == 0,
                        "summary": tail[0] if tail else ""})
        log(f"  {nb.name}: {seconds:.1f} s, {'passed' if rc == 0 else 'FAILED'}")
    return results
