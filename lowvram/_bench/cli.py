"""The command line of ``lowvram._bench`` (``python -m lowvram._bench --help``; ``make bench``
runs ``--write-readme``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lowvram._bench.paths import REPO
from lowvram._bench.report import check_readme, format_table, readme_section, write_readme
from lowvram._bench.suite import default_plan, run_all, tiny_plan

__all__ = ["main"]
_GPU_COMMAND = "python -m lowvram._bench --gpu --write-readme"  # what the README's GPU section names

# recorded in the README's command: the thread counts torch starts with, and the Makefile's NB_ENV
_RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _print_results(table: str, results: dict, as_json: bool) -> None:
    """The table on stdout; with --json, the JSON there and the table on stderr."""
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(results, indent=1))
    else:
        print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowvram._bench [--json] [--write-readme] [--quick] [--tiny] [--threads N]
    [--gpu]``. On a machine with CUDA the GPU part runs after the CPU's; ``--gpu`` runs only it."""
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
    parser.add_argument("--gpu", action="store_true",
                        help="only the GPU part: train() against a plain loop on CUDA (without "
                        "CUDA it says so; --write-readme then writes that into the GPU section)")
    parser.add_argument("--gpu-results", metavar="JSON",
                        help="with --gpu: report (and with --write-readme, write) the results of "
                        "an earlier --gpu --json run, e.g. make test-gpu's bench_gpu.json from a "
                        "lent GPU machine, instead of measuring here")
    args = parser.parse_args(argv)
    if args.gpu_results and not args.gpu:
        parser.error("--gpu-results needs --gpu")
    if args.gpu:
        if args.quick or args.tiny or args.threads is not None:
            parser.error("--gpu takes no --quick/--tiny/--threads: those are the CPU part's")
        return _gpu_main(args)
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
    results = run_all(plan, notebooks=not args.quick, log=_log)
    results["gpu_reference"] = _gpu_reference(args.readme)  # stated next to the host-bound proxy
    _print_results(format_table(results), results, args.json)
    if args.write_readme:
        flags = [f"--{name.replace('_', '-')}" for name in ("json", "write_readme", "quick", "tiny")
                 if getattr(args, name)]
        if args.threads is not None:
            flags.append(f"--threads {args.threads}")
        env = [f"{k}={os.environ[k]}" for k in _RECORDED_ENV if k in os.environ]
        command = " ".join([*env, "python -m lowvram._bench", *flags])
        write_readme(readme_section(results, command), args.readme)
        _log(f"wrote the Performance section of {args.readme}")
    if torch.cuda.is_available() and not (args.tiny or args.json):  # `make bench` runs --gpu
        return _gpu_main(args)
    return 0


def _gpu_reference(readme: str) -> dict | None:
    """The train() / plain ratios the README's GPU section states (a GPU's measurement), if any."""
    from lowvram._bench.gpu import readme_gpu_ratios

    try:
        return readme_gpu_ratios(Path(readme).read_text(encoding="utf-8"))
    except OSError:
        return None


def _gpu_main(args: argparse.Namespace) -> int:
    """The GPU part: its table (or JSON), and with --write-readme the README's GPU section."""
    from lowvram._bench.gpu import (
        GPU_README_END,
        GPU_README_START,
        format_gpu_table,
        gpu_readme_section,
        not_measured_section,
        run_gpu,
    )

    if args.write_readme:
        try:
            check_readme(args.readme, GPU_README_START, GPU_README_END)
        except (FileNotFoundError, ValueError) as err:
            _log(f"error: {err}")
            return 2
    if args.gpu_results:
        try:
            text = Path(args.gpu_results).read_text(encoding="utf-8")
        except OSError as err:
            _log(f"error: --gpu-results {args.gpu_results}: cannot read it ({err.strerror or err}); "
                 "give the bench_gpu.json of a --gpu --json run (make test-gpu writes one)")
            return 2
        try:
            results = json.loads(text)
            table = format_gpu_table(results)
        except (ValueError, KeyError, TypeError) as err:
            _log(f"error: --gpu-results {args.gpu_results}: not the JSON of a --gpu --json run "
                 f"({type(err).__name__}: {err})")
            return 2
        print(table)
        if args.write_readme:
            write_readme(gpu_readme_section(results, _GPU_COMMAND), args.readme, GPU_README_START,
                         GPU_README_END)
            _log(f"wrote the GPU section of {args.readme} from {args.gpu_results}")
        return 0
    if not torch.cuda.is_available():
        reason = f"torch {torch.__version__}: torch.cuda.is_available() is False"
        _log(f"GPU bench: not measured ({reason})")
        if args.json:
            print(json.dumps({"gpu": None, "rows": [], "notes": [f"not measured: {reason}"]}))
        if args.write_readme:
            # a table a GPU measured stays: a run on a machine without one has nothing to put
            # in its place (make bench on a laptop would otherwise wipe the H200's numbers)
            measured = _gpu_reference(args.readme)
            if measured is not None:
                _log(f"kept the GPU section of {args.readme}: measured on {measured['gpu']}, "
                     f"{measured['started_utc'] or 'undated'}")
                return 0
            write_readme(not_measured_section(reason), args.readme, GPU_README_START, GPU_README_END)
            _log(f"wrote the GPU section of {args.readme} (not measured)")
        return 0
    _log("GPU bench: train() against the plain PyTorch loop")
    results = run_gpu(log=_log)
    _print_results(format_gpu_table(results), results, args.json)
    if args.write_readme:
        write_readme(gpu_readme_section(results, _GPU_COMMAND), args.readme, GPU_README_START,
                     GPU_README_END)
        _log(f"wrote the GPU section of {args.readme}")
    return 0
