"""The loop measurements of ``lowvram._bench``: training FLOPs, the hand-written plain PyTorch
loop, lowvram's loop against it step by step, where a step's time goes, and bf16 against fp32.

The method (what is timed next to what, and why) is in the package's docstring, items 1 and 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowvram.config import ModelConfig, TrainConfig, check_positive_int, get_preset
from lowvram.data import random_rows

__all__ = [
    "HOST_BOUND_MODEL",
    "bf16_vs_fp32",
    "forced_fp16",
    "host_bound_train_config",
    "loop_comparison",
    "matmul_flops",
    "step_breakdown",
    "training_flops_per_token",
]


# --------------------------------------------------------------------------- FLOPs


def training_flops_per_token(model_config: ModelConfig) -> tuple[int, int]:
    """(N, training FLOPs per token) with FLOPs per token = 6 N + 12 n_layer n_embd block_size.

    N counts the parameters that take part in matmuls: all but the token and position
    embeddings (lookups); a tied head is the token embedding, counted once.
    """
    from lowvram.model import GPTModel

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPTModel(model_config)
    skip = {"wpe.weight"} | (set() if model_config.tie_embeddings else {"wte.weight"})
    n = sum(p.numel() for name, p in model.named_parameters() if name not in skip)
    attention = 12 * model_config.n_layer * model_config.n_embd * model_config.block_size
    return n, 6 * n + attention


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of ``torch.mm`` of two (n x n) matrices: the median of ``repeats`` runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up the BLAS
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# --------------------------------------------------------------------------- the two loops


# The host-bound proxy's model (lowvram._bench.host_ops): the rtx2050 preset's depth (12 layers,
# 12 heads: its number of ops per step) at a tiny width (n_embd 48: head size 4), vocab and
# block: on a CPU its kernels take microseconds, so a step costs what it costs the host to issue
# it, as the real model's does on a fast GPU.
_RTX2050 = get_preset("rtx2050")[0]
HOST_BOUND_MODEL = ModelConfig(vocab_size=96, block_size=16, n_layer=_RTX2050.n_layer,
                               n_head=_RTX2050.n_head, n_embd=4 * _RTX2050.n_head)


def host_bound_train_config(precision: str = "no") -> TrainConfig:
    """The lesson's 4 x 4 (micro-batch 4, accumulation 4) with ``precision``, as on the card."""
    return get_preset("rtx2050")[1].replace(mixed_precision=precision,
                                            per_device_train_batch_size=4,
                                            gradient_accumulation_steps=4)


