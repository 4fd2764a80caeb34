"""The GPU mode of ``lowvram._bench``: ``train()`` against the plain PyTorch loop on a CUDA GPU.

    python -m lowvram._bench --gpu                  # a table on stdout
    python -m lowvram._bench --gpu --write-readme   # ... and the README's GPU section

For each configuration on the rtx2050 model (the lesson's fp16 4 x 4, bf16 4 x 4, and the
planner's best 16 x 1 row for a 4 GiB card), one ``lowvram.train.train`` run and one run of the
hand-written loop of ``lowvram._bench.loops`` (``torch.autocast`` + ``GradScaler``, the same
model, optimizer, data and accumulation, clipping once the gradients are complete), one after
the other on an otherwise idle GPU. A step is timed on the GPU's own clock: a CUDA event is
recorded each time the gradients are complete (lowvram's ``on_optimizer_step`` callback; the
plain loop's yield), with no synchronisation in between, so a loop whose Python cannot keep the
GPU busy shows as slower. Reported: the median ms per optimizer step after ``warmup`` steps,
tokens/s, the ratio train() / plain (goal <= 1.05), and each run's peak allocated memory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import io
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


def gpu_loop_comparison(spec: GpuSpec, *, steps: int = 8, warmup: int = 3,
                        rounds: int = 2) -> dict[str, Any]:
    """``train()`` then the plain loop on ``spec``, ``rounds`` times in turn, each run
    ``warmup + steps`` timed steps; the medians pool the rounds' steps.

    On a fast GPU this model's step is bound by the host (Python issuing kernels: measured on
    an H200, 28 ms of GPU work in a step of over 100 ms), so the machine's other load moves a
    run's time; taking the loops in turn, more than once, keeps that drift out of the ratio.
    """
    from lowvram._bench.loops import _plain_loop
    from lowvram.data import random_rows
    from lowvram.train import train

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

    def run_train() -> tuple[list[float], int]:
        _free()
        events: list[torch.cuda.Event] = []
        with (tempfile.TemporaryDirectory() as out, warnings.catch_warnings(),
              contextlib.redirect_stdout(io.StringIO())):  # train()'s own lines: not the bench's
            warnings.simplefilter("ignore")
            config = train_config.replace(max_steps=total, num_epochs=1, eval_interval=0,
                                          eval_max_batches=1, checkpoint_interval=0,
                                          keep_checkpoints=1, log_interval=10**6, output_dir=out)
            train(model_config, config, train_data=rows, val_data=val, progress=False,
                  cpu=False, on_optimizer_step=lambda model: record(events))
        return _intervals(events, warmup), torch.cuda.max_memory_allocated(device)

    def run_plain() -> tuple[list[float], int]:
        _free()
        events: list[torch.cuda.Event] = []
        plain = _plain_loop(model_config, train_config, total, rows, val, device)
        next(plain)  # build the model, optimizer and loader
        for _ in range(total):
            next(plain)
            record(events)
        plain.close()
        del plain
        return _intervals(events, warmup), torch.cuda.max_memory_allocated(device)

    lowvram_ms: list[float] = []
    plain_ms: list[float] = []
    round_ratios = []
    lowvram_peak = plain_peak = 0
    for _ in range(rounds):
        ms, peak = run_train()
        lowvram_ms += ms
        lowvram_peak = max(lowvram_peak, peak)
        ms2, peak = run_plain()
        plain_ms += ms2
        plain_peak = max(plain_peak, peak)
        round_ratios.append(statistics.median(ms) / statistics.median(ms2))
    _free()
    tokens = batch * model_config.block_size
    lv, pl = statistics.median(lowvram_ms), statistics.median(plain_ms)
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
        "rounds": rounds,
        "round_ratios": round_ratios,
        "lowvram_ms": lowvram_ms,
        "plain_ms": plain_ms,
        "lowvram_median_ms": lv,
        "plain_median_ms": pl,
        "ratio": lv / pl,
        "lowvram_tokens_per_s": tokens / (lv / 1e3),
        "plain_tokens_per_s": tokens / (pl / 1e3),
        "lowvram_peak_bytes": lowvram_peak,
        "plain_peak_bytes": plain_peak,
    }


def run_gpu(specs: list[GpuSpec] | None = None, *, steps: int = 8, warmup: int = 3,
            rounds: int = 2, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Every configuration of ``specs`` (default: :func:`default_gpu_specs`); the results."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU bench needs a CUDA GPU: torch.cuda.is_available() is False")
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes: list[str] = []
    if specs is None:
        specs, notes = default_gpu_specs(log)
    rows = []
    for spec in specs:
        log(f"  GPU: {spec.name} ({warmup} + {steps} steps, train() then the plain loop, "
            f"{rounds}x)")
        try:
            rows.append(gpu_loop_comparison(spec, steps=steps, warmup=warmup, rounds=rounds))
        except Exception as err:  # e.g. out of memory: say so in the table's notes, go on
            notes.append(f"{spec.name}: failed: {type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:300]}")
            _free()
        else:
            r = rows[-1]
            log(f"    train() {r['lowvram_median_ms']:.1f} ms, plain {r['plain_median_ms']:.1f} ms: "
                f"{r['ratio']:.3f}")
    return {"gpu": gpu_info(), "started_utc": started, "total_s": time.perf_counter() - t0,
            "rows": rows, "notes": notes}


# --------------------------------------------------------------------------- reports


def _rounds(row: dict[str, Any]) -> str:
    """Each round's ratio, where there was more than one: the spread of the host's noise."""
    ratios = row.get("round_ratios") or []
    return f" ({', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""


def format_gpu_table(results: dict[str, Any]) -> str:
    """The GPU results as one Markdown table, then the notes."""
    lines = ["| Configuration (rtx2050 model) | `train()` ms/step | plain ms/step | `train()` / plain "
             "| `train()` tokens/s | plain tokens/s | peak allocated, `train()` / plain | Goal <= "
             f"{GOAL} met |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | :--- |"]
    for r in results["rows"]:
        lines.append(
            f"| {r['name']} | {r['lowvram_median_ms']:.1f} | {r['plain_median_ms']:.1f} | "
            f"**{r['ratio']:.3f}**{_rounds(r)} | {r['lowvram_tokens_per_s']:,.0f} | "
            f"{r['plain_tokens_per_s']:,.0f} | {r['lowvram_peak_bytes'] / MiB:,.0f} / "
            f"{r['plain_peak_bytes'] / MiB:,.0f} MiB | {'yes' if r['ratio'] <= GOAL else '**no**'} |"
        )
    lines += [f"\n- {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def gpu_readme_section(results: dict[str, Any], command: str) -> str:
    """The text between the README's GPU markers: GPU, date, command, table, method."""
    g = results["gpu"]
    steps = results["rows"][0] if results["rows"] else {"steps": "-", "warmup": "-"}
    return "\n".join([
        "Generated by `make bench` on a CUDA GPU; do not edit by hand.",
        "",
        f"- **Command:** `{command}`, {results['started_utc']}, {results['total_s'] / 60:.1f} min.",
        f"- **GPU:** {g['name']} (compute capability {g['capability']}, {g['memory_gib']:.0f} GiB), "
        f"torch {g['torch']} (CUDA {g['cuda']}), accelerate {g['accelerate']}, Python {g['python']}.",
        "",
        format_gpu_table(results),
        "",
        f"How: a `lowvram.train.train` run, then a run of the plain loop (`torch.autocast` + "
        f"`GradScaler`, the same model, optimizer, data and accumulation, clip once the gradients "
        f"are complete), taken in turn {steps.get('rounds', 1)} time(s) (each round's ratio in "
        f"brackets); a CUDA event each time the gradients are complete, no synchronisation in "
        f"between; the median of {steps['steps']} steps after {steps['warmup']} warm-up steps, "
        f"pooled over the rounds. Peak: `torch.cuda.max_memory_allocated`, the largest of the "
        f"runs.",
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
