"""How much host work ``train()`` issues per optimizer step beyond the plain loop (issue 19).

    python -m lowvram._bench.host_ops            # fp32, bf16, fp16: ops per step, the excess
    python -m lowvram._bench.host_ops --json

On a fast GPU the lesson's rtx2050 model is host-bound: its kernels finish before Python has
issued the next ones (measured on an H200: ~28 ms of GPU work in a step of over 70 ms), so a
step takes as long as the host needs to issue it. Two things make up that host time, and both
can be measured on a CPU:

1. **Ops.** :func:`count_ops` counts the ATen ops dispatched per optimizer step, in the steady
   state, in a real ``lowvram.train.train`` run and in the bench's plain loop
   (``lowvram._bench.loops._plain_loop``) on the same model and settings, and groups them by
   op and by where they come from (:func:`where`), so that the difference names the ops that
   ``train()`` adds and the line of lowvram or accelerate that adds them. The count is exact
   and the same on every machine: a test can hold it.
2. **Python.** :class:`CallCounter` (``count_ops(..., python_calls=True)``) counts the Python
   function calls per step of each loop, by package (exact for one set of library versions).
   :func:`host_bound` times the two loops side by side (``loops.loop_comparison``) on a model
   of the rtx2050's depth (12 layers, 12 heads) but tiny width, at 1 thread. Its kernels take
   microseconds on a CPU, so ms/step is the host's cost of a step, as on the H200: the ratio is
   a CPU *proxy* for the H200's ratio, not a GPU measurement.

Why a ``TorchDispatchMode`` and not ``torch.profiler``: the mode sees each op that reaches a
kernel (after autograd and after composite ops are decomposed: roughly one launch each on a
GPU), backward included, and runs Python at each one, so the caller's frames name the site at
no extra cost; the profiler records every nested dispatcher call (``aten::linear`` and the
``aten::addmm`` inside it), needs ``with_stack`` for sites, and is slower.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowvram._bench.loops import HOST_BOUND_MODEL, forced_fp16, host_bound_train_config
from lowvram.config import ModelConfig, TrainConfig

__all__ = [
    "HOST_BOUND_MODEL",
    "CallCounter",
    "OpCounter",
    "count_ops",
    "excess",
    "forced_fp16",
    "format_ops",
    "host_bound",
    "host_bound_train_config",
    "where",
]


# --------------------------------------------------------------------------- where an op comes from

_TORCH = os.path.dirname(torch.__file__) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
# torch's own code that does a whole part of a step, in either loop: its ops are that part's,
# whoever called it (accelerate's wrappers or the plain loop)
_PARTS = (
    ("autograd" + os.sep, "backward"),
    ("optim" + os.sep, "optimizer step"),  # AdamW.step, zero_grad's profiler range
    (os.path.join("nn", "utils", "clip_grad.py"), "clip_grad_norm_"),
    (os.path.join("amp", "grad_scaler.py"), "GradScaler"),
    (os.path.join("utils", "data") + os.sep, "DataLoader"),
)
_LOOPS = {("train.py", "train"), ("loops.py", "_plain_loop")}  # the two loops' own lines


def _short(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    for top in ("lowvram", "accelerate", "tests"):
        if top in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(top):])
    return "/".join(parts[-2:])


def where(frame: Any) -> str:
    """Where the op dispatched under ``frame`` (the innermost Python frame) comes from.

    A part of the step that torch does for both loops (``backward``, ``optimizer step``,
    ``clip_grad_norm_``, ``GradScaler``, ``DataLoader``: the innermost torch module of that
    part on the stack), else the model's forward (``model forward``: lowvram/model.py), else
    the loop's own lines (``loop body``: ``train`` or ``_plain_loop``), else the innermost
    frame outside torch and the standard library, as ``path:line (function)``: the lowvram
    or accelerate line that issued it.
    """
    f = frame
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_TORCH):
            rest = name[len(_TORCH):]
            for prefix, part in _PARTS:
                if rest.startswith(prefix):
                    return part
        elif not name.startswith(_STDLIB) and not name.startswith("<"):
            base = os.path.basename(name)
            if base == "model.py" and f"lowvram{os.sep}" in name:
                return "model forward"
            if (base, f.f_code.co_name) in _LOOPS:
                return "loop body"
            return f"{_short(name)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while :attr:`on`, by ``(where(caller), op name)``.

    Use as a context manager around the whole run (entering a dispatch mode is not free of
    side effects on caches, so it stays entered) and switch :attr:`on` for the windows to count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.counts[(where(sys._getframe(1)), str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))

    def take(self) -> collections.Counter[tuple[str, str]]:
        """The counts so far, and start again from zero."""
        counts, self.counts = self.counts, collections.Counter()
        return counts


class CallCounter:
    """Counts the Python function calls while :attr:`on` (``sys.setprofile``), by where the
    called function lives: ``torch``, ``accelerate``, a lowvram file, the standard library or
    another package. On a host-bound GPU the Python a step runs is time, like its ops; the count
    is exact for one set of library versions (it changes when torch or accelerate change)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._groups: dict[str, str] = {}

    def _group(self, filename: str) -> str:
        if filename.startswith(_TORCH):
            return "torch"
        if filename.startswith(_STDLIB) or filename.startswith("<"):
            return "Python's standard library"
        parts = filename.replace("\\", "/").split("/")
        if "lowvram" in parts:
            return _short(filename)
        if "site-packages" in parts:
            return parts[parts.index("site-packages") + 1].removesuffix(".py")
        return _short(filename)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = frame.f_code.co_filename
            group = self._groups.get(name)
            if group is None:
                group = self._groups[name] = self._group(name)
            self.counts[group] += 1

    @property
    def on(self) -> bool:
        return sys.getprofile() is not None

    @on.setter
    def on(self, value: bool) -> None:
        sys.setprofile(self._profile if value else None)

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.on = False

    def take(self) -> collections.Counter[str]:
        """The counts so far, and start again from zero."""
        counts, self.counts = self.counts, collections.Counter()
        return counts


