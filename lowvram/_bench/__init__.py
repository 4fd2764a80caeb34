"""Developer tooling, not part of the lesson: benchmarks of lowvram, measured side by side in one
run; ``make bench`` writes them to the README.

From a shell (``make bench`` runs the second line)::

    python -m lowvram._bench                  # a table on stdout (progress on stderr)
    python -m lowvram._bench --write-readme   # ... and the README's Performance section
    python -m lowvram._bench --json           # JSON on stdout, the table on stderr
    python -m lowvram._bench --quick          # without the notebooks (the slowest part)
    python -m lowvram._bench --threads 2      # loops at 2 threads only (default: the cores, then 1)

From Python (``tiny_plan()`` runs in seconds; what the tests use)::

    from lowvram._bench import default_plan, run_all, format_table
    results = run_all(default_plan(), notebooks=False)
    print(format_table(results))

What is measured. Absolute times on a shared machine are noise, so each figure that has a goal
is a ratio of two things measured next to each other:

1. **Loop overhead.** ``lowvram.train.train`` against a hand-written nanoGPT-style PyTorch loop
   (forward, ``(loss / accum).backward()``, clip when the gradients are complete, AdamW step,
   ``zero_grad``) on the same model, data, precision, threads and accumulation. The two alternate
   step by step in one process: at each optimizer step, lowvram's ``on_optimizer_step`` callback runs one step of
   the plain loop and one reference matmul (ABAB...). A step is the time between two consecutive
   moments when the gradients are complete, so it covers everything a step does: the
   micro-batches, clipping, the optimizer, and in lowvram's loop also accelerate's wrappers, the
   loss/token reduction, the ``.item()`` calls and the history record. Goal: lowvram / plain <= 1.05.
   Both loops run at torch's default thread count and again at 1 thread (``BenchPlan.threads``).
2. **CPU efficiency.** Training FLOP/s from the same step times, divided by this machine's fp32
   matmul FLOP/s (``torch.mm`` of two 2048 x 2048 matrices) timed next to each step.
   Training FLOPs per token = 6 N + 12 n_layer n_embd T (nanoGPT's / PaLM's estimate; N counts
   the parameters used in matmuls: all but the token and position embeddings, which are lookups;
   a tied head counts once; the attention term counts the full T x T, as nanoGPT does).
   A profiled step says how much of the time the matmuls take. Goal: >= 0.70 on the mid-size model.
3. **Memory planner.** ``lowvram.memory.measure_step`` on the rtx2050 config (fp32, CUDA target):
   its run time, and its CPU-target peak against the real CPU allocator (``real_cpu_peaks``) on
   a model small enough to train for real. Goals: <= 5 s (a plan is
   interactive), within 1 % of the real allocator.
4. **Notebooks.** ``pytest --nbval`` of each numbered notebook, one subprocess each.
5. **Import cost.** ``import lowvram`` and ``import lowvram.train`` on top of torch + accelerate in
   a fresh interpreter, and whether transformers was imported (it should be only when the LR
   schedule is built).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from lowvram._bench.loops import (
    bf16_vs_fp32,
    loop_comparison,
    matmul_flops,
    step_breakdown,
    training_flops_per_token,
)
from lowvram._bench.paths import REPO
from lowvram._bench.probes import import_cost, notebook_times, planner_bench
from lowvram._bench.report import (
    README_END,
    README_START,
    check_readme,
    format_table,
    readme_section,
    write_readme,
)
from lowvram._bench.suite import (
    MID_MODEL,
    BenchPlan,
    LoopSpec,
    default_plan,
    machine_info,
    run_all,
    thread_counts,
    tiny_plan,
)

__all__ = [
    "MID_MODEL",
    "README_END",
    "README_START",
    "BenchPlan",
    "bf16_vs_fp32",
    "check_readme",
    "LoopSpec",
    "default_plan",
    "format_table",
    "import_cost",
    "loop_comparison",
    "machine_info",
    "main",
    "matmul_flops",
    "notebook_times",
    "planner_bench",
    "readme_section",
    "run_all",
    "step_breakdown",
    "thread_counts",
    "tiny_plan",
    "training_flops_per_token",
    "write_readme",
]


# --------------------------------------------------------------------------- command line

# recorded in the README's command: the thread counts torch starts with, and the Makefile's NB_ENV
_RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowvram._bench [--json] [--write-readme] [--quick] [--tiny] [--threads N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lowvram._bench",
        description="Benchmarks of lowvram, measured side by side in one run.",
    )
    parser.add_argument("--json", action="store_true",
                        help="JSON on stdout (the table goes to stderr)")
    parser.add_argument("--write-readme", action="store_true",
                        help="rewrite the README's Performance section (between its bench markers)")
    parser.add_argument("--readme", default=str(REPO / "README.md"), help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="skip the notebooks (the slowest part)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs, seconds in all (a smoke test: the numbers mean nothing)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of the loop measurements (default: torch's default "
                        "count, then 1)")
    args = parser.parse_args(argv)
    if args.write_readme:  # checked before minutes of measuring, not after
        if args.quick or args.tiny:
            parser.error("--write-readme with --quick/--tiny is not allowed: the README states "
                         "the full benchmark's figures (--tiny's mean nothing, --quick has no "
                         "notebooks); drop those flags, or leave out --write-readme")
        try:
            check_readme(args.readme)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    plan = tiny_plan() if args.tiny else default_plan()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} is not allowed: use an integer >= 1")
        plan = dataclasses.replace(plan, threads=(args.threads,))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_all(plan, notebooks=not args.quick, log=log)
    table = format_table(results)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(results, indent=1))
    else:
        print(table)
    if args.write_readme:
        flags = [f"--{name.replace('_', '-')}" for name in ("json", "write_readme", "quick", "tiny")
                 if getattr(args, name)]
        if args.threads is not None:
            flags.append(f"--threads {args.threads}")
        env = [f"{k}={os.environ[k]}" for k in _RECORDED_ENV if k in os.environ]
        command = " ".join([*env, "python -m lowvram._bench", *flags])
        write_readme(readme_section(results, command), args.readme)
        log(f"wrote the Performance section of {args.readme}")
    return 0