@contextlib.contextmanager
def forced_fp16(train_config: TrainConfig, init_scale: float = 2.0**16) -> Iterator[None]:
    """``train()`` runs the GPU's fp16 path on the CPU: fp16 autocast with a GradScaler.

    For measurements (and tests) only. ``lowvram.train``'s precision choice answers "fp16" and
    its Accelerator forces the GradScaler (``lowvram.precision.force_grad_scaler``) as soon as
    it is created, before ``prepare``. ``train_config.mixed_precision`` must be "fp16".
    """
    from unittest import mock

    from accelerate import Accelerator

    import lowvram.train
    from lowvram.precision import force_grad_scaler

    if train_config.mixed_precision != "fp16":
        raise ValueError(f"mixed_precision={train_config.mixed_precision!r}: forced_fp16 runs "
                         "fp16 only; use a TrainConfig with mixed_precision='fp16'")
    reason = "fp16 autocast with a GradScaler forced on the CPU (a measurement)"

    class ForcedFp16Accelerator(Accelerator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            force_grad_scaler(self, init_scale=init_scale)

    with (mock.patch.object(lowvram.train, "resolve_precision",
                            lambda requested, device: ("fp16", reason)),
          mock.patch.object(lowvram.train, "Accelerator", ForcedFp16Accelerator)):
        yield


def _plain_loop(
    model_config: ModelConfig, train_config: TrainConfig, total_steps: int,
    train_data: torch.Tensor, val_data: torch.Tensor, device: torch.device | None = None,
    *, fp16_on_cpu: bool = False,
) -> Iterator[None]:
    """A hand-written nanoGPT-style loop doing lowvram's work, one optimizer step per ``next``.

    The first ``next`` builds everything; the second runs the first step's micro-batches; each
    later one finishes the previous step (clip, AdamW, zero_grad) and runs the next step's
    micro-batches, so it yields where lowvram's ``on_optimizer_step`` callback runs: gradients complete.
    ``device``: the CPU (default) or a CUDA GPU, where fp16 runs under ``torch.autocast`` with a
    ``GradScaler`` (unscale, clip, step, update), as in PyTorch's AMP recipe. ``fp16_on_cpu``:
    that fp16 path on the CPU (where fp16 otherwise runs as fp32), to set against ``train()``
    under ``lowvram._bench.host_ops.forced_fp16``.
    """
    from lowvram.data import build_dataloaders
    from lowvram.model import GPTModel
    from lowvram.optim import build_optimizer
    from lowvram.precision import resolve_precision

    device = torch.device("cpu") if device is None else device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, _ = resolve_precision(train_config.mixed_precision, device)
    if fp16_on_cpu:
        precision = "fp16"
    torch.manual_seed(train_config.seed)
    model = GPTModel(model_config).to(device)
    # as train() does (issue 19): the rows are valid, so no token-range read of each batch
    # (a host sync on a GPU); a GPTModel without the switch ignores it
    model.check_token_range = False
    optimizer = build_optimizer(model.parameters(), train_config)  # the same as train()'s
    cuda = device.type == "cuda"  # as train(): page-locked batches, copied without a wait
    train_loader, _ = build_dataloaders(
        train_data, val_data, train_config.per_device_train_batch_size, drop_last=True,
        seed=train_config.seed, pin_memory=cuda,
    )
    accum = train_config.gradient_accumulation_steps
    warmup = int(total_steps * train_config.warmup_ratio)

    def get_lr(it: int) -> float:  # linear warmup, then linear decay to 0
        if it < warmup:
            return train_config.max_lr * it / warmup
        return train_config.max_lr * max(0.0, (total_steps - it) / max(1, total_steps - warmup))

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    # fp16 on CUDA: scale the loss; disabled (a pass-through) everywhere else
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16"
                                  and (device.type == "cuda" or fp16_on_cpu))
    batches = iter(train_loader)
    model.train()
    yield
    for step in range(total_steps):
        if step > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step - 1)
            scaler.step(optimizer)  # skipped if an fp16 gradient overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # flush the gradients as soon as we can
        for _ in range(accum):
            (rows,) = next(batches)
            rows = rows.to(device, non_blocking=cuda)
            X, Y = rows[:, :-1], rows[:, 1:]
            with autocast:
                logits, loss = model(X, Y)
            scaler.scale(loss / accum).backward()
        yield