# --------------------------------------------------------------------------- the two loops


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _steps_of_train(model_config: ModelConfig, train_config: TrainConfig, total: int,
                    rows: torch.Tensor, val: torch.Tensor, counter: OpCounter | CallCounter,
                    fp16_on_cpu: bool) -> list[Any]:
    """The op (or Python call) counts of each optimizer step of a ``train()`` run, hook to hook."""
    from lowvram.train import train

    per_step: list[Any] = []

    def hook(model: torch.nn.Module) -> None:
        per_step.append(counter.take())
        counter.on = True

    with (tempfile.TemporaryDirectory() as out, _quiet(),
          forced_fp16(train_config) if fp16_on_cpu else contextlib.nullcontext()):
        config = train_config.replace(max_steps=total + 1, num_epochs=1, eval_interval=0,
                                      eval_max_batches=1, checkpoint_interval=0,
                                      keep_checkpoints=1, log_interval=10**6, output_dir=out)
        with counter:
            train(model_config, config, train_data=rows, val_data=val, progress=False,
                  cpu=True, on_optimizer_step=hook)
        counter.on = False
    return per_step[1:]  # hook k to hook k+1: step k's update, step k+1's micro-batches


def _steps_of_plain(model_config: ModelConfig, train_config: TrainConfig, total: int,
                    rows: torch.Tensor, val: torch.Tensor, counter: OpCounter | CallCounter,
                    fp16_on_cpu: bool) -> list[Any]:
    from lowvram._bench.loops import _plain_loop

    per_step: list[Any] = []
    with _quiet():
        plain = _plain_loop(model_config, train_config, total + 1, rows, val,
                            fp16_on_cpu=fp16_on_cpu)
        next(plain)  # build
        with counter:
            next(plain)  # step 1's micro-batches
            for _ in range(total):
                counter.on = True
                next(plain)  # step k's update, step k+1's micro-batches
                counter.on = False
                per_step.append(counter.take())
        plain.close()
    return per_step


