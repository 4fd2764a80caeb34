"""The suite of ``lowvram._bench``: what to run (``BenchPlan``, ``default_plan``, ``tiny_plan``),
the machine it runs on, and ``run_all``, which runs every measurement of a plan in turn."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowvram._bench.loops import HOST_BOUND_MODEL, bf16_vs_fp32, loop_comparison, step_breakdown
from lowvram._bench.paths import REPO
from lowvram._bench.probes import import_cost, notebook_times, planner_bench
from lowvram.config import ModelConfig, TrainConfig, get_preset

__all__ = [
    "HOST_BOUND_MODEL",
    "MID_MODEL",
    "BenchPlan",
    "LoopSpec",
    "default_plan",
    "machine_info",
    "run_all",
    "thread_counts",
    "tiny_plan",
]

# The mid-size model of the efficiency goal: nanoGPT's "baby GPT" shape (6 x 6 x 384, block 256).
MID_MODEL = ModelConfig(vocab_size=2048, block_size=256, n_layer=6, n_head=6, n_embd=384)


# --------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class LoopSpec:
    """One loop comparison: a model, a loop config, and how many optimizer steps to time."""

    name: str
    model: ModelConfig
    train: TrainConfig
    steps: int  # optimizer steps timed (each loop)
    skip: int = 1  # steps dropped first: AdamW creates its state in the 1st; warm caches


@dataclass(frozen=True)
class BenchPlan:
    """What the benchmark runs and how often (the repetition counts the README states)."""

    loops: tuple[LoopSpec, ...]  # the last one is the efficiency goal's (mid-size) model
    # torch threads for the loops, one pass each; () = torch's default (the cores), then 1: with
    # other jobs on the cores, 2 OpenMP threads wait on each other (AdamW, LayerNorm, ... slow
    # down far more than a matmul), while 1 thread is only time-sliced
    threads: tuple[int, ...] = ()
    matmul_n: int = 2048  # the reference matmul: (n x n) @ (n x n), fp32, once per step
    planner_model: ModelConfig = get_preset("rtx2050")[0]
    planner_micro_batch: int = 4
    planner_repeats: int = 3  # measure_step runs, its cache cleared each time
    real_model: ModelConfig = get_preset("cpu-demo")[0]  # small enough for real_cpu_peaks
    real_micro_batch: int = 4
    import_repeats: int = 3  # fresh interpreters
    bf16_model: ModelConfig = MID_MODEL  # one eager training step, bf16 autocast vs fp32
    bf16_micro_batch: int = 4
    bf16_steps: int = 5  # timed pairs (fp32, bf16 alternating), after one warm-up pair
    notebook_glob: str = "notebooks/[0-9]*.ipynb"  # the numbered lesson notebooks
    # the host-bound proxy of a fast GPU (lowvram._bench.host_ops): the rtx2050's depth at a
    # tiny width, 4 x 4, 1 thread, train() against the plain loop, per precision
    host_bound_precisions: tuple[str, ...] = ("no", "bf16", "fp16")  # fp16: forced on the CPU
    host_bound_model: ModelConfig = HOST_BOUND_MODEL
    host_bound_steps: int = 20  # timed steps, after 2 dropped
    name: str = "default"


def default_plan() -> BenchPlan:
    """The plan of ``make bench``: 2-5 minutes on 2 cores (more when they are shared), plus the
    notebooks (about 10 minutes, most of it 25_3's training run)."""
    demo_model, demo_train = get_preset("cpu-demo")  # batch 4 x accumulation 4, fp32
    mid_train = demo_train.replace(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    return BenchPlan(
        loops=(
            LoopSpec("cpu-demo", demo_model, demo_train, steps=24, skip=2),
            LoopSpec("mid-size", MID_MODEL, mid_train, steps=6, skip=1),
        ),
    )


def tiny_plan() -> BenchPlan:
    """Every part on the tiny preset, in seconds (for tests; the numbers mean nothing)."""
    model, train = get_preset("tiny")
    return BenchPlan(
        loops=(LoopSpec("tiny", model, train, steps=3, skip=1),),
        threads=(1,),
        matmul_n=128,
        planner_model=model,
        planner_repeats=1,
        real_model=model,
        bf16_model=model,
        bf16_steps=2,
        import_repeats=1,
        host_bound_precisions=("no",),
        host_bound_model=model,
        host_bound_steps=2,
        name="tiny",
    )


# --------------------------------------------------------------------------- everything


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine facts the README states next to the numbers."""
    import accelerate

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def thread_counts(plan: BenchPlan) -> list[int]:
    """The torch thread counts the loops run at: ``plan.threads``, or by default torch's
    current count and then 1 (once, if that is the default)."""
    if plan.threads:
        if any(not (isinstance(t, int) and t >= 1) for t in plan.threads):
            raise ValueError(f"plan.threads={plan.threads!r}: each count must be an integer >= 1")
        return list(plan.threads)
    default = torch.get_num_threads()
    return [default, 1] if default > 1 else [1]


def run_all(
    plan: BenchPlan | None = None,
    *,
    notebooks: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run every benchmark of ``plan`` (default: ``default_plan()``); return the results."""
    plan = default_plan() if plan is None else plan
    if not plan.loops:
        raise ValueError("plan.loops is empty: give at least one LoopSpec")
    t_start = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    results: dict[str, Any] = {
        "plan": plan.name, "machine": machine_info(), "matmul_n": plan.matmul_n,
    }

    results["load_samples"] = []

    def stage(name: str) -> None:  # log it, and note the load as it starts
        log(name)
        if hasattr(os, "getloadavg"):
            results["load_samples"].append({"stage": name, "load_1min": os.getloadavg()[0]})

    stage("import cost (fresh interpreters)")
    results["imports"] = import_cost(plan.import_repeats)

    results["loops"], results["breakdown"] = [], []
    default_threads = torch.get_num_threads()
    try:
        for threads in thread_counts(plan):
            torch.set_num_threads(threads)
            for spec in plan.loops:
                stage(f"loop overhead and FLOP/s: {spec.name}, {threads} threads "
                    f"({spec.steps} steps + {spec.skip} dropped)")
                r = loop_comparison(spec.model, spec.train, steps=spec.steps, skip=spec.skip,
                                    matmul_n=plan.matmul_n, log=log)
                results["loops"].append({"name": spec.name, "goal": spec is plan.loops[-1], **r})
            spec = plan.loops[-1]
            stage(f"profiled step: {spec.name}, {threads} threads")
            results["breakdown"].append({
                "name": spec.name, "threads": threads,
                **step_breakdown(spec.model, spec.train, plan.matmul_n),
            })
    finally:
        torch.set_num_threads(default_threads)

    from lowvram._bench.host_ops import host_bound  # python -m lowvram._bench.host_ops runs it

    m = plan.host_bound_model
    stage(f"host-bound proxy: {m.n_layer}x{m.n_embd}, {', '.join(plan.host_bound_precisions)}, "
          "1 thread")
    results["host_bound"] = host_bound(plan.host_bound_precisions, steps=plan.host_bound_steps,
                                       model_config=m, log=log)

    stage(f"bf16 autocast vs fp32: {plan.bf16_model.n_layer}x{plan.bf16_model.n_embd}, "
          f"{torch.get_num_threads()} threads")
    results["bf16"] = bf16_vs_fp32(plan.bf16_model, plan.bf16_micro_batch, plan.bf16_steps)

    stage("memory planner")
    results["planner"] = planner_bench(plan.planner_model, plan.planner_micro_batch,
                                       plan.real_model, plan.real_micro_batch, plan.planner_repeats)

    if notebooks:
        stage("notebooks (nbval)")
        paths = sorted(REPO.glob(plan.notebook_glob))
        results["notebooks"] = notebook_times(paths, log=log)
    else:
        results["notebooks"] = None

    stage("done")
    results["started_utc"] = started.strftime("%Y-%m-%d %H:%M UTC")
    results["total_s"] = time.perf_counter() - t_start
    return results
