"""``make test-gpu``: every check that needs a CUDA GPU, in one bounded run with one summary.

    make -o install -o data test-gpu PY=python3     # on the lent GPU machine (.gpu/run.sh)
    python tests/gpu_suite.py [--budget SECONDS] [--parts pytest,notebooks,plan,bench]

The parts, each in its own subprocess with a timeout, so that a failing or hanging part does
not stop the others:

1. ``pytest``: ``pytest -m gpu tests`` (tests/test_gpu.py and the other gpu-marked tests).
2. ``notebooks``: every notebook and solution executed on CUDA with nbclient, from its own
   directory as Jupyter runs it; no output comparison (the stored outputs are the CPU's, and
   ``make test`` checks them with CUDA hidden). Pass/fail per notebook. Notebooks that share a
   run directory, the launcher's port or a lesson run one after the other in ``make test``'s
   order (``notebook_lanes``); the other lanes run beside them.
3. ``plan``: each row of ``lowvram.memory.plan(rtx2050, card_gib=4, target_effective_batch=16)``
   that the planner marks as fitting: 2 real optimizer steps of ``train()`` under a 4 GiB cap
   (``python -m lowvram.verify --plan --context-mib 270``): no out-of-memory, and the measured
   allocated peak within 3% of the prediction.
4. ``bench``: the GPU bench (``python -m lowvram._bench --gpu``), alone on the GPU at the end.

pytest runs first, alone (its checks measure what the GPU holds outside the allocator, which
other processes would add to); then the plan rows next to the notebooks (memory peaks are per
process, and the plan rows take the card's context as given: the planner's 270 MiB, the
context of an RTX 2050 rather than of the large GPU that emulates it); the bench last, alone,
so that nothing disturbs its timings. The whole run stays inside ``--budget`` seconds (default
400).

Results go to ``$OUT`` when that variable is set (the device machine returns that folder), else
to ``build/gpu/``: ``summary.json`` and ``summary.txt`` (rewritten after every part, so a run
that is cut short still leaves them), one log per part, ``pytest_gpu.xml``, ``plan_rows.json``,
``bench_gpu.json`` + ``bench_gpu.md``, and the executed notebooks under ``notebooks/``.

Without CUDA: if this machine has no NVIDIA GPU at all, every part is reported as "skipped (no
CUDA)" and the exit status is 0 (nothing to check here). If it has one but torch cannot use it
(a CPU build of torch, or a driver too old for torch's CUDA), that is an error: exit status 1.
Otherwise the exit status is 0 when every part passed, else 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = ("pytest", "notebooks", "plan", "bench")
BUDGET_S = 400  # the whole run: the device call allows 480 s, and run.sh installs wheels first
BENCH_S = 100  # kept for the bench, which runs last
PYTEST_S = 150  # pytest -m gpu, at most (other branches add gpu tests too)
NOTEBOOK_TIMEOUT_S = 240  # one notebook
NOTEBOOK_WORKERS = max(2, min(8, (os.cpu_count() or 2) // 2))  # lanes at once (notebook_lanes)

# Executes one notebook in a fresh interpreter (nbclient), writing the executed copy; prints
# one JSON line. The kernel starts in the notebook's own directory, as Jupyter starts it.
_RUN_NOTEBOOK = r"""
import json, sys, time, traceback
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
src, dst, cell_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
nb = nbformat.read(src, as_version=4)
client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[4]}})
t0 = time.perf_counter()
error = None
try:
    client.execute()
except (CellExecutionError, CellTimeoutError) as err:
    error = str(err).strip().splitlines()
    error = " | ".join(line for line in error[-3:] if line.strip())[-600:]
except Exception as err:
    error = f"{type(err).__name__}: {err}"[-600:]
finally:
    nbformat.write(nb, dst)
cells = [c for c in nb.cells if c.cell_type == "code"]
ran = sum(1 for c in cells if c.get("execution_count"))
print(json.dumps({"seconds": time.perf_counter() - t0, "error": error,
                  "code_cells": len(cells), "cells_run": ran}))
"""


def out_dir() -> Path:
    """``$OUT`` when set (the device machine), else build/gpu/ in the repository."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "build" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    return out


