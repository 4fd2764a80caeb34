"""Where ``train()``'s optimizer step differs from the plain loop's, on a CUDA GPU (issue 19).

    python -m lowvram._bench.gpu_profile [--json PATH]

The GPU bench (``python -m lowvram._bench --gpu``) says how much slower ``train()`` is than the
plain loop; this says why, for the lesson's fp16 4 x 4 on the rtx2050 model:

1. **syncs**: every host-device synchronisation of an optimizer step, in each loop, and where it
   comes from (``torch.cuda.set_sync_debug_mode("warn")``: each warning's stack, reduced to the
   first frame outside torch and the loop's own line);
2. **profile**: ``torch.profiler`` over a few steps of each loop: GPU kernel time per step
   against the step's wall time (the GPU's idle share), the CUDA calls that wait (stream
   synchronise, memcpy) and the host ops that take the most time;
3. **variants**: ms per step of each loop with one thing changed at a time: batches in
   ordinary memory, each copy waiting for the GPU (``pageable``: how both loops ran before
   issue 19), accelerate's fp32 copy of the model's outputs off, accelerate's per-call
   ``is_lomo_available()`` package lookup off, and both of those off (``all``).

A diagnostic for a lent GPU (a few minutes); nothing here is stored in a notebook or README.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowvram.config import ModelConfig, TrainConfig, get_preset

WAITING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                 "cudaMemcpyAsync", "cudaMemcpy", "cudaLaunchKernel", "cuLaunchKernel",
                 "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _site(stack: list[traceback.FrameSummary]) -> str:
    """The first frame outside torch (who asked torch for the value), and the loop's line."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    outside = [f for f in stack if not f.filename.startswith(torch_dir)
               and not f.filename.endswith("warnings.py")]
    if not outside:
        return "?"

    def short(f: traceback.FrameSummary) -> str:
        parts = f.filename.replace("\\", "/").split("/")
        return f"{'/'.join(parts[-2:])}:{f.lineno} ({f.name})"

    caller = outside[-1]
    loop = next((f for f in reversed(outside) if f.filename.endswith(("train.py", "loops.py"))
                 and f.name in ("train", "_plain_loop")), None)
    return short(caller) + (f" <- {short(loop)}" if loop is not None and loop is not caller else "")


class SyncCounter:
    """Counts the host-device synchronisations while on, by where they come from (a site).

    ``torch.cuda.set_sync_debug_mode("warn")`` makes torch warn at every synchronising call
    (a blocking copy, ``.item()``, ...); each warning's stack becomes a site (:func:`_site`).
    """

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved = None
        self._filters = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            self.sites[_site(traceback.extract_stack()[:-1])] += 1
        elif self._saved is not None:
            self._saved(message, category, filename, lineno, file, line)

    def start(self) -> None:
        self._saved, self._filters = warnings.showwarning, warnings.filters[:]
        warnings.showwarning = self._show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._saved is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning, warnings.filters[:] = self._saved, self._filters
            self._saved = None

    @property
    def total(self) -> int:
        return sum(self.sites.values())


class Window:
    """Turns on, for steps ``[start, stop)`` of a loop, a sync recorder and/or a profiler."""

    def __init__(self, start: int, stop: int, *, syncs: bool = False, profile: bool = False):
        self.start, self.stop, self.n = start, stop, 0
        self.counter = SyncCounter() if syncs else None
        self.events: list[torch.cuda.Event] = []
        self.prof = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as make_profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.version.cuda else [])
            self.prof = make_profile(activities=acts)

    @property
    def sites(self) -> collections.Counter[str]:
        return self.counter.sites if self.counter is not None else collections.Counter()

    def tick(self) -> None:
        """Call once per optimizer step, when its gradients are complete."""
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        if self.n == self.start:
            if self.counter is not None:
                self.counter.start()
            if self.prof is not None:
                self.prof.start()
        if self.n == self.stop:
            self.close()
        self.n += 1

    def close(self) -> None:
        if self.counter is not None:
            self.counter.stop()
        if self.prof is not None and self.n >= self.start and not getattr(self, "_stopped", False):
            self.prof.stop()
            self._stopped = True

    def ms_per_step(self, warmup: int) -> float:
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(self.events[:-1], self.events[1:], strict=False)][warmup:]
        return statistics.median(ms) if ms else float("nan")