def count_ops(model_config: ModelConfig = HOST_BOUND_MODEL,
              train_config: TrainConfig | None = None, *, steps: int = 2, warmup: int = 1,
              python_calls: bool = False) -> dict[str, Any]:
    """ATen ops per optimizer step of ``train()`` and of the plain loop, on the CPU.

    Both run ``warmup + steps`` steps after the first; the last ``steps`` are counted (AdamW
    creates its state in the first update) and must agree with each other (a ValueError says
    otherwise). A step is what runs between two moments the gradients are complete: the
    previous step's clip, optimizer step and zero_grad, then this step's micro-batches (the
    bench's step). fp16 runs the GPU's fp16 path on the CPU in both loops (autocast and a
    GradScaler: :func:`forced_fp16`). Returns, per loop, the total per step and
    ``{where: {op: n}}``; with ``python_calls``, each loop runs once more under a
    :class:`CallCounter` (``python_calls``: the last step's Python calls by where they live),
    and ``python_excess`` is train()'s minus the plain loop's.
    """
    from lowvram.data import random_rows

    train_config = host_bound_train_config() if train_config is None else train_config
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 1 "
                         "(AdamW creates its state in the first step)")
    total = warmup + steps
    batch = train_config.effective_batch_size
    # one spare window: no epoch end (with its evaluation and checkpoint) among the counted steps
    rows = random_rows(model_config, (total + 3) * batch, seed=0)
    val = random_rows(model_config, train_config.per_device_eval_batch_size, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the counts do not depend on it; the run is quicker
    fp16 = train_config.mixed_precision == "fp16"
    try:
        result: dict[str, Any] = {}
        for loop, per_step in (
            ("train", _steps_of_train(model_config, train_config, total, rows, val, OpCounter(),
                                      fp16)),
            ("plain", _steps_of_plain(model_config, train_config, total, rows, val, OpCounter(),
                                      fp16)),
        ):
            counted = per_step[warmup:]
            if len(counted) != steps or any(c != counted[0] for c in counted):
                raise ValueError(f"{loop}: the ops per step are not the same in the steady state: "
                                 f"{[sum(c.values()) for c in per_step]}")
            by_site: dict[str, dict[str, int]] = {}
            for (site, op), n in sorted(counted[0].items()):
                by_site.setdefault(site, {})[op] = n
            result[loop] = {"per_step": sum(counted[0].values()), "by_site": by_site}
        if python_calls:  # a run of its own: the op counter's Python would be counted too
            for loop, steps_of in (("train", _steps_of_train), ("plain", _steps_of_plain)):
                calls = steps_of(model_config, train_config, total, rows, val, CallCounter(),
                                 fp16)[-1]
                result[loop]["python_calls"] = dict(sorted(calls.items()))
                result[loop]["python_calls_per_step"] = sum(calls.values())
            t, p = (result[k]["python_calls"] for k in ("train", "plain"))
            result["python_excess"] = {g: t.get(g, 0) - p.get(g, 0) for g in sorted(set(t) | set(p))
                                       if t.get(g, 0) != p.get(g, 0)}
    finally:
        torch.set_num_threads(threads)
    result.update(model=dataclasses.asdict(model_config), precision=train_config.mixed_precision,
                  micro_batch=train_config.per_device_train_batch_size,
                  accumulation=train_config.gradient_accumulation_steps,
                  excess=excess(result["train"], result["plain"]))
    return result


def excess(train_ops: dict[str, Any], plain_ops: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{where: {op: train's count - plain's}}``, only the nonzero ones.

    The parts both loops share (backward, the optimizer step, ...) cancel unless ``train()``
    really issues other ops there; the lines only one loop has (accelerate's, lowvram's
    ``StepLog``) are all excess.
    """
    keys = {(s, op) for ops in (train_ops, plain_ops) for s, d in ops["by_site"].items() for op in d}
    diff: dict[str, dict[str, int]] = {}
    for site, op in sorted(keys):
        n = (train_ops["by_site"].get(site, {}).get(op, 0)
             - plain_ops["by_site"].get(site, {}).get(op, 0))
        if n:
            diff.setdefault(site, {})[op] = n
    return diff


def format_ops(result: dict[str, Any]) -> str:
    """Ops per step of each loop and ``train()``'s excess, by where it comes from."""
    t, p = result["train"]["per_step"], result["plain"]["per_step"]
    lines = [f"{result['precision']}, {result['micro_batch']} x {result['accumulation']}: ATen ops "
             f"per optimizer step: train() {t:,}, plain loop {p:,}, excess {t - p:+,}"]
    for site, ops in result["excess"].items():
        lines.append(f"  {site}: " + ", ".join(f"{op} {n:+}" for op, n in ops.items()))
    if "python_excess" in result:
        t, p = (result[k]["python_calls_per_step"] for k in ("train", "plain"))
        lines.append(f"Python function calls per optimizer step: train() {t:,}, plain loop {p:,}, "
                     f"excess {t - p:+,}")
        lines += [f"  {group}: {n:+,}" for group, n in sorted(result["python_excess"].items(),
                                                           key=lambda kv: -abs(kv[1]))]
    return "\n".join(lines)


# --------------------------------------------------------------------------- time


def host_bound(precisions: tuple[str, ...] = ("no", "bf16", "fp16"), *, steps: int = 20, skip: int = 2,
               model_config: ModelConfig = HOST_BOUND_MODEL,
               log: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """train() against the plain loop on the host-bound model, 1 thread, for each precision
    ("fp16": the GPU's fp16 path, autocast and a GradScaler, forced on the CPU in both loops).

    ``loops.loop_comparison`` (the two alternate step by step) with a token reference matmul
    (64 x 64: its time is not used here), plus each precision's counts. Returns one row per
    precision: the loop comparison's medians and ratio, the ops and Python calls per step of both.
    """
    from lowvram._bench.loops import loop_comparison

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for precision in precisions:
            config = host_bound_train_config(precision)
            log(f"  host-bound: {precision}, {steps} steps + {skip} dropped, 1 thread")
            r = loop_comparison(model_config, config, steps=steps, skip=skip, matmul_n=64,
                                fp16_on_cpu=precision == "fp16")
            ops = count_ops(model_config, config, python_calls=True)
            rows.append({
                "precision": precision, "threads": 1, "steps": steps, "skipped": skip,
                "model": r["model"], "micro_batch": config.per_device_train_batch_size,
                "accumulation": config.gradient_accumulation_steps,
                "lowvram_median_s": r["lowvram_median_s"], "plain_median_s": r["plain_median_s"],
                "ratio": r["ratio"], "lowvram_s": r["lowvram_s"], "plain_s": r["plain_s"],
                "ops_train": ops["train"]["per_step"], "ops_plain": ops["plain"]["per_step"],
                "ops_excess": ops["excess"],
                "python_calls_train": ops["train"]["python_calls_per_step"],
                "python_calls_plain": ops["plain"]["python_calls_per_step"],
                "python_excess": ops["python_excess"],
            })
            log(f"    train() {r['lowvram_median_s'] * 1e3:.1f} ms, plain "
                f"{r['plain_median_s'] * 1e3:.1f} ms: {r['ratio']:.3f}; ops "
                f"{ops['train']['per_step']} / {ops['plain']['per_step']}")
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowvram._bench.host_ops",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--precision", action="append", choices=["no", "bf16", "fp16"],
                        help="default: no, bf16 and fp16 (fp16: autocast and a GradScaler "
                        "forced on the CPU, as on a GPU)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    results = [count_ops(HOST_BOUND_MODEL, host_bound_train_config(p), python_calls=True)
               for p in args.precision or ["no", "bf16", "fp16"]]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n".join(format_ops(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
