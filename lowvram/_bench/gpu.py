"""The GPU mode of ``lowvram._bench``: ``train()`` against the plain PyTorch loop on a CUDA GPU.

    python -m lowvram._bench --gpu                  # a table on stdout
    python -m lowvram._bench --gpu --write-readme   # ... and the README's GPU section

For each configuration on the rtx2050 model (the lesson's fp16 4 x 4, bf16 4 x 4, and the
planner's best 16 x 1 row for a 4 GiB card), ``lowvram.train.train`` against the hand-written
loop of ``lowvram._bench.loops`` (``torch.autocast`` + ``GradScaler``, the same model,
optimizer, data and accumulation, clipping once the gradients are complete), on an otherwise
idle GPU. Both loops live on the GPU at once and take turns, one optimizer step each: train()'s
``on_optimizer_step`` callback runs one step of the plain loop. Each turn is timed on the GPU's
own clock, between CUDA events recorded where a loop's gradients are complete, with no
synchronisation added, so a loop whose Python cannot keep the GPU busy shows as slower; and
step k of one loop runs next to step k of the other, so the host's drift hits both alike (two H200
runs two hours apart timed the plain loop's bf16 step at 82 and 122 ms). Reported: the median ms per
optimizer step after ``warmup`` steps, tokens/s, the ratio train() / plain (the median per-step
ratio, with its 95% interval; goal <= 1.05), and each loop's peak allocated memory. Where the
two do not fit on the GPU together (a 4 GiB card), they run one after the other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import io
import math
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowvram.config import ModelConfig, TrainConfig, get_preset

__all__ = [
    "GPU_README_END",
    "GPU_README_START",
    "GpuSpec",
    "default_gpu_specs",
    "format_gpu_table",
    "gpu_info",
    "gpu_loop_comparison",
    "gpu_readme_section",
    "not_measured_section",
    "readme_gpu_ratios",
    "run_gpu",
]

GPU_README_START = "<!-- bench-gpu:start -->"
GPU_README_END = "<!-- bench-gpu:end -->"
GOAL = 1.05  # train() / plain loop, per optimizer step
MiB = 2**20


@dataclass(frozen=True)
class GpuSpec:
    """One configuration of the GPU bench."""

    name: str
    model: ModelConfig
    train: TrainConfig


def default_gpu_specs(log: Callable[[str], None] = lambda msg: None) -> tuple[list[GpuSpec], list[str]]:
    """The configurations on the rtx2050 model, and notes on any that cannot run here.

    fp16 4 x 4 (the lesson's), bf16 4 x 4 (where the GPU has bf16), and the first row of
    ``lowvram.memory.plan(rtx2050, card_gib=4, target_effective_batch=16)`` that runs 16 x 1
    and fits (the recipes are ordered from the lesson's to the leanest, so the first is the one
    with the fewest changes).
    """
    from lowvram.memory import plan
    from lowvram.verify import bitsandbytes_problem, configs_for

    model, train = get_preset("rtx2050")
    specs = [GpuSpec("fp16 4 x 4 (the lesson's)", model,
                     train.replace(mixed_precision="fp16", per_device_train_batch_size=4,
                                   gradient_accumulation_steps=4))]
    notes = []
    if torch.cuda.is_bf16_supported():
        specs.append(GpuSpec("bf16 4 x 4", model, train.replace(mixed_precision="bf16")))
    else:
        notes.append("bf16 4 x 4: not run, this GPU has no bf16")
    log("  the plan for a 4 GiB card (its best 16 x 1 row)")
    rows = [r for r in plan(model, 4.0, 16) if r.fits and r.micro_batch == 16]
    for row in rows:
        try:
            m, t = configs_for(model, train, row.recipe, 16, 1)
        except ValueError as err:
            notes.append(f"16 x 1 row '{row.recipe.name}': not run: {err}")
            continue
        problem = bitsandbytes_problem() if row.recipe.optimizer == "adamw8bit" else None
        if problem:
            notes.append(f"16 x 1 row '{row.recipe.name}': not run: {problem}")
            continue
        specs.append(GpuSpec(f"16 x 1: {row.recipe.name} (the plan's best 16 x 1 row)", m, t))
        break
    else:
        notes.append("16 x 1: no plan row with micro-batch 16 fits a 4 GiB card and runs here"
                     if not rows else "16 x 1: none of the plan's 16 x 1 rows runs here")
    return specs, notes


def gpu_info() -> dict[str, Any]:
    """The GPU and software facts the README states next to the numbers."""
    import accelerate

    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _intervals(events: list[torch.cuda.Event], warmup: int) -> list[float]:
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=True)][warmup:]


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median of ``values``: the order statistics
    ``k`` and ``n + 1 - k`` (1-based), ``k`` the largest with P(Binomial(n, 1/2) < k) <=
    (1 - level) / 2, so the interval holds the true median with probability >= ``level`` (for
    any distribution of independent values). None where ``values`` are too few (n < 6 at 95%)."""
    xs = sorted(values)
    n, tail, below, k = len(xs), (1 - level) / 2, 0.0, 0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return None if k == 0 else (xs[k - 1], xs[n - k])


class _PairedMemory:
    """Each loop's own allocated peak while both live on the GPU and take turns.

    A loop that waits (the plain loop inside train()'s hook, train() while the plain loop runs
    its step) neither allocates nor frees, so at each turn the allocator's current bytes less
    the running loop's own are the waiting loop's. Every turn ends with one reading (current
    bytes, peak since the last reading), and the peak is reset: the running loop's own peak in
    that turn is the reading's peak less the waiting loop's bytes. Both peaks include ``base``
    (what was allocated before either loop: the cuBLAS workspaces), as a run alone would.
    """

    def __init__(self, base: int, plain: int) -> None:
        self.base = base
        self.own = {"train": 0, "plain": plain}  # each loop's bytes, without base
        self.peak = {"train": 0, "plain": 0}

    def turn_ended(self, loop: str, current: int, peak: int) -> None:
        waiting = "plain" if loop == "train" else "train"
        self.peak[loop] = max(self.peak[loop], peak - self.own[waiting])
        self.own[loop] = current - self.base - self.own[waiting]


def _reading() -> tuple[int, int]:
    """(allocated bytes now, the peak since the last reset), then a reset: the caching
    allocator's host-side counters, no wait for the GPU."""
    stats = torch.cuda.memory_stats()
    torch.cuda.reset_peak_memory_stats()
    return stats.get("allocated_bytes.all.current", 0), stats.get("allocated_bytes.all.peak", 0)


def gpu_loop_comparison(spec: GpuSpec, *, steps: int = 30, warmup: int = 3, rounds: int = 2,
                        paired: bool = True) -> dict[str, Any]:
    """``train()`` against the plain loop on ``spec``: ``warmup + steps`` timed steps.

    ``paired`` (the default): both loops at once, step by step in turn, as the CPU bench does
    (``loops.loop_comparison``): one ``train()`` run whose ``on_optimizer_step`` runs one step
    of the plain loop, a CUDA event on each side of it. So step k of each loop runs next to
    step k of the other, and whatever the machine does meanwhile (the host's other load, its
    clock) hits both alike. The ratio is the median of the per-step ratios, with a 95%
    interval (:func:`median_interval`). It needs both loops in GPU memory: where the GPU's free
    memory is below 2 x 16 bytes a parameter (x 1.25), or the pair runs out of memory, the
    sequential way runs instead, and the row's ``note`` says why.

    Sequential (``paired=False``): a ``train()`` run, then a plain run, ``rounds`` times in
    turn; the medians pool the rounds' steps. On a fast GPU this model's step is bound by the
    host (an H200: 28 ms of GPU work in a step of over 100 ms), whose drift between runs is
    larger than the difference sought: two H200 runs this way, two hours apart, timed the plain
    loop's bf16 step at 82 and 122 ms. Hence the paired default.
    """
    from lowvram._bench.loops import _plain_loop
    from lowvram.data import random_rows
    from lowvram.train import train
    from lowvram.verify import warm_matmul_libraries

    if steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"steps={steps}, warmup={warmup}, rounds={rounds}: need steps >= 1, "
                         "warmup >= 0 and rounds >= 1")
    device = torch.device("cuda")
    model_config, train_config = spec.model, spec.train
    total = warmup + steps + 1  # events; the intervals between them are the steps
    batch = train_config.effective_batch_size
    # one spare window: no epoch end (with its evaluation and checkpoint) among the timed steps
    rows = random_rows(model_config, (total + 1) * batch, seed=0)
    val = random_rows(model_config, train_config.per_device_eval_batch_size, seed=1)

    def record(events: list[torch.cuda.Event]) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)

    def run_train(hook: Callable[[torch.nn.Module], None]) -> None:
        with (tempfile.TemporaryDirectory() as out, warnings.catch_warnings(),
              contextlib.redirect_stdout(io.StringIO())):  # train()'s own lines: not the bench's
            warnings.simplefilter("ignore")
            config = train_config.replace(max_steps=total, num_epochs=1, eval_interval=0,
                                          eval_max_batches=1, checkpoint_interval=0,
                                          keep_checkpoints=1, log_interval=10**6, output_dir=out)
            train(model_config, config, train_data=rows, val_data=val, progress=False,
                  cpu=False, on_optimizer_step=hook)

    def run_paired() -> dict[str, Any]:
        _free()
        # the cuBLAS/cuBLASLt workspaces before either loop: in the base, shared by both,
        # instead of counted in whichever loop ran a matmul first
        warm_matmul_libraries(device)
        _free()
        base = torch.cuda.memory_allocated(device)
        plain = _plain_loop(model_config, train_config, total, rows, val, device)
        next(plain)  # build the model, optimizer and loader
        memory = _PairedMemory(base, torch.cuda.memory_allocated(device) - base)
        torch.cuda.reset_peak_memory_stats()
        ends: list[torch.cuda.Event] = []  # train()'s gradients complete: its turn ends
        starts: list[torch.cuda.Event] = []  # the plain loop's step done: train()'s turn starts
        host_ends: list[float] = []  # the host's clock at the same two places
        host_starts: list[float] = []

        def hook(model: torch.nn.Module) -> None:  # one reading and one event per turn each
            memory.turn_ended("train", *_reading())
            record(ends)
            host_ends.append(time.perf_counter())
            next(plain)
            memory.turn_ended("plain", *_reading())
            record(starts)
            host_starts.append(time.perf_counter())

        try:
            run_train(hook)
            memory.turn_ended("train", *_reading())  # its last step, evaluation and save
        finally:
            plain.close()  # its model and optimizer go with this function's frame
        torch.cuda.synchronize()
        # hook k: the plain loop's step k (its AdamW update of step k - 1, then the
        # micro-batches of step k) from ends[k] to starts[k]; train()'s step k, the same work,
        # from starts[k - 1] to ends[k]. Hook 0 has no train() step before it: dropped.
        lv = [starts[k - 1].elapsed_time(ends[k]) for k in range(1, total)][warmup:]
        pl = [ends[k].elapsed_time(starts[k]) for k in range(1, total)][warmup:]
        # the same turns on the host's clock: where a loop's GPU time is its host time, the
        # host is what it waits for (a diagnosis for gpu_profile, not the measurement)
        host_lv = [1e3 * (host_ends[k] - host_starts[k - 1]) for k in range(1, total)][warmup:]
        host_pl = [1e3 * (host_starts[k] - host_ends[k]) for k in range(1, total)][warmup:]
        return {"lowvram_ms": lv, "plain_ms": pl,
                "step_ratios": [a / b for a, b in zip(lv, pl, strict=True)],
                "lowvram_host_ms": host_lv, "plain_host_ms": host_pl,
                "lowvram_host_median_ms": statistics.median(host_lv),
                "plain_host_median_ms": statistics.median(host_pl),
                "lowvram_peak_bytes": memory.peak["train"], "plain_peak_bytes": memory.peak["plain"]}

    def run_alone(loop: str) -> tuple[list[float], int]:
        _free()
        events: list[torch.cuda.Event] = []
        if loop == "train":
            run_train(lambda model: record(events))
        else:
            plain = _plain_loop(model_config, train_config, total, rows, val, device)
            next(plain)  # build the model, optimizer and loader
            for _ in range(total):
                next(plain)
                record(events)
            plain.close()
            del plain
        return _intervals(events, warmup), torch.cuda.max_memory_allocated(device)

    result: dict[str, Any] = {"method": "paired", "round_ratios": [], "note": None}
    if paired:  # two loops' weights, gradients and AdamW moments (16 bytes a parameter), x 1.25
        from lowvram.model import GPTModel

        with torch.device("meta"):  # shapes only
            need = int(2 * 16 * 1.25 * GPTModel(model_config).num_parameters())
        free = torch.cuda.mem_get_info(device)[0]
        if free < need:
            paired = False
            result["note"] = (f"not paired: {free / 2**30:.1f} GiB free on the GPU, two loops at "
                              f"once need about {need / 2**30:.1f} GiB; measured one after the "
                              f"other, {rounds} round{'s' * (rounds != 1)}")
    if paired:
        try:
            result.update(run_paired())
        except torch.OutOfMemoryError as err:  # both loops do not fit: one after the other
            _free()
            paired = False
            first = (str(err).splitlines() or [""])[0][:120]
            result["note"] = (f"not paired: both loops at once ran out of GPU memory ({first}); "
                              f"measured one after the other, {rounds} round{'s' * (rounds != 1)}")
    if not paired:
        lowvram_ms: list[float] = []
        plain_ms: list[float] = []
        peaks = {"train": 0, "plain": 0}
        for _ in range(rounds):
            ms, peak = run_alone("train")
            ms2, peak2 = run_alone("plain")
            lowvram_ms, plain_ms = lowvram_ms + ms, plain_ms + ms2
            peaks = {"train": max(peaks["train"], peak), "plain": max(peaks["plain"], peak2)}
            result["round_ratios"].append(statistics.median(ms) / statistics.median(ms2))
        result.update(method="rounds", lowvram_ms=lowvram_ms, plain_ms=plain_ms,
                      lowvram_peak_bytes=peaks["train"], plain_peak_bytes=peaks["plain"])
    _free()
    tokens = batch * model_config.block_size
    lv, pl = statistics.median(result["lowvram_ms"]), statistics.median(result["plain_ms"])
    if result["method"] == "paired":
        ratio = statistics.median(result["step_ratios"])
        interval = median_interval(result["step_ratios"])
    else:
        ratio, interval = lv / pl, None
    return {
        "name": spec.name,
        "precision": train_config.mixed_precision,
        "micro_batch": train_config.per_device_train_batch_size,
        "gradient_accumulation_steps": train_config.gradient_accumulation_steps,
        "optimizer": train_config.optimizer,
        "adamw_impl": getattr(train_config, "adamw_impl", None),
        "loss_chunk_size": model_config.loss_chunk_size,
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds if result["method"] == "rounds" else 1,
        **result,
        "lowvram_median_ms": lv,
        "plain_median_ms": pl,
        "ratio": ratio,
        "ratio_interval": interval,
        "lowvram_tokens_per_s": tokens / (lv / 1e3),
        "plain_tokens_per_s": tokens / (pl / 1e3),
    }