def cuda_state() -> tuple[str, str]:
    """("ok" | "none" | "broken", a line saying so). "none": no NVIDIA GPU on this machine;
    "broken": a GPU is there but torch cannot use it."""
    import torch

    if torch.cuda.is_available():  # names from nvidia-smi: no CUDA context in this process,
        try:  # whose memory the checks would count as the GPU's "outside the allocator"
            names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True,
                                   timeout=30).stdout.strip().replace("\n", "; ")
        except (OSError, subprocess.SubprocessError):
            names = f"{torch.cuda.device_count()} GPU(s)"
        return "ok", f"CUDA: {names}; torch {torch.__version__} (CUDA {torch.version.cuda})"
    gpu = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")
    if not gpu:
        return "none", f"no CUDA: this machine has no NVIDIA GPU (torch {torch.__version__})"
    from lowvram import environment

    unused = getattr(environment, "gpu_left_unused", environment.cpu_build_on_gpu_machine)
    why = unused() or ("a CPU build of torch, a driver too old for torch's CUDA, or "
                       "CUDA_VISIBLE_DEVICES hides it")
    return "broken", (
        f"an NVIDIA GPU is installed, but torch {torch.__version__} (CUDA build: "
        f"{torch.version.cuda}) cannot use it (torch.cuda.is_available() is False): {why}"
    )


