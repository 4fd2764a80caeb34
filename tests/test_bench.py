"""lowvram._bench (developer tooling): the benchmark runs on the tiny preset and reports what it says (no timing asserts)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import pkgutil
import statistics
from pathlib import Path

import pytest
import torch

from lowvram import _bench as bench
from lowvram._bench import cli
from lowvram.config import TrainConfig, get_preset
from lowvram.model import GPTModel

REPO = Path(__file__).resolve().parents[1]
MODEL, TRAIN = get_preset("tiny")  # vocab 96, block 16, 2 x 2 x 32; batch 2 x accum 2


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``python -m lowvram._bench --tiny --quick --json``, its section written into a copy of
    the README (``--write-readme`` itself refuses --tiny/--quick)."""
    readme = tmp_path_factory.mktemp("bench") / "README.md"
    readme.write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert bench.main(["--tiny", "--quick", "--json"]) == 0
    results = json.loads(out.getvalue())
    bench.write_readme(bench.readme_section(results, "python -m lowvram._bench --tiny"), readme)
    return results, readme


def positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_flops_formula_counts_matmul_parameters() -> None:
    # per block: 2 LayerNorms 2*64, c_attn 32*96+96, c_proj 32*32+32, c_fc 32*128+128,
    # mlp c_proj 128*32+32 = 12704; 2 blocks + ln_f 64 + lm head 96*32 = 28544 (no embeddings)
    n, per_token = bench.training_flops_per_token(MODEL)
    assert n == 28544
    assert n == GPTModel(MODEL).num_parameters() - 96 * 32 - 16 * 32  # minus wte and wpe
    assert per_token == 6 * 28544 + 12 * 2 * 32 * 16
    tied, _ = bench.training_flops_per_token(dataclasses.replace(MODEL, tie_embeddings=True))
    assert tied == n  # the tied head is the token embedding, counted once


def test_loops_report_times_ratio_and_efficiency(cli_run: tuple[dict, Path]) -> None:
    results, _ = cli_run
    assert results["plan"] == "tiny"
    assert [(r["name"], r["threads"], r["goal"]) for r in results["loops"]] == [("tiny", 1, True)]
    r = results["loops"][0]
    assert len(r["lowvram_s"]) == len(r["plain_s"]) == len(r["matmul_s"]) == r["steps"] == 3
    assert all(t > 0 for t in r["lowvram_s"] + r["plain_s"] + r["matmul_s"])
    for key in ("lowvram_median_s", "plain_median_s", "ratio", "matmul_flops", "matmul_flops_best",
                "lowvram_flops", "plain_flops", "lowvram_efficiency", "plain_efficiency"):
        assert positive(r[key]), key
    assert r["matmul_flops_best"] >= r["matmul_flops"]
    assert r["tokens_per_step"] == 2 * 2 * 16
    assert r["flops_per_step"] == (6 * 28544 + 12 * 2 * 32 * 16) * 64
    assert r["lowvram_flops"] == pytest.approx(r["flops_per_step"] / r["lowvram_median_s"])
    assert r["precision"] == "no"


def test_breakdown_shares_add_up(cli_run: tuple[dict, Path]) -> None:
    [b] = cli_run[0]["breakdown"]
    assert (b["name"], b["threads"]) == ("tiny", 1)
    shares = [b[k] for k in ("matmul", "attention", "optimizer", "other")]
    assert all(0 <= s <= 1 for s in shares)
    assert sum(shares) == pytest.approx(1.0)
    assert b["matmul"] > 0 and positive(b["matmul_efficiency"])