def run_gpu(specs: list[GpuSpec] | None = None, *, steps: int = 30, warmup: int = 3,
            rounds: int = 2, paired: bool = True,
            log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Every configuration of ``specs`` (default: :func:`default_gpu_specs`); the results.
    ``steps``, ``warmup``, ``rounds``, ``paired``: :func:`gpu_loop_comparison`'s."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU bench needs a CUDA GPU: torch.cuda.is_available() is False")
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes: list[str] = []
    if specs is None:
        specs, notes = default_gpu_specs(log)
    rows = []
    for spec in specs:
        how = "the two loops step by step in turn" if paired else f"one after the other, {rounds}x"
        log(f"  GPU: {spec.name} ({warmup} + {steps} steps, {how})")
        try:
            rows.append(gpu_loop_comparison(spec, steps=steps, warmup=warmup, rounds=rounds,
                                            paired=paired))
        except Exception as err:  # e.g. out of memory: say so in the table's notes, go on
            notes.append(f"{spec.name}: failed: {type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:300]}")
            _free()
        else:
            r = rows[-1]
            if r.get("note"):
                notes.append(f"{spec.name}: {r['note']}")
            host = (f"; on the host's clock {r['lowvram_host_median_ms']:.1f} and "
                    f"{r['plain_host_median_ms']:.1f} ms" if "lowvram_host_median_ms" in r else "")
            log(f"    train() {r['lowvram_median_ms']:.1f} ms, plain {r['plain_median_ms']:.1f} ms: "
                f"{r['ratio']:.3f}{_spread(r)}{host}")
    return {"gpu": gpu_info(), "started_utc": started, "total_s": time.perf_counter() - t0,
            "rows": rows, "notes": notes}


# --------------------------------------------------------------------------- reports


def _spread(row: dict[str, Any]) -> str:
    """How sure the ratio is. Paired: the 95% interval of the median per-step ratio. One after
    the other: each round's ratio, where there was more than one."""
    interval = row.get("ratio_interval")
    if interval:
        return f" (95%: {interval[0]:.3f}-{interval[1]:.3f})"
    ratios = row.get("round_ratios") or []
    return f" ({', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""


def goal_met(row: dict[str, Any]) -> str:
    """"yes" / "**no**" for the ratio against the goal; with an interval, "yes" only if all of
    it is at or below the goal, "**no**" only if all of it is above, else "not decided"."""
    interval = row.get("ratio_interval")
    low, high = interval if interval else (row["ratio"], row["ratio"])
    if high <= GOAL:
        return "yes"
    return "**no**" if low > GOAL else "not decided (the interval holds the goal)"


def format_gpu_table(results: dict[str, Any]) -> str:
    """The GPU results as one Markdown table, then the notes."""
    lines = ["| Configuration (rtx2050 model) | `train()` ms/step | plain ms/step | `train()` / plain "
             "| `train()` tokens/s | plain tokens/s | peak allocated, `train()` / plain | Goal <= "
             f"{GOAL} met |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | :--- |"]
    for r in results["rows"]:
        lines.append(
            f"| {r['name']} | {r['lowvram_median_ms']:.1f} | {r['plain_median_ms']:.1f} | "
            f"**{r['ratio']:.3f}**{_spread(r)} | {r['lowvram_tokens_per_s']:,.0f} | "
            f"{r['plain_tokens_per_s']:,.0f} | {r['lowvram_peak_bytes'] / MiB:,.0f} / "
            f"{r['plain_peak_bytes'] / MiB:,.0f} MiB | {goal_met(r)} |"
        )
    lines += [f"\n- {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def _method(row: dict[str, Any]) -> str:
    """How ``row`` was measured, in words (results from before the paired method: sequential)."""
    if row.get("method") == "paired":
        return (f"both loops on the GPU at once, taking turns step by step: one `lowvram.train.train` "
                f"run whose `on_optimizer_step` runs one step of the plain loop, with a CUDA event "
                f"on each side of it, so that each loop's step k runs next to the other's and the "
                f"host's drift hits both alike; the ratio is the median of {row['steps']} "
                f"per-step ratios after {row['warmup']} warm-up steps, with its 95% interval "
                f"(order statistics of the binomial). Peak: the allocator's peak in each loop's "
                f"turns less what the waiting loop held")
    return (f"a `lowvram.train.train` run, then a run of the plain loop, taken in turn "
            f"{row.get('rounds', 1)} time(s) (each round's ratio in brackets); a CUDA event each "
            f"time the gradients are complete; the median of {row['steps']} steps after "
            f"{row['warmup']} warm-up steps, pooled over the rounds. Peak: "
            f"`torch.cuda.max_memory_allocated`, the largest of the runs")


def gpu_readme_section(results: dict[str, Any], command: str) -> str:
    """The text between the README's GPU markers: GPU, date, command, table, method."""
    g = results["gpu"]
    methods = list(dict.fromkeys(_method(r) for r in results["rows"])) or ["-"]
    return "\n".join([
        "Generated by `make bench` on a CUDA GPU; do not edit by hand.",
        "",
        f"- **Command:** `{command}`, {results['started_utc']}, {results['total_s'] / 60:.1f} min.",
        f"- **GPU:** {g['name']} (compute capability {g['capability']}, {g['memory_gib']:.0f} GiB), "
        f"torch {g['torch']} (CUDA {g['cuda']}), accelerate {g['accelerate']}, Python {g['python']}.",
        "",
        format_gpu_table(results),
        "",
        "How: the plain loop is `torch.autocast` + `GradScaler` with the same model, optimizer, "
        "data and accumulation, clipping once the gradients are complete; no synchronisation "
        "is added to either loop. " + "; or ".join(methods) + ".",
    ])


def readme_gpu_ratios(text: str) -> dict[str, Any] | None:
    """The GPU, date and ``train()`` / plain ratio of each row of the GPU section in a README's
    ``text`` (as :func:`gpu_readme_section` writes it); None where it holds no measured table.
    The CPU part states them next to its host-bound proxy (``lowvram._bench.host_ops``)."""
    if text.count(GPU_README_START) != 1 or text.count(GPU_README_END) != 1:
        return None
    section = text.split(GPU_README_START, 1)[1].split(GPU_README_END, 1)[0]
    rows = re.findall(r"^\| (.+?) \| [\d.,]+ \| [\d.,]+ \| \*\*([\d.]+)\*\*", section, re.M)
    gpu = re.search(r"^- \*\*GPU:\*\* ([^(,]+?) \(", section, re.M)
    when = re.search(r"^- \*\*Command:\*\* `[^`]*`, (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", section, re.M)
    if not rows or gpu is None:
        return None
    return {"gpu": gpu.group(1), "started_utc": when.group(1) if when else None,
            "ratios": {name: float(ratio) for name, ratio in rows}}


def not_measured_section(reason: str) -> str:
    """The README's GPU section where the bench ran without a GPU."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Not measured: the last `make bench` ({stamp}) ran without a CUDA GPU ({reason}). "
            "On a machine with one, `make bench` fills this section with `train()` against a "
            "plain PyTorch loop on the rtx2050 model.")
