"""The reports of ``lowvram._bench``: the results as a Markdown table, the README's Performance
section (between ``README_START`` and ``README_END``), and writing it into the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowvram._bench.paths import REPO

__all__ = [
    "README_END",
    "README_START",
    "check_readme",
    "format_table",
    "readme_section",
    "write_readme",
]

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def _shape(model: dict[str, Any]) -> str:
    return (f"{model['n_layer']}x{model['n_embd']}, {model['n_head']} heads, block "
            f"{model['block_size']}, vocab {model['vocab_size']}")


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _precision(precision: str) -> str:
    return {"no": "fp32", "fp16": "fp16 (autocast and GradScaler forced on the CPU, as on a GPU)"
            }.get(precision, precision)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def format_table(results: dict[str, Any]) -> str:
    """The results as one Markdown table: figure, measured, goal, met."""
    rows: list[tuple[str, str, str, str]] = []
    for r in results["loops"]:
        rows.append((
            f"Loop overhead, {r['name']}, {_threads(r['threads'])}: median optimizer step, lowvram / "
            "plain PyTorch",
            f"{r['lowvram_median_s'] * 1e3:.1f} ms / {r['plain_median_s'] * 1e3:.1f} ms: "
            f"**{r['ratio']:.3f}** (median of {r['steps']} per-step ratios)",
            "<= 1.05", _yes(r["ratio"] <= 1.05),
        ))
    for r in results["loops"]:
        rows.append((
            f"CPU efficiency, {r['name']}, {_threads(r['threads'])}: training FLOP/s / fp32 matmul "
            "FLOP/s",
            f"lowvram {r['lowvram_flops'] / 1e9:.1f} GFLOP/s / {r['matmul_flops'] / 1e9:.1f} GFLOP/s "
            f"(fastest matmul {r['matmul_flops_best'] / 1e9:.0f}): **{r['lowvram_efficiency']:.2f}**; "
            f"plain PyTorch {r['plain_flops'] / 1e9:.1f} GFLOP/s: {r['plain_efficiency']:.2f}",
            ">= 0.70" if r["goal"] else "-", _yes(r["lowvram_efficiency"] >= 0.70) if r["goal"] else "-",
        ))
    for h in results.get("host_bound") or []:
        rows.append((
            f"Host-bound proxy of a fast GPU (not a GPU measurement), {_precision(h['precision'])} "
            f"{h['micro_batch']} x {h['accumulation']}, {_shape(h['model'])}, 1 thread: median "
            "optimizer step, lowvram / plain PyTorch",
            f"{h['lowvram_median_s'] * 1e3:.1f} ms / {h['plain_median_s'] * 1e3:.1f} ms: "
            f"**{h['ratio']:.3f}** (median of {h['steps']} per-step ratios); ATen ops per step "
            f"{h['ops_train']:,} / {h['ops_plain']:,} ({h['ops_train'] - h['ops_plain']:+,}); "
            f"Python calls per step {h['python_calls_train']:,} / {h['python_calls_plain']:,} "
            f"({h['python_calls_train'] - h['python_calls_plain']:+,})",
            "<= 1.05", _yes(h["ratio"] <= 1.05),
        ))
    g = results.get("gpu_reference")
    if results.get("host_bound") and g:
        rows.append((
            f"For comparison: `train()` / plain measured on a CUDA GPU ({g['gpu']}, "
            f"{g['started_utc'] or 'date not stated'}; the GPU section below, not this machine)",
            "; ".join(f"{name} **{ratio:.3f}**" for name, ratio in g["ratios"].items()),
            "<= 1.05", "-",
        ))
    for b in results["breakdown"]:
        rows.append((
            f"Where a step's time goes, {b['name']}, {_threads(b['threads'])} (one profiled plain "
            "PyTorch step)",
            f"matmuls {b['matmul']:.0%} (at {b['matmul_efficiency']:.2f} of the reference matmul's "
            f"FLOP/s), attention {b['attention']:.0%}, AdamW {b['optimizer']:.0%}, the rest "
            f"(LayerNorm, GELU, softmax, loss, clipping, copies) {b['other']:.0%}",
            "-", "-",
        ))
    b = results.get("bf16")
    if b:
        native = ", ".join(b["native_bf16"]) or "none"
        rows.append((
            f"bf16 autocast vs fp32 on this CPU (native bf16: {native}): one eager training step "
            f"of {_shape(b['model'])}, batch {b['micro_batch']}, fp32 / bf16",
            f"{b['fp32_median_s'] * 1e3:.0f} ms / {b['bf16_median_s'] * 1e3:.0f} ms: "
            f"**{b['ratio']:.2f}x** (median of {b['steps']} side-by-side pairs)",
            "- (advice only)", "-",
        ))
    p = results["planner"]
    rows.append((
        f"Memory planner run time: `measure_step` of {_shape(p['planner_model'])} "
        f"({p['planner_parameters'] / 1e6:.1f}M parameters; micro-batch {p['planner_micro_batch']}, "
        "fp32, target cuda)",
        f"**{p['planner_median_s']:.2f} s** (median of {len(p['planner_times_s'])}; first "
        f"{p['planner_first_s']:.2f} s)",
        "<= 5 s", _yes(p["planner_median_s"] <= 5),
    ))
    if "plan_target_s" in p:
        rows.append((
            f"Memory plan run time: `plan(...)` of {_shape(p['planner_model'])}, 4 GiB, effective "
            "batch 16, every default recipe (notebook 25_2's plan cell), empty memo",
            f"**{p['plan_target_s']:.1f} s** ({p['plan_target_measurements']} fake-tensor recordings, most of 2-3 layers (depth.py), "
            f"{p['plan_workers']} recording process(es))",
            "<= 5 s", _yes(p["plan_target_s"] <= 5),
        ))
    if "plan_s" in p:
        rows.append((
            f"Memory plan run time: `plan(..., largest=True)` of {_shape(p['planner_model'])}, "
            "4 GiB, effective batch 16, every default recipe (what `--plan` runs), empty memo",
            f"**{p['plan_s']:.1f} s** ({p['plan_measurements']} fake-tensor recordings)",
            "<= 5 s", _yes(p["plan_s"] <= 5),
        ))
    if "plan_target_disk_s" in p:
        rows.append((
            "The same `plan(...)` again with its steps in the disk cache "
            "(lowvram/memory/_diskcache.py; `make lab` fills it once): memo emptied, nothing recorded",
            f"**{p['plan_target_disk_s']:.2f} s**", "<= 5 s", _yes(p["plan_target_disk_s"] <= 5),
        ))
    if p.get("plan_cli_disk_s") is not None:
        rows.append((
            "`python -m lowvram.memory --preset rtx2050 --plan` in a new process, its steps in the "
            "disk cache (imports included)",
            f"**{p['plan_cli_disk_s']:.1f} s**", "<= 5 s", _yes(p["plan_cli_disk_s"] <= 5),
        ))
    rows.append((
        f"Memory planner error: CPU-target peak vs the real CPU allocator ({_shape(p['real_model'])}; "
        f"micro-batch {p['real_micro_batch']}, fp32)",
        f"{p['estimated_peak_bytes'] / 2**20:.2f} MiB vs {p['real_peak_bytes'] / 2**20:.2f} MiB: "
        f"**{p['relative_error']:+.3%}**",
        "within 1 %", _yes(abs(p["relative_error"]) <= 0.01),
    ))
    for nb in results["notebooks"] or []:
        rows.append((
            f"Notebook `{nb['notebook']}`: strict nbval",
            f"{nb['seconds']:.1f} s, {'passed' if nb['passed'] else 'FAILED: ' + nb['summary']}",
            "passes", _yes(nb["passed"]),
        ))
    imp = results["imports"]
    rows.append((
        "Import cost on top of torch + accelerate "
        f"({imp['torch_accelerate_s']:.2f} s themselves; median of {imp['repeats']} fresh interpreters)",
        f"`import lowvram` {imp['lowvram_s'] * 1e3:.0f} ms, then `import lowvram.train` "
        f"+{imp['lowvram_train_s'] * 1e3:.0f} ms; building the LR schedule +{imp['schedule_s']:.2f} s",
        "-", "-",
    ))
    rows.append((
        "transformers imported by `import lowvram.train` / by building the schedule",
        f"{'yes' if imp['transformers_after_import'] else 'no'} / "
        f"{'yes' if imp['transformers_after_schedule'] else 'no'}",
        "no / yes",
        _yes(not imp["transformers_after_import"] and imp["transformers_after_schedule"]),
    ))
    lines = ["| Figure | Measured | Goal | Met |", "| :--- | :--- | :--- | :--- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def readme_section(results: dict[str, Any], command: str) -> str:
    """The text between the README's markers: machine, date, command, table, method."""
    m = results["machine"]
    loads = ""
    samples = [x["load_1min"] for x in results.get("load_samples", [])]
    if samples:
        loads = (f" 1-min load average {samples[0]:.2f} before the measurements, "
                 f"{min(samples[1:] or samples):.2f}-{max(samples[1:] or samples):.2f} during them "
                 "(this includes the benchmark's own 1-2 busy threads).")
        if samples[0] > 0.5:
            loads += (" Other jobs shared these cores, so absolute times are slower than on an idle "
                      "machine. Ratios of steps measured next to each other hold up, but with 2 "
                      "threads every small op (AdamW, LayerNorm, ...) waits for whichever OpenMP "
                      "thread is descheduled while a large matmul hardly does: compare the 2-thread "
                      "rows with the 1-thread rows.")
    first = {r["name"]: r for r in results["loops"]}  # one per config (the counts do not vary)
    configs = "; ".join(
        f"**{name}**: {_shape(r['model'])}, batch {r['per_device_train_batch_size']} x accumulation "
        f"{r['gradient_accumulation_steps']} ({r['tokens_per_step']} tokens, "
        f"{r['flops_per_step'] / 1e9:.1f} GFLOP per optimizer step), precision "
        f"{r['precision']!r}, N = {r['matmul_params']:,}" for name, r in first.items()
    )
    counts = ", ".join(
        f"{name}: {r['steps']} timed steps after {r['skipped']} dropped" for name, r in first.items()
    )
    notebook_min = ""
    if results["notebooks"]:
        seconds = sum(nb["seconds"] for nb in results["notebooks"])
        notebook_min = f", {seconds / 60:.1f} of them the notebooks"
    return "\n".join([
        "Generated by `make bench`; do not edit by hand (it is rewritten on every run).",
        "",
        f"- **Command:** `{command}`, {results['started_utc']}, {results['total_s'] / 60:.1f} min "
        f"in all{notebook_min}.",
        f"- **Machine:** {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"torch {m['torch']} (default {_threads(m['torch_threads'])}), accelerate "
        f"{m['accelerate']}, Python {m['python']}, {m['platform']}.{loads}",
        f"- **Configs:** {configs}.",
        "",
        format_table(results),
        "",
        "How these are measured (`lowvram/_bench/` has the details):",
        "",
        "- **Loop overhead.** `lowvram.train.train` against a hand-written nanoGPT-style loop "
        "(forward, `(loss / accum).backward()`, clip once the gradients are complete, AdamW step, "
        "`zero_grad`): same model, random data, precision, threads and accumulation. The two "
        "alternate step by step in one process (lowvram's `on_optimizer_step` callback runs one plain step and one "
        f"reference matmul, in alternating order; {counts}), so load from other jobs hits both "
        "alike. A step runs from one moment the gradients are complete to the next, so lowvram's "
        "includes accelerate's wrappers, the per-step loss/token reduction, its `.item()` calls "
        "and the history record. The ratio is the median of the per-step ratios. Each runs at "
        "the machine's default thread count and at 1 thread: with other jobs on the cores, "
        "2 OpenMP threads wait on each other in every small op (AdamW, LayerNorm, ...) far more "
        "than in a large matmul, while 1 thread is only time-sliced.",
        "- **Host-bound proxy.** On a fast GPU the rtx2050 model's kernels finish before Python "
        "issues the next ones, so a step takes the host's time to issue it (an H200: ~28 ms of "
        "GPU work in a step of over 70 ms). The same loop comparison (1 thread) on a model of "
        "its depth (12 layers, 12 heads: its number of ops) at a tiny width, whose CPU kernels "
        "take microseconds, measures that host time on a CPU; `lowvram._bench.host_ops` also "
        "counts each loop's ATen ops per step (exact on any machine; `tests/test_host_ops.py` "
        "holds the difference) and Python function calls per step (exact for these library "
        "versions). fp16: autocast and a GradScaler forced on the CPU in both loops (CPU fp16 "
        "kernels are slow, so that row is less host-bound). A proxy: the GPU's own ratio is "
        "measured only on a GPU.",
        "- **CPU efficiency.** Training FLOPs per token = 6 N + 12 n_layer n_embd T (N: parameters "
        "used in matmuls, without the token and position embeddings; the T x T attention term "
        "in full), times tokens per step, per second; divided, step by step, by "
        f"the FLOP/s of an fp32 `torch.mm` of two {results['matmul_n']} x {results['matmul_n']} "
        "matrices timed next to that step; the median of those ratios.",
        "- **bf16 on the CPU.** One eager training step (forward, backward, AdamW) in fp32 and "
        "under `torch.autocast(\"cpu\", torch.bfloat16)`, two models alternating step by step; "
        "the ratio is the median of the per-pair ratios fp32 / bf16 (above 1: bf16 is faster). "
        "`lowvram.precision.precision_advice` suggests bf16 on CPUs with native bf16 "
        "(avx512_bf16, amx_bf16); the notebooks stay fp32.",
        "- **Planner.** `lowvram.memory.measure_step` with its cache cleared each run; the error "
        "compares its `target=\"cpu\"` peak with `real_cpu_peaks` (torch.profiler's allocator).",
        "- **Notebooks.** `python -m pytest --nbval --nbval-current-env --nbval-sanitize-with "
        "notebooks/sanitize.cfg notebooks/X.ipynb`, one subprocess per numbered notebook.",
        "- **Imports.** Timed inside fresh interpreters: torch + accelerate first, then "
        "`import lowvram`, then `import lowvram.train`, then `lowvram.train.lr_schedule(...)`.",
    ])


def check_readme(path: str | Path, start_marker: str = README_START,
                 end_marker: str = README_END) -> tuple[str, int, int]:
    """``path``'s text and the span between its markers; a clear error if it cannot take one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"readme={str(path)!r} does not exist: pass the project's README.md")
    text = path.read_text(encoding="utf-8")
    if text.count(start_marker) != 1 or text.count(end_marker) != 1:
        raise ValueError(
            f"{path} has {text.count(start_marker)} {start_marker!r} and {text.count(end_marker)} "
            f"{end_marker!r} markers: it needs exactly one of each, start before end"
        )
    start = text.index(start_marker) + len(start_marker)
    end = text.index(end_marker)
    if end < start:
        raise ValueError(f"{path}: {end_marker!r} comes before {start_marker!r}: swap them")
    return text, start, end


def write_readme(section: str, path: str | Path = REPO / "README.md",
                 start_marker: str = README_START, end_marker: str = README_END) -> None:
    """Replace the text between ``README_START`` and ``README_END`` (or other markers) in
    ``path`` with ``section``."""
    path = Path(path)
    text, start, end = check_readme(path, start_marker, end_marker)
    path.write_text(text[:start] + "\n" + section.strip("\n") + "\n" + text[end:], encoding="utf-8")