def _profile_summary(prof, steps: int) -> dict[str, Any]:
    from torch.autograd import DeviceType

    averages = prof.key_averages()

    def dev(e) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(e, name, None)
            if value:
                return float(value)
        return 0.0

    kernels_us = sum(dev(e) for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA)
    calls = {e.key: {"count": e.count / steps, "host_ms_per_step": e.cpu_time_total / 1e3 / steps}
             for e in averages if e.key in WAITING_CALLS}
    host = sorted((e for e in averages if getattr(e, "device_type", None) != DeviceType.CUDA),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "gpu_kernel_ms_per_step": kernels_us / 1e3 / steps,
        "cuda_calls": calls,
        "top_host_ops": [{"op": e.key, "count": e.count / steps,
                          "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
                         for e in host],
    }


# --------------------------------------------------------------------------- the two loops


def _run_train(model: ModelConfig, train: TrainConfig, rows, val, window: Window) -> None:
    from lowvram.train import train as run

    with (tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        config = train.replace(max_steps=window.stop + 2, num_epochs=1, eval_interval=0,
                               eval_max_batches=1, checkpoint_interval=0, keep_checkpoints=1,
                               log_interval=10**6, output_dir=out)
        try:
            run(model, config, train_data=rows, val_data=val, progress=False, cpu=False,
                on_optimizer_step=lambda m: window.tick())
        finally:
            window.close()


def _run_plain(model: ModelConfig, train: TrainConfig, rows, val, window: Window) -> None:
    from lowvram._bench import loops

    device = torch.device("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = loops._plain_loop(model, train, window.stop + 2, rows, val, device)
        next(plain)
        try:
            for _ in range(window.stop + 1):
                next(plain)
                window.tick()
        finally:
            window.close()
            plain.close()


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """One difference removed, for the length of a run."""
    import accelerate.accelerator
    import accelerate.optimizer

    import lowvram.data
    import lowvram.train

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def forcing(f: Callable[..., Any], **fixed: Any) -> Callable[..., Any]:
        # not functools.partial: the callers pass these keywords themselves, and a keyword
        # given at the call beats a partial's
        return lambda *args, **kwargs: f(*args, **{**kwargs, **fixed})

    if name == "pageable":  # before issue 19: ordinary memory, each copy waits for the GPU
        patch(lowvram.data, "DataLoader", forcing(lowvram.data.DataLoader, pin_memory=False))
        patch(lowvram.train, "DataLoaderConfiguration",
              forcing(lowvram.train.DataLoaderConfiguration, non_blocking=False))
        # (the plain loop's non_blocking copy from ordinary memory waits as well: CUDA stages
        # a pageable copy through its own buffer, after the stream's queued work)
    if name in ("no-fp32-outputs", "all"):
        patch(accelerate.accelerator, "convert_outputs_to_fp32", lambda f: f)
    if name in ("no-lomo-lookup", "all"):
        patch(accelerate.optimizer, "is_lomo_available", lambda: False)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def run_profile(steps: int = 8, warmup: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    from lowvram.data import random_rows

    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    model, train = get_preset("rtx2050")
    train = train.replace(mixed_precision="fp16", per_device_train_batch_size=4,
                          gradient_accumulation_steps=4)
    total = warmup + steps + 4
    rows = random_rows(model, (total + 4) * train.effective_batch_size, seed=0)
    val = random_rows(model, train.per_device_eval_batch_size, seed=1)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import accelerate

    result["accelerate"] = accelerate.__version__

    # 1. syncs per optimizer step, and where
    for loop, runner in (("train", _run_train), ("plain", _run_plain)):
        t0 = time.perf_counter()
        window = Window(warmup, warmup + 2, syncs=True)
        try:
            runner(model, train, rows, val, window)
        except Exception as err:
            log(f"syncs, {loop}: failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        result[f"syncs_{loop}"] = {site: n / 2 for site, n in window.sites.most_common()}
        log(f"syncs per optimizer step, {loop} ({time.perf_counter() - t0:.0f} s):")
        for site, n in window.sites.most_common():
            log(f"  {n / 2:5.1f}  {site}")

    # 2. profile
    for loop, runner in (("train", _run_train), ("plain", _run_plain)):
        window = Window(warmup, warmup + 3, profile=True)
        try:
            runner(model, train, rows, val, window)
            summary = _profile_summary(window.prof, 3)
        except Exception as err:
            log(f"profile, {loop}: failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        summary["wall_ms_per_step"] = window.ms_per_step(warmup)
        result[f"profile_{loop}"] = summary
        log(f"profile, {loop}: wall {summary['wall_ms_per_step']:.1f} ms/step (profiled), GPU "
            f"kernels {summary['gpu_kernel_ms_per_step']:.1f} ms/step")
        for key, value in sorted(summary["cuda_calls"].items()):
            log(f"  {key}: {value['count']:.1f} per step, {value['host_ms_per_step']:.2f} ms")
        for op in summary["top_host_ops"][:10]:
            log(f"  host {op['self_host_ms_per_step']:7.2f} ms  x{op['count']:.0f}  {op['op'][:70]}")

    # 3. variants (no profiler, no sync recorder: timings)
    variants = ["base", "pageable", "no-fp32-outputs", "no-lomo-lookup", "all"]
    result["variants"] = {}
    for name in variants:
        for loop, runner in (("train", _run_train), ("plain", _run_plain)):
            if loop == "plain" and name in ("no-fp32-outputs", "no-lomo-lookup"):
                continue  # accelerate only
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            window = Window(0, total)
            try:
                with _variant(name):
                    runner(model, train, rows, val, window)
            except Exception as err:  # report, go on
                result["variants"][f"{loop}/{name}"] = {"error": f"{type(err).__name__}: {err}"[:300]}
                log(f"  {loop:5} {name:16} failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            ms = window.ms_per_step(warmup)
            peak = torch.cuda.max_memory_allocated() / 2**20
            result["variants"][f"{loop}/{name}"] = {"ms_per_step": ms, "peak_mib": peak}
            log(f"  {loop:5} {name:16} {ms:7.1f} ms/step  peak {peak:,.0f} MiB")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowvram._bench.gpu_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = run_profile(log=lambda msg: print(msg, flush=True))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