def loop_comparison(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    steps: int,
    skip: int = 1,
    matmul_n: int = 2048,
    log: Callable[[str], None] = lambda msg: None,
    fp16_on_cpu: bool = False,
) -> dict[str, Any]:
    """lowvram's loop and the plain loop, step by step in turn, with a matmul between them.

    One ``lowvram.train.train`` run; at each optimizer step its ``on_optimizer_step`` callback runs one step of
    the plain loop (:func:`_plain_loop`) and one fp32 ``torch.mm`` of two ``matmul_n`` squares,
    in alternating order. So step k of lowvram, step k of the plain loop and the k-th matmul run
    next to each other in time, and load from other jobs hits all three alike. A lowvram step is
    the time from the end of one hook to the start of the next. The first ``skip`` steps are
    dropped (AdamW creates its state lazily; warm caches).

    Returns the median step time of each loop, the median of the per-step ratios lowvram /
    plain, training FLOP/s and their median per-step ratio to the matmul FLOP/s, and the raw times.
    ``fp16_on_cpu``: both loops run fp16 autocast with a GradScaler on the CPU, as on a GPU
    (``lowvram._bench.host_ops.forced_fp16``; ``train_config.mixed_precision`` must be "fp16").
    """
    from lowvram.train import train

    if steps < 1 or skip < 0:
        raise ValueError(f"steps={steps}, skip={skip}: need steps >= 1 and skip >= 0")
    n_matmul, per_token = training_flops_per_token(model_config)
    tokens = train_config.effective_batch_size * model_config.block_size
    flops_per_step = per_token * tokens
    total = steps + skip + 1  # hooks; the intervals between them are the steps
    # one spare window: no epoch end (with its evaluation and checkpoint) among the timed steps
    train_data = random_rows(model_config, (total + 1) * train_config.effective_batch_size, 0)
    val_data = random_rows(model_config, train_config.per_device_eval_batch_size, seed=1)
    plain = _plain_loop(model_config, train_config, total, train_data, val_data,
                        fp16_on_cpu=fp16_on_cpu)
    next(plain)
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    torch.mm(a, b)  # warm up the BLAS
    enters: list[float] = []
    exits: list[float] = []
    plain_s: list[float] = []
    matmul_s: list[float] = []

    def run_plain() -> None:
        t0 = time.perf_counter()
        next(plain)
        plain_s.append(time.perf_counter() - t0)

    def run_matmul() -> None:
        t0 = time.perf_counter()
        torch.mm(a, b)
        matmul_s.append(time.perf_counter() - t0)

    def hook(model: torch.nn.Module) -> None:
        enters.append(time.perf_counter())
        first, second = (run_plain, run_matmul) if len(enters) % 2 else (run_matmul, run_plain)
        first()
        second()
        exits.append(time.perf_counter())
        if len(enters) > skip + 1:
            log(f"  step {len(enters) - 1 - skip}/{steps}: lowvram {enters[-1] - exits[-2]:.4f} s, "
                f"plain {plain_s[-1]:.4f} s, matmul {matmul_s[-1] * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory() as out:
        timed_config = train_config.replace(
            max_steps=total, eval_interval=0, checkpoint_interval=0, eval_max_batches=1,
            log_interval=10**6, output_dir=out,
        )
        with (contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(),
              forced_fp16(train_config) if fp16_on_cpu else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            train(model_config, timed_config, train_data=train_data, val_data=val_data,
                  progress=False, cpu=True, on_optimizer_step=hook)
    plain.close()
    if len(enters) != total:
        raise RuntimeError(f"lowvram.train ran {len(enters)} optimizer steps, the benchmark expected {total}")
    # step k of lowvram runs between hooks k and k+1; the plain step and the matmul of hook k+1
    lowvram_s = [enters[k + 1] - exits[k] for k in range(total - 1)][skip:]
    plain_s, matmul_s = plain_s[1:][skip:], matmul_s[1:][skip:]
    peak = [2 * matmul_n**3 / t for t in matmul_s]
    result: dict[str, Any] = {
        "model": dataclasses.asdict(model_config),
        "per_device_train_batch_size": train_config.per_device_train_batch_size,
        "gradient_accumulation_steps": train_config.gradient_accumulation_steps,
        "precision": train_config.mixed_precision,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "skipped": skip,
        "matmul_n": matmul_n,
        "matmul_params": n_matmul,
        "tokens_per_step": tokens,
        "flops_per_token": per_token,
        "flops_per_step": flops_per_step,
        "matmul_flops": statistics.median(peak),
        "matmul_flops_best": max(peak),
        "ratio": statistics.median(lv / pl for lv, pl in zip(lowvram_s, plain_s, strict=True)),
        "lowvram_s": lowvram_s,
        "plain_s": plain_s,
        "matmul_s": matmul_s,
    }
    for loop, times in (("lowvram", lowvram_s), ("plain", plain_s)):
        result[f"{loop}_median_s"] = statistics.median(times)
        result[f"{loop}_flops"] = flops_per_step / statistics.median(times)
        result[f"{loop}_efficiency"] = statistics.median(
            flops_per_step / t / p for t, p in zip(times, peak, strict=True)
        )
    return result


def step_breakdown(
    model_config: ModelConfig, train_config: TrainConfig, matmul_n: int = 2048
) -> dict[str, float]:
    """Where one profiled optimizer step of the plain loop spends its time (after 2 steps).

    Shares of the self CPU time: ``matmul`` (mm/addmm/bmm), ``attention`` (the SDPA kernels),
    ``optimizer`` (AdamW's step), ``other`` (LayerNorm, GELU, softmax, cross-entropy, clipping,
    copies, ...). ``matmul_efficiency``: the FLOP/s of those matmuls (6 N per token) over an
    fp32 ``torch.mm`` of two ``matmul_n`` squares timed right after (profiler overhead included).
    """
    from torch.profiler import ProfilerActivity, profile

    total_steps = 3
    rows = random_rows(model_config, (total_steps + 1) * train_config.effective_batch_size, seed=2)
    plain = _plain_loop(model_config, train_config, total_steps + 1, rows, rows[: train_config.per_device_eval_batch_size])
    for _ in range(total_steps):  # build, then steps 1 and 2 (AdamW's state exists afterwards)
        next(plain)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next(plain)  # step 2's optimizer update, then step 3's micro-batches
    plain.close()
    matmul = matmul_flops(matmul_n, repeats=3)
    seconds = dict.fromkeys(("matmul", "attention", "optimizer", "other"), 0.0)
    total = 0.0
    for event in prof.key_averages():
        if event.key.startswith("Optimizer.step"):  # a range: its ops are counted below too
            seconds["optimizer"] += event.cpu_time_total
            # the range's own time is the Python between its ops (the per-parameter loop): it
            # belongs to the total too, or a loaded machine makes "other" negative
            total += event.self_cpu_time_total
            continue
        total += event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            seconds["matmul"] += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key:
            seconds["attention"] += event.self_cpu_time_total
    seconds["other"] = total - seconds["matmul"] - seconds["attention"] - seconds["optimizer"]
    n_matmul, _ = training_flops_per_token(model_config)
    tokens = train_config.effective_batch_size * model_config.block_size
    shares = {k: v / total for k, v in seconds.items()}
    shares["matmul_efficiency"] = 6 * n_matmul * tokens / (seconds["matmul"] * 1e-6) / matmul
    return shares


# --------------------------------------------------------------------------- bf16 on the CPU


def bf16_vs_fp32(model_config: ModelConfig, micro_batch: int = 4, steps: int = 5) -> dict[str, Any]:
    """One eager training step (forward, backward, AdamW) in fp32 and under CPU bf16 autocast,
    alternating (fp32, bf16, bf16, fp32, ...) so that load hits both alike; the median of the
    per-pair ratios fp32 / bf16 (> 1: bf16 is faster). Weights stay fp32 in both, as in
    accelerate's bf16. The first pair is a warm-up (AdamW's state, oneDNN's kernels)."""
    from lowvram.model import GPTModel
    from lowvram.precision import cpu_has_native_bf16

    check_positive_int("steps", steps)
    torch.manual_seed(0)
    rows = random_rows(model_config, micro_batch, seed=3)
    X, Y = rows[:, :-1], rows[:, 1:]
    runs = {}
    for precision in ("fp32", "bf16"):
        model = GPTModel(model_config)
        runs[precision] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(precision: str) -> float:
        model, optimizer = runs[precision]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(X, Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(steps + 1):
        for precision in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            times[precision].append(step(precision))
    fp32, bf16 = times["fp32"][1:], times["bf16"][1:]
    return {
        "model": dataclasses.asdict(model_config),
        "micro_batch": micro_batch,
        "steps": steps,
        "native_bf16": list(cpu_has_native_bf16()),
        "fp32_s": fp32,
        "bf16_s": bf16,
        "fp32_median_s": statistics.median(fp32),
        "bf16_median_s": statistics.median(bf16),
        "ratio": statistics.median(a / b for a, b in zip(fp32, bf16, strict=True)),
    }
