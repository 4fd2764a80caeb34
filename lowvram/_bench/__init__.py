"""Developer tooling, not part of the lesson: benchmarks of lowvram, measured side by side in one
run; ``make bench`` writes them to the README.

From a shell (``make bench`` runs the second line)::

    python -m lowvram._bench                  # a table on stdout (progress on stderr)
    python -m lowvram._bench --write-readme   # ... and the README's Performance section
    python -m lowvram._bench --json           # JSON on stdout, the table on stderr
    python -m lowvram._bench --quick          # without the notebooks (the slowest part)
    python -m lowvram._bench --threads 2      # loops at 2 threads only (default: the cores, then 1)
    python -m lowvram._bench --gpu            # only the GPU part (make bench runs it after the CPU's)

From Python (``tiny_plan()`` runs in seconds; what the tests use)::

    from lowvram._bench import default_plan, run_all, format_table
    results = run_all(default_plan(), notebooks=False)
    print(format_table(results))

This package only re-exports; the code is in its modules: ``suite`` (the plans, ``run_all``),
``loops`` (items 1 and 2 below, bf16 against fp32, the host-bound model), ``probes`` (items 3-5), ``report`` (the
table and the README's section), ``cli`` (``main``, which ``python -m lowvram._bench`` runs) and
``paths`` (where the repository is), ``gpu`` (item 6: the GPU mode, its table and README section),
``host_ops`` (item 7: ops per step and the host-bound proxy; ``python -m lowvram._bench.host_ops``).

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
   a model small enough to train for real, notebook 25_2's plan (``plan(...)``) and the whole
   plan (``plan(..., largest=True)``, what ``python -m lowvram.memory --plan`` runs), each from
   an empty memo and the disk cache off; then both again with their steps in the disk cache
   (the learner's second wait, and the first after ``make lab``). Goals: <= 5 s each (a plan is
   interactive), within 1 % of the real allocator.
4. **Notebooks.** ``pytest --nbval`` of each numbered notebook, one subprocess each.
5. **Import cost.** ``import lowvram`` and ``import lowvram.train`` on top of torch + accelerate in
   a fresh interpreter, and whether transformers was imported (it should be only when the LR
   schedule is built).
6. **On a CUDA GPU** (``--gpu``; ``make bench`` runs it with CUDA visible, after the CPU part,
   which runs with CUDA hidden): ``train()`` against the same plain loop on the GPU
   (``torch.autocast`` + ``GradScaler``) on the rtx2050 model, fp16 4 x 4, bf16 4 x 4 and the
   planner's best 16 x 1 row; ms per step (CUDA events), tokens/s, the ratio (goal <= 1.05) and
   each run's peak allocated memory. Without a GPU the README's GPU section says so.
7. **Host-bound proxy** (CPU part): on a fast GPU that model's step takes the host's time to
   issue it. ``train()`` against the plain loop as in item 1, at 1 thread, on a model of the
   rtx2050's depth (12 x 12) at a tiny width, whose CPU kernels take microseconds, so ms/step is
   host time; with each loop's ATen ops per step (exact; ``tests/test_host_ops.py`` holds the
   difference). Stated next to the ratios of the README's GPU section, not as a GPU figure.
   Goal: <= 1.05, as on the GPU.
"""

from __future__ import annotations

from lowvram._bench.cli import main
from lowvram._bench.loops import (
    bf16_vs_fp32,
    loop_comparison,
    matmul_flops,
    step_breakdown,
    training_flops_per_token,
)
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