def test_thread_counts_default_then_one(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = bench.default_plan()
    # thread_counts looks up torch.get_num_threads on the torch module at call time
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert bench.thread_counts(plan) == [2, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert bench.thread_counts(plan) == [1]
    assert bench.thread_counts(dataclasses.replace(plan, threads=(3,))) == [3]
    with pytest.raises(ValueError, match="integer >= 1"):
        bench.thread_counts(dataclasses.replace(plan, threads=(0,)))


def test_planner_time_and_error(cli_run: tuple[dict, Path]) -> None:
    p = cli_run[0]["planner"]
    assert p["planner_parameters"] == GPTModel(MODEL).num_parameters()
    assert len(p["planner_times_s"]) == 1 and positive(p["planner_median_s"])
    assert p["real_peak_bytes"] > 0 and p["estimated_peak_bytes"] > 0
    assert abs(p["relative_error"]) <= 0.01  # the planner's goal; the tracker is exact on a CPU
    assert positive(p["plan_s"]) and p["plan_measurements"] >= len(p["plan_rows"]) == 7
    assert positive(p["plan_target_s"]) and p["plan_target_measurements"] >= 7
    assert p["plan_workers"] >= 1
    # the same plan again, its steps read from the disk cache the whole plan filled
    assert positive(p["plan_target_disk_s"])
    assert p["plan_target_disk_lookups"] == p["plan_target_measurements"]
    assert p["plan_cli_disk_s"] is None  # the command line plans presets; this model is none


def test_imports_and_lazy_transformers(cli_run: tuple[dict, Path]) -> None:
    imp = cli_run[0]["imports"]
    for key in ("torch_accelerate_s", "lowvram_s", "lowvram_train_s", "schedule_s"):
        assert positive(imp[key]), key
    assert imp["transformers_after_import"] is False
    assert imp["transformers_after_schedule"] is True


def test_machine_and_quick_skips_notebooks(cli_run: tuple[dict, Path]) -> None:
    results, _ = cli_run
    assert results["notebooks"] is None
    m = results["machine"]
    assert m["torch_threads"] >= 1 and m["logical_cpus"] >= 1 and m["cpu"]
    assert positive(results["total_s"])


def test_write_readme_replaces_only_between_markers(cli_run: tuple[dict, Path]) -> None:
    results, readme = cli_run
    original = (REPO / "README.md").read_text(encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    head, tail = original.split(bench.README_START)[0], original.split(bench.README_END)[1]
    assert text.startswith(head + bench.README_START + "\n")
    assert text.endswith("\n" + bench.README_END + tail)
    inside = text[len(head) + len(bench.README_START) : -len(bench.README_END + tail)]
    assert "`python -m lowvram._bench --tiny`" in inside
    assert bench.format_table(results) in inside
    assert results["machine"]["cpu"] in inside and "load average" in inside.lower()
    # rewriting replaces the old section instead of adding a second one
    bench.write_readme("second run", readme)
    assert readme.read_text(encoding="utf-8") == head + bench.README_START + "\nsecond run\n" + bench.README_END + tail


def test_write_readme_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench.write_readme("x", tmp_path / "missing.md")
    no_markers = tmp_path / "a.md"
    no_markers.write_text("# title\n")
    with pytest.raises(ValueError, match="exactly one of each"):
        bench.write_readme("x", no_markers)
    swapped = tmp_path / "b.md"
    swapped.write_text(f"{bench.README_END}\n{bench.README_START}\n")
    with pytest.raises(ValueError, match="comes before"):
        bench.write_readme("x", swapped)
    assert swapped.read_text() == f"{bench.README_END}\n{bench.README_START}\n"


def test_table_marks_goals(cli_run: tuple[dict, Path]) -> None:
    results, _ = cli_run
    table = bench.format_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Figure | Measured | Goal | Met |"
    assert sum("Loop overhead, tiny, 1 thread:" in line for line in lines) == 1
    assert any("within 1 %" in line and line.endswith("| yes |") for line in lines)
    failing = {**results, "planner": {**results["planner"], "relative_error": 0.02}}
    assert any("within 1 %" in line and line.endswith("| **no** |")
               for line in bench.format_table(failing).splitlines())


def test_loop_comparison_rejects_no_steps() -> None:
    with pytest.raises(ValueError, match="steps=0"):
        bench.loop_comparison(MODEL, TRAIN, steps=0)


@pytest.mark.slow
def test_notebook_times_pass_and_fail(tmp_path: Path) -> None:
    import nbformat

    def notebook(name: str, stored: str) -> Path:
        cell = nbformat.v4.new_code_cell("print(1 + 1)", execution_count=1)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
        path = tmp_path / name
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
        return path

    good, bad = notebook("good.ipynb", "2\n"), notebook("bad.ipynb", "3\n")
    results = bench.notebook_times([good, bad])
    assert [r["notebook"] for r in results] == ["good.ipynb", "bad.ipynb"]
    assert [r["passed"] for r in results] == [True, False]
    assert all(r["seconds"] > 0 for r in results)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench.notebook_times([tmp_path / "missing.ipynb"])


@pytest.mark.parametrize("flag", ["--quick", "--tiny"])
def test_write_readme_refuses_quick_and_tiny_before_running(tmp_path, flag, monkeypatch, capsys):
    # main looks run_all up in lowvram._bench.cli: patching the package would not stop a real run
    monkeypatch.setattr(cli, "run_all", lambda *a, **k: pytest.fail("it ran the benchmark"))
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.README_START}\nreal figures\n{bench.README_END}\n")
    with pytest.raises(SystemExit) as info:
        bench.main([flag, "--write-readme", "--readme", str(readme)])
    assert info.value.code == 2
    assert "--write-readme with --quick/--tiny is not allowed" in capsys.readouterr().err
    assert "real figures" in readme.read_text()  # untouched


def test_write_readme_checks_its_target_before_running(tmp_path, monkeypatch, capsys):
    # main looks run_all up in lowvram._bench.cli: patching the package would not stop a real run
    monkeypatch.setattr(cli, "run_all", lambda *a, **k: pytest.fail("it ran the benchmark"))
    no_markers = tmp_path / "a.md"
    no_markers.write_text("# title\n")
    for readme, words in ((no_markers, "exactly one of each"), (tmp_path / "no.md", "does not exist")):
        with pytest.raises(SystemExit):
            bench.main(["--write-readme", "--readme", str(readme)])
        assert words in capsys.readouterr().err


def test_bf16_row(cli_run: tuple[dict, Path]) -> None:
    b = cli_run[0]["bf16"]
    assert len(b["fp32_s"]) == len(b["bf16_s"]) == b["steps"] == 2
    assert positive(b["ratio"]) and positive(b["fp32_median_s"]) and positive(b["bf16_median_s"])
    assert isinstance(b["native_bf16"], list)
    assert any(line.startswith("| bf16 autocast vs fp32 on this CPU")
               for line in bench.format_table(cli_run[0]).splitlines())
    assert bench.default_plan().bf16_model == bench.MID_MODEL  # 6 x 384, block 256
    assert (bench.MID_MODEL.n_layer, bench.MID_MODEL.n_embd, bench.MID_MODEL.block_size) == (6, 384, 256)


def test_notebook_env_is_the_makefiles(monkeypatch) -> None:
    """bench defines no notebook environment of its own: `make bench` passes NB_ENV."""
    makefile = (REPO / "Makefile").read_text()
    assert "NB_ENV := PYTHONHASHSEED=0" in makefile
    assert "$(NB_ENV) $(PY) -m lowvram._bench --write-readme" in makefile
    modules = [bench] + [importlib.import_module(f"{bench.__name__}.{m.name}")
                         for m in pkgutil.iter_modules(bench.__path__) if m.name != "__main__"]
    assert len(modules) > 1  # the package and its modules, where the code is
    for module in modules:
        assert not hasattr(module, "_NB_ENV"), module.__name__


# --------------------------------------------------------------------------- the GPU part


def _gpu_results() -> dict:
    """What ``run_gpu`` returns, made up (the GPU part itself is in tests/test_gpu.py)."""
    row = {"name": "fp16 4 x 4 (the lesson's)", "precision": "fp16", "micro_batch": 4,
           "gradient_accumulation_steps": 4, "optimizer": "adamw", "adamw_impl": None,
           "loss_chunk_size": 0, "tokens_per_step": 4096, "steps": 10, "warmup": 3,
           "lowvram_median_ms": 93.1, "plain_median_ms": 72.7, "ratio": 93.1 / 72.7,
           "lowvram_tokens_per_s": 4096 / 0.0931, "plain_tokens_per_s": 4096 / 0.0727,
           "lowvram_peak_bytes": 3201 * 2**20, "plain_peak_bytes": 3100 * 2**20}
    fast = {**row, "name": "bf16 4 x 4", "lowvram_median_ms": 50.0, "plain_median_ms": 49.0,
            "ratio": 50.0 / 49.0}
    return {"gpu": {"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                    "torch": "2.11.0+cu130", "cuda": "13.0", "accelerate": "1.15.0",
                    "python": "3.12.3"},
            "started_utc": "2026-12-04 16:30 UTC", "total_s": 75.0, "rows": [row, fast],
            "notes": ["16 x 1 row 'fp16 + chunked loss + 8-bit AdamW': not run: no bitsandbytes"]}


def test_gpu_table_states_times_ratio_tokens_and_peaks() -> None:
    from lowvram._bench.gpu import format_gpu_table

    lines = format_gpu_table(_gpu_results()).splitlines()
    assert lines[2] == ("| fp16 4 x 4 (the lesson's) | 93.1 | 72.7 | **1.281** | 43,996 | 56,341 | "
                        "3,201 / 3,100 MiB | **no** |")
    assert lines[3].startswith("| bf16 4 x 4 | 50.0 | 49.0 | **1.020** |") and lines[3].endswith("| yes |")
    assert lines[-1] == "- 16 x 1 row 'fp16 + chunked loss + 8-bit AdamW': not run: no bitsandbytes"


@pytest.mark.parametrize(("ratio", "interval", "shown", "met"), [
    (1.02, (1.010, 1.040), "**1.020** (95%: 1.010-1.040)", "yes"),
    (1.07, (1.060, 1.090), "**1.070** (95%: 1.060-1.090)", "**no**"),
    (1.02, (1.000, 1.080), "**1.020** (95%: 1.000-1.080)", "not decided (the interval holds the goal)"),
])  # fmt: skip
def test_a_paired_rows_goal_is_judged_on_its_interval(ratio, interval, shown, met) -> None:
    """A paired row meets the goal only if its whole 95% interval does: a median of 1.020 whose
    interval reaches 1.08 has not shown <= 1.05."""
    from lowvram._bench.gpu import format_gpu_table

    results = _gpu_results()
    results["rows"] = [{**results["rows"][1], "method": "paired", "ratio": ratio,
                        "ratio_interval": interval}]
    row = format_gpu_table(results).splitlines()[2]
    assert f"| {shown} |" in row and row.endswith(f"| {met} |")


def test_median_interval_is_the_binomial_order_statistics() -> None:
    from lowvram._bench.gpu import median_interval

    # n = 24: P(Binomial(24, 1/2) <= 6) = 0.0113 <= 0.025 < P(... <= 7) = 0.0320: the 7th and
    # 18th of the sorted values
    assert median_interval([float(x) for x in range(24, 0, -1)]) == (7.0, 18.0)
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)  # n = 6: the extremes
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 1/32 > 0.025: too few for 95%


def test_paired_memory_gives_each_loop_its_own_peak() -> None:
    """Both loops on the GPU, taking turns: the allocator sees their sum. Made-up bytes: base
    10; the plain loop holds 100 after its build; train()'s first turn peaks at 300 of its own
    and ends holding 200; the plain loop's turn peaks at 250 and ends at 120; train()'s next
    turn peaks at 350 and ends at 200 again."""
    from lowvram._bench.gpu import _PairedMemory

    m = _PairedMemory(base=10, plain=100)
    m.turn_ended("train", 10 + 200 + 100, 10 + 300 + 100)
    assert m.peak == {"train": 10 + 300, "plain": 0} and m.own == {"train": 200, "plain": 100}
    m.turn_ended("plain", 10 + 200 + 120, 10 + 200 + 250)
    assert m.peak == {"train": 310, "plain": 10 + 250} and m.own == {"train": 200, "plain": 120}
    m.turn_ended("train", 10 + 200 + 120, 10 + 350 + 120)
    assert m.peak == {"train": 10 + 350, "plain": 260}


def test_gpu_readme_section_names_the_gpu_and_goes_between_its_markers(tmp_path: Path) -> None:
    from lowvram._bench.gpu import (
        GPU_README_END,
        GPU_README_START,
        gpu_readme_section,
        not_measured_section,
    )

    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    before = readme.read_text()
    section = gpu_readme_section(_gpu_results(), "python -m lowvram._bench --gpu --write-readme")
    assert "- **GPU:** NVIDIA H200 (compute capability 9.0, 140 GiB), torch 2.11.0+cu130" in section
    bench.write_readme(section, readme, GPU_README_START, GPU_README_END)
    text = readme.read_text()
    start, end = text.index(GPU_README_START), text.index(GPU_README_END)
    assert "| fp16 4 x 4 (the lesson's) | 93.1 |" in text[start:end]
    # the CPU section and everything else are untouched
    assert text[:start] == before[:before.index(GPU_README_START)]
    assert text[end:] == before[before.index(GPU_README_END):]
    assert "ran without a CUDA GPU (no GPU here)" in not_measured_section("no GPU here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_flag_without_cuda_writes_not_measured(tmp_path: Path, capsys) -> None:
    """Without CUDA the GPU section says "not measured", unless a GPU measured it before: that
    table stays (make bench on a laptop must not wipe the numbers of a lent H200)."""
    from lowvram._bench.gpu import GPU_README_END, GPU_README_START, gpu_readme_section

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{GPU_README_START}\nold text\n{GPU_README_END}\n", encoding="utf-8")
    assert bench.main(["--gpu", "--json", "--write-readme", "--readme", str(readme)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] is None and out["rows"] == [] and "not measured" in out["notes"][0]
    text = readme.read_text()
    section = text[text.index(GPU_README_START):text.index(GPU_README_END)]
    assert "Not measured: the last `make bench`" in section and "old text" not in section
    assert "torch.cuda.is_available() is False" in section

    measured = f"# x\n\n{GPU_README_START}\n{gpu_readme_section(_gpu_results(), 'c')}\n{GPU_README_END}\n"
    readme.write_text(measured, encoding="utf-8")
    assert bench.main(["--gpu", "--write-readme", "--readme", str(readme)]) == 0
    assert readme.read_text() == measured
    assert "kept the GPU section of" in (err := capsys.readouterr().err)
    assert "measured on NVIDIA H200, 2026-12-04 16:30 UTC" in err


def test_gpu_flag_refuses_the_cpu_parts_options(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--gpu", "--quick"])
    assert "--gpu takes no --quick/--tiny/--threads" in capsys.readouterr().err


def test_make_bench_runs_the_gpu_part_and_cpu_targets_hide_cuda() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "NB_ENV := PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=\n" in makefile
    assert "\t$(PY) -m lowvram._bench --gpu --write-readme\n" in makefile  # CUDA visible
    assert "\nTEST_ENV := $(NB_ENV) " in makefile  # the test parts' environment hides CUDA too
    for target in ("native", "portable-sse41 portable-avx2", "notebooks"):
        recipe = makefile.split(f"\n{target}:")[1].split("\n\n")[0]
        assert "$(NB_ENV)" in recipe or "$(TEST_ENV)" in recipe, target
    assert "env $(CPU_$*) $(TEST_ENV)" in makefile  # each emulated CPU's pass


class _FakeEvent:
    """torch.cuda.Event on the host clock (the GPU bench's timing, without a GPU)."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def test_gpu_bench_runs_both_loops_and_picks_the_plans_16x1_row(monkeypatch) -> None:
    """The GPU bench's orchestration with torch.cuda faked and both loops on the CPU: each
    loop's steps are timed, the ratio is theirs, and the 16 x 1 row is the plan's first that runs."""
    from types import SimpleNamespace

    import lowvram.memory
    import lowvram.train
    from lowvram._bench import gpu, loops
    from lowvram.memory import Recipe

    MiB = 2**20
    free = {"bytes": 80 * 2**30}  # the GPU's free memory: room for both loops at first
    for name, value in {"is_available": True, "is_bf16_supported": False, "synchronize": None,
                        "empty_cache": None, "reset_peak_memory_stats": None,
                        "max_memory_allocated": 123 * MiB, "memory_allocated": 100 * MiB,
                        "memory_stats": {"allocated_bytes.all.current": 200 * MiB,
                                         "allocated_bytes.all.peak": 300 * MiB}}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, _v=value, **k: _v)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(gpu, "gpu_info", lambda: {"name": "Fake GPU"})
    real_train, real_plain = lowvram.train.train, loops._plain_loop
    monkeypatch.setattr(lowvram.train, "train", lambda *a, **k: real_train(*a, **{**k, "cpu": True}))
    monkeypatch.setattr(loops, "_plain_loop", lambda *a: real_plain(*a[:-1], torch.device("cpu")))
    fused = Recipe("fp16 + fused + chunked loss", "fp16", adamw_impl="fused", loss_chunk_size=8)
    eight = Recipe("fp16 + chunked loss + 8-bit AdamW", "fp16", "adamw8bit", loss_chunk_size=8)
    rows = [SimpleNamespace(recipe=Recipe("fp16", "fp16"), micro_batch=4, fits=True),
            SimpleNamespace(recipe=fused, micro_batch=16, fits=True),
            SimpleNamespace(recipe=eight, micro_batch=16, fits=True)]
    monkeypatch.setattr(lowvram.memory, "plan", lambda *a, **k: rows)
    monkeypatch.setattr(gpu, "get_preset", lambda name: (MODEL, TRAIN))  # tiny, not rtx2050
    import lowvram.verify  # bitsandbytes would not import under the faked torch.cuda

    monkeypatch.setattr(lowvram.verify, "bitsandbytes_problem", lambda: None)
    monkeypatch.setattr(lowvram.verify, "warm_matmul_libraries", lambda device: None)

    specs, notes = gpu.default_gpu_specs()
    names = [s.name for s in specs]
    assert names[0] == "fp16 4 x 4 (the lesson's)" and notes[0] == "bf16 4 x 4: not run, this GPU has no bf16"
    if "adamw_impl" in TrainConfig.__dataclass_fields__:  # the fused row is the plan's first 16 x 1
        assert names[1].startswith("16 x 1: fp16 + fused + chunked loss")
    else:
        assert "cannot be trained yet" in notes[1]
        assert names[1] == "16 x 1: fp16 + chunked loss + 8-bit AdamW (the plan's best 16 x 1 row)"
        assert specs[1].train.optimizer == "adamw8bit" and specs[1].model.loss_chunk_size == 8
    assert (specs[1].train.per_device_train_batch_size, specs[1].train.gradient_accumulation_steps) == (16, 1)

    # paired: one train() run whose hook runs the plain loop's steps, 6 timed after 1 warm-up
    results = gpu.run_gpu(specs[:1], steps=6, warmup=1)
    (row,) = results["rows"]
    assert row["method"] == "paired" and row["round_ratios"] == [] and row["rounds"] == 1
    assert len(row["lowvram_ms"]) == len(row["plain_ms"]) == len(row["step_ratios"]) == 6
    assert all(positive(x / 1e3) for x in row["lowvram_ms"] + row["plain_ms"])
    assert row["step_ratios"] == [a / b for a, b in zip(row["lowvram_ms"], row["plain_ms"], strict=True)]
    assert row["ratio"] == statistics.median(row["step_ratios"])
    assert row["ratio_interval"] == (min(row["step_ratios"]), max(row["step_ratios"]))  # n = 6
    # the faked events read the host's clock too, microseconds apart: each turn's two times
    # agree (all but a turn or two, where a garbage collection may fall between the two reads)
    for loop in ("lowvram", "plain"):
        pairs = list(zip(row[f"{loop}_host_ms"], row[f"{loop}_ms"], strict=True))
        assert len(pairs) == 6 and sum(abs(h - e) < 0.5 for h, e in pairs) >= 4, (loop, pairs)
        assert row[f"{loop}_host_median_ms"] == statistics.median(row[f"{loop}_host_ms"])
    assert "95%: " in gpu.format_gpu_table(results) and "taking turns step by step" in \
        gpu.gpu_readme_section({**results, "gpu": _gpu_results()["gpu"]}, "x")
    # the fake allocator: 100 MiB before either loop (base) and after the plain loop's build
    # (so it holds 0 of its own), 200 MiB at each turn's end, a peak of 300 MiB in each turn
    assert row["lowvram_peak_bytes"] == (300 - 0) * MiB  # less what the plain loop held: 0
    assert row["plain_peak_bytes"] == (300 - 100) * MiB  # less train()'s own: 200 - base 100
    assert row["tokens_per_step"] == 4 * 4 * MODEL.block_size  # the 4 x 4 spec
    assert results["gpu"] == {"name": "Fake GPU"} and results["notes"] == []

    # too little free memory for both at once: one after the other, rounds in turn, and a note
    free["bytes"] = 1 * MiB
    results = gpu.run_gpu(specs[:1], steps=2, warmup=1, rounds=2)
    (row,) = results["rows"]
    assert row["method"] == "rounds" and row["ratio_interval"] is None
    assert len(row["lowvram_ms"]) == len(row["plain_ms"]) == 2 * 2  # 2 steps, 2 rounds
    assert row["ratio"] == row["lowvram_median_ms"] / row["plain_median_ms"]
    assert row["round_ratios"] == [  # each round: its own train() run against its plain run
        statistics.median(row["lowvram_ms"][i:i + 2]) / statistics.median(row["plain_ms"][i:i + 2])
        for i in (0, 2)]
    assert f"**{row['ratio']:.3f}** ({row['round_ratios'][0]:.2f}, " in gpu.format_gpu_table(results)
    assert row["lowvram_peak_bytes"] == row["plain_peak_bytes"] == 123 * MiB
    assert results["notes"] == [f"{row['name']}: {row['note']}"]
    assert row["note"].startswith("not paired: 0.0 GiB free on the GPU, two loops at once need")

    # room by the estimate, but the pair runs out of memory: one after the other all the same
    free["bytes"] = 80 * 2**30
    builds = []

    def plain_short_of_memory(*args):
        builds.append(len(builds))
        if len(builds) == 1:  # the paired run's plain loop, built next to train()'s
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_plain(*args[:-1], torch.device("cpu"))

    monkeypatch.setattr(loops, "_plain_loop", plain_short_of_memory)
    (row,) = gpu.run_gpu(specs[:1], steps=2, warmup=1, rounds=1)["rows"]
    assert row["method"] == "rounds" and len(row["lowvram_ms"]) == len(row["plain_ms"]) == 2
    assert row["note"] == ("not paired: both loops at once ran out of GPU memory (CUDA out of "
                           "memory. Tried to allocate 2.00 GiB); measured one after the other, "
                           "1 round")


def test_gpu_results_from_a_lent_machine_go_into_the_readme(tmp_path: Path, capsys) -> None:
    from lowvram._bench.gpu import GPU_README_END, GPU_README_START

    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    results = tmp_path / "bench_gpu.json"
    results.write_text(json.dumps(_gpu_results()))
    assert bench.main(["--gpu", "--gpu-results", str(results), "--write-readme",
                       "--readme", str(readme)]) == 0
    assert "| fp16 4 x 4 (the lesson's) | 93.1 | 72.7 | **1.281** |" in capsys.readouterr().out
    text = readme.read_text()
    section = text[text.index(GPU_README_START):text.index(GPU_README_END)]
    assert "- **GPU:** NVIDIA H200" in section and "| bf16 4 x 4 | 50.0 |" in section
    results.write_text("{}")
    assert bench.main(["--gpu", "--gpu-results", str(results)]) == 2
    assert "not the JSON of a --gpu --json run (KeyError" in capsys.readouterr().err
    assert bench.main(["--gpu", "--gpu-results", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read it (No such file or directory)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--gpu-results", str(results)])
    assert "--gpu-results needs --gpu" in capsys.readouterr().err


# --------------------------------------------------------------------------- the host-bound proxy


def test_host_bound_row_states_times_ratio_and_op_counts(cli_run: tuple[dict, Path]) -> None:
    results, _ = cli_run
    [h] = results["host_bound"]  # the tiny plan: fp32 only, the tiny model, 4 x 4
    assert (h["precision"], h["micro_batch"], h["accumulation"], h["threads"]) == ("no", 4, 4, 1)
    assert len(h["lowvram_s"]) == len(h["plain_s"]) == h["steps"] == 2
    assert positive(h["ratio"]) and positive(h["lowvram_median_s"])
    # StepLog's loss sum: one op per micro-batch (tests/test_host_ops.py has the breakdown)
    assert h["ops_train"] - h["ops_plain"] == 4
    [line] = [x for x in bench.format_table(results).splitlines() if "Host-bound proxy" in x]
    assert "not a GPU measurement" in line and "fp32 4 x 4" in line
    assert f"{h['ops_train']:,} / {h['ops_plain']:,} (+4); Python calls per step" in line
    assert 0 < h["python_calls_train"] - h["python_calls_plain"] < 1000
    assert bench.default_plan().host_bound_model.n_layer == get_preset("rtx2050")[0].n_layer


def test_the_gpu_sections_ratios_stand_next_to_the_proxy(cli_run: tuple[dict, Path]) -> None:
    from lowvram._bench.gpu import gpu_readme_section, not_measured_section, readme_gpu_ratios

    section = gpu_readme_section(_gpu_results(), "python -m lowvram._bench --gpu --write-readme")
    text = f"# x\n<!-- bench-gpu:start -->\n{section}\n<!-- bench-gpu:end -->\n"
    ref = readme_gpu_ratios(text)
    assert ref == {"gpu": "NVIDIA H200", "started_utc": "2026-12-04 16:30 UTC",
                   "ratios": {"fp16 4 x 4 (the lesson's)": pytest.approx(93.1 / 72.7, abs=5e-4),
                              "bf16 4 x 4": pytest.approx(50 / 49, abs=5e-4)}}
    unmeasured = f"<!-- bench-gpu:start -->\n{not_measured_section('no CUDA')}\n<!-- bench-gpu:end -->"
    assert readme_gpu_ratios(unmeasured) is None and readme_gpu_ratios("no markers") is None
    lines = bench.format_table({**cli_run[0], "gpu_reference": ref}).splitlines()
    [line] = [x for x in lines if x.startswith("| For comparison:")]
    assert "NVIDIA H200" in line and "fp16 4 x 4 (the lesson's) **1.281**" in line
    assert lines.index(line) == 1 + next(i for i, x in enumerate(lines) if "Host-bound proxy" in x)


def test_gpu_profiles_pageable_variant_turns_pinning_and_non_blocking_off() -> None:
    """``python -m lowvram._bench.gpu_profile``'s "pageable" run (batches as before issue 19)
    must reach the loaders although their callers pass pin_memory/non_blocking themselves (a
    functools.partial did not: the caller's keyword won, and "pageable" measured "base")."""
    import lowvram.train
    from lowvram._bench.gpu_profile import _variant
    from lowvram.data import build_dataloaders, random_rows

    rows = random_rows(MODEL, 8, seed=0)
    with _variant("pageable"):
        loaders = build_dataloaders(rows, rows, batch_size=2, pin_memory=True)
        config = lowvram.train.DataLoaderConfiguration(non_blocking=True, use_seedable_sampler=True)
    assert [loader.pin_memory for loader in loaders] == [False, False]
    assert (config.non_blocking, config.use_seedable_sampler) == (False, True)
    # and only inside the variant
    assert build_dataloaders(rows, rows, batch_size=2, pin_memory=True)[0].pin_memory
    assert lowvram.train.DataLoaderConfiguration(non_blocking=True).non_blocking