def child_env() -> dict[str, str]:
    """The subprocesses' environment: this repository's lowvram first on PYTHONPATH (so
    notebook kernels import it too) and the Makefile's PYTHONHASHSEED."""
    env = dict(os.environ)
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("MPLBACKEND", None)  # notebook kernels draw inline, as in Jupyter
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_command(cmd: Sequence[str], log: Path, timeout: float, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``cmd``, its stdout and stderr into ``log``; (exit status or None on timeout, stdout).

    It runs in a session of its own, so that a timeout ends it with everything it started (a
    notebook's kernel, a launched process), not only the process itself."""
    t_limit = max(1.0, timeout)
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=cwd,
                                env=child_env(), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=t_limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            f.write(f"\n{out}\n== timed out after {t_limit:.0f} s\n")
            return None, out
        f.write(out)
    return proc.returncode, out


# --------------------------------------------------------------------------- the parts


def part_pytest(out: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rs", "--durations=10",
           "-p", "no:cacheprovider", f"--junitxml={out / 'pytest_gpu.xml'}"]
    rc, stdout = run_command(cmd, out / "pytest_gpu.log", timeout)
    tail = [line.strip("= ") for line in stdout.strip().splitlines() if line.strip()][-1:] or [""]
    # on a GPU every gpu test runs: all of them skipped means this process saw no CUDA
    passed = rc == 0 and re.search(r"\b\d+ passed\b", tail[0]) is not None
    summary = tail[0] if rc is not None else f"timed out after {timeout:.0f} s"
    return {"passed": passed, "summary": summary, "returncode": rc}


def notebook_paths() -> list[Path]:
    return sorted((REPO / "notebooks").glob("*.ipynb")) + sorted(
        (REPO / "notebooks" / "solutions").glob("*.ipynb"))


def _shared(path: Path) -> set[str]:
    """What a notebook shares with others, so that those run one after the other: each run
    directory it names (runs/NAME: one trains, the next reads), and the launcher (two launches
    at once collide on accelerate's default port). A solution that reads its lesson's run names
    the same run directory; otherwise a notebook and its solution run side by side."""
    text = path.read_text(encoding="utf-8")
    shared = set(re.findall(r"runs/[A-Za-z0-9_.-]+", text))
    if re.search(r"notebook_launcher\(|accelerate launch|use_port", text):
        shared.add("launcher")
    return shared


def notebook_lanes(notebooks: Sequence[Path]) -> list[list[Path]]:
    """The notebooks in lanes that may run at the same time: any two that share something
    (:func:`_shared`) are in one lane, in the given order (``make test``'s)."""
    lanes: list[tuple[set[str], list[Path]]] = []
    for nb in notebooks:
        keys, paths = _shared(nb), [nb]
        for lane in [lane for lane in lanes if lane[0] & keys]:  # merge every lane it touches
            lanes.remove(lane)
            keys, paths = keys | lane[0], lane[1] + paths
        lanes.append((keys, paths))
    order = {nb: i for i, nb in enumerate(notebooks)}
    return [sorted(paths, key=order.__getitem__) for _, paths in lanes]


def part_notebooks(out: Path, timeout: float, notebooks: Sequence[Path] | None = None,
                   workers: int = NOTEBOOK_WORKERS) -> dict[str, Any]:
    notebooks = notebook_paths() if notebooks is None else list(notebooks)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    lanes = notebook_lanes(notebooks)  # one after the other within a lane, lanes side by side
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def run_group(paths: list[Path]) -> None:
        for nb in paths:
            name = str(nb.relative_to(REPO / "notebooks")) if nb.is_relative_to(REPO / "notebooks") else nb.name
            left = min(NOTEBOOK_TIMEOUT_S, deadline - time.monotonic())
            if left < 5:
                r = {"passed": False, "seconds": 0.0, "error": "not run: the part's time ran out"}
            else:
                dst = out / "notebooks" / name.replace("/", "__")
                log = out / "notebooks" / (name.replace("/", "__") + ".log")
                t0 = time.monotonic()
                rc, stdout = run_command(
                    [sys.executable, "-c", _RUN_NOTEBOOK, str(nb), str(dst), str(int(left)),
                     str(nb.parent)], log, left + 10)
                lines = stdout.strip().splitlines()
                try:
                    info = json.loads(lines[-1]) if rc == 0 and lines else None
                except json.JSONDecodeError:
                    info = None
                if info is None:
                    reason = f"timed out after {left:.0f} s" if rc is None else f"exit status {rc} (see {log.name})"
                    r = {"passed": False, "seconds": time.monotonic() - t0, "error": reason}
                else:
                    r = {"passed": info["error"] is None, "seconds": info["seconds"],
                         "error": info["error"], "cells_run": info["cells_run"],
                         "code_cells": info["code_cells"]}
            with lock:
                results[name] = r
            print(f"   notebook {name}: {'ok' if r['passed'] else 'FAILED'} ({r['seconds']:.0f} s)"
                  + (f": {r['error']}" if r.get("error") else ""), flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(run_group, lanes))
    ordered = {k: results[k] for k in sorted(results)}
    failed = [k for k, r in ordered.items() if not r["passed"]]
    summary = (f"{len(ordered) - len(failed)} of {len(ordered)} notebooks ran on CUDA without an error"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return {"passed": not failed and bool(ordered), "summary": summary, "notebooks": ordered}


def _json(stdout: str, opener: str) -> Any:
    """The JSON document that starts at the first line that is ``opener`` alone or begins it
    (a library may have printed a line before it)."""
    match = re.search(rf"^{re.escape(opener)}", stdout, flags=re.MULTILINE)
    if match is None:
        raise json.JSONDecodeError("no JSON document", stdout, 0)
    return json.loads(stdout[match.start():])


def _run_json(cmd: Sequence[str], log: Path, timeout: float, opener: str) -> tuple[int | None, Any]:
    """Run ``cmd``; its exit status and the JSON document its stdout ends with (None if none)."""
    rc, stdout = run_command(cmd, log, timeout)
    try:
        return rc, _json(stdout, opener)
    except json.JSONDecodeError:
        return rc, None


def _no_json(rc: int | None, timeout: float, log: str) -> dict[str, Any]:
    reason = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}, no JSON"
    return {"passed": False, "summary": f"{reason} (see {log})"}


def part_plan(out: Path, timeout: float) -> dict[str, Any]:
    # The card's context is the planner's (an RTX 2050's, with lazy loading): this GPU's own is
    # larger (it grows with the number of SMs) and is reported in plan_rows.json, measured.
    from lowvram.memory import CUDA_CONTEXT_BYTES

    cmd = [sys.executable, "-m", "lowvram.verify", "--preset", "rtx2050", "--plan",
           "--card-gib", "4", "--context-mib", str(CUDA_CONTEXT_BYTES / 2**20), "--json"]
    rc, rows = _run_json(cmd, out / "plan_rows.log", timeout, "[")
    if rc is None or rows is None:
        return _no_json(rc, timeout, "plan_rows.log")
    (out / "plan_rows.json").write_text(json.dumps(rows, indent=1))
    from lowvram.verify.cli import format_plan_table

    table = format_plan_table(rows)
    (out / "plan_rows.md").write_text(table + "\n")
    checked = [r for r in rows if r["passed"] is not None]
    failed = [r["recipe"] for r in checked if not r["passed"]]
    summary = (f"{len(checked) - len(failed)} of {len(checked)} fitting plan rows trained 2 steps "
               "under a 4 GiB cap with the allocated peak within 3% of the prediction"
               + (f"; failed: {', '.join(failed)}" if failed else "")
               + f"; {len(rows) - len(checked)} not run (see the table)")
    return {"passed": rc == 0 and bool(checked), "summary": summary, "table": table}


def part_bench(out: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lowvram._bench", "--gpu", "--json"]
    rc, results = _run_json(cmd, out / "bench_gpu.log", timeout, "{")
    if rc is None or results is None:
        return _no_json(rc, timeout, "bench_gpu.log")
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
    from lowvram._bench.gpu import format_gpu_table, goal_met, gpu_readme_section

    table = format_gpu_table(results)
    (out / "bench_gpu.md").write_text(
        gpu_readme_section(results, "python -m lowvram._bench --gpu") + "\n")
    rows = [r for r in results.get("rows", []) if r.get("ratio")]
    ratios = [r["ratio"] for r in rows]
    summary = (f"{len(ratios)} configurations measured, train() / plain loop: "
               + "; ".join(f"{r['name']} {r['ratio']:.3f}"
                           + (" (95%: {:.3f}-{:.3f})".format(*r["ratio_interval"])
                              if r.get("ratio_interval") else "")
                           + f", goal met: {goal_met(r).strip('*')}" for r in rows)
               if ratios else "no configuration measured")
    return {"passed": rc == 0 and bool(ratios), "summary": summary, "table": table}


# --------------------------------------------------------------------------- the run


def format_summary(summary: dict[str, Any]) -> str:
    """The text summary: the machine, one line per part, the tables, the verdict."""
    lines = [f"make test-gpu, {summary['started_utc']}, {summary['seconds']:.0f} s",
             summary["cuda"], ""]
    for name in PARTS:
        part = summary["parts"].get(name)
        if part is None:
            continue
        status = ("SKIPPED" if part.get("skipped") else "passed" if part["passed"] else "FAILED")
        lines.append(f"[{status}] {name} ({part.get('seconds', 0):.0f} s): {part['summary']}")
        for nb, r in (part.get("notebooks") or {}).items():
            lines.append(f"    {'ok  ' if r['passed'] else 'FAIL'} {nb} ({r['seconds']:.0f} s)"
                         + (f": {r['error']}" if r.get("error") else ""))
    for name in ("plan", "bench"):
        table = summary["parts"].get(name, {}).get("table")
        if table:
            lines += ["", f"{name}:", table]
    if summary["parts"].get("bench", {}).get("table"):
        lines += ["", "Into the README's GPU section (from the repository, with this run's file): "
                  "python -m lowvram._bench --gpu --gpu-results bench_gpu.json --write-readme"]
    lines += ["", f"RESULT: {summary['result']}"]
    return "\n".join(lines)


def run_suite(parts: Sequence[str] = PARTS, budget: float = BUDGET_S, out: Path | None = None,
              runners: dict[str, Callable[[Path, float], dict[str, Any]]] | None = None) -> int:
    """Run ``parts`` inside ``budget`` seconds; write the summary; return the exit status."""
    out = out_dir() if out is None else out
    runners = runners or {"pytest": part_pytest, "notebooks": part_notebooks, "plan": part_plan,
                          "bench": part_bench}
    start = time.monotonic()
    state, line = cuda_state()
    summary: dict[str, Any] = {
        "started_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": line, "cuda_state": state, "parts": {}, "seconds": 0.0, "result": "running",
    }
    lock = threading.Lock()

    def write() -> None:
        with lock:
            summary["seconds"] = time.monotonic() - start
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            (out / "summary.txt").write_text(format_summary(summary) + "\n")

    def run(name: str, seconds: float) -> None:
        print(f"== {name} (at most {seconds:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            result = runners[name](out, seconds)
        except Exception as err:  # a part's own bug must not stop the others
            result = {"passed": False, "summary": f"the part crashed: {type(err).__name__}: {err}"}
        result["seconds"] = time.monotonic() - t0
        with lock:
            summary["parts"][name] = result
        print(f"== {name}: {'passed' if result['passed'] else 'FAILED'} "
              f"({result['seconds']:.0f} s): {result['summary']}", flush=True)
        write()

    if state != "ok":
        for name in parts:
            summary["parts"][name] = {"passed": state == "none", "skipped": True,
                                      "summary": f"skipped: {line}"}
        summary["result"] = ("SKIPPED: no CUDA on this machine (exit 0)" if state == "none"
                             else f"FAILED: {line}")
        write()
        print(format_summary(summary))
        return 0 if state == "none" else 1

    # 1. pytest alone: its checks measure the memory outside this process's allocator, which
    #    other processes on the GPU would add to. 2. the plan rows (a given context) next to
    #    the notebooks. 3. the bench alone, so that nothing else shares the GPU while it times.
    bench_s = BENCH_S if "bench" in parts else 0
    if "pytest" in parts:
        run("pytest", max(10.0, min(PYTEST_S, budget - bench_s - 60)))
    second = max(10.0, budget - bench_s - (time.monotonic() - start))
    threads = [threading.Thread(target=run, args=(name, second))
               for name in ("notebooks", "plan") if name in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "bench" in parts:
        run("bench", max(10.0, budget - (time.monotonic() - start)))
    failed = [n for n in parts if not summary["parts"][n]["passed"]]
    summary["result"] = ("PASSED: every part" if not failed else f"FAILED: {', '.join(failed)}")
    write()
    print()
    print(format_summary(summary))
    print(f"\n(results in {out})")
    return 0 if not failed else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/gpu_suite.py", description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all (default %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts {','.join(unknown)} is not allowed: choose from {', '.join(PARTS)}")
    return run_suite(parts, args.budget)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # lowvram from this repository (a script's path is tests/)
    raise SystemExit(main())
