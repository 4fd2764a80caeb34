"""The precision policy: which precision a training run gets on this device, and why.

    from lowvram.precision import resolve_precision
    precision, reason = resolve_precision("fp16", "cpu")   # ('no', 'fp16 was requested on cpu ...')

``requested_precision`` says which precision was asked for, in a stated order:
``--mixed-precision`` (the CLI) > accelerate's configured precision (``ACCELERATE_MIXED_PRECISION``,
which ``accelerate launch`` sets from ``accelerate config``'s file or its ``--mixed_precision``)
> the preset's ``TrainConfig.mixed_precision``. ``resolve_precision`` then decides what runs on
this device; it is the one place precision is decided (``lowvram.train`` and
``lowvram.environment`` both ask it). ``force_grad_scaler`` makes a CPU Accelerator behave like
fp16 on a GPU, for demonstrations. ``precision_advice`` says, as advice only, when this CPU has
native bf16 instructions (bf16 autocast then runs faster than fp32; the notebooks stay fp32, so
that their stored outputs do not depend on the CPU).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from lowvram.config import PRECISIONS

__all__ = [
    "PRECISIONS",
    "PRECISION_LABELS",
    "cpu_has_native_bf16",
    "force_grad_scaler",
    "precision_advice",
    "requested_precision",
    "resolve_precision",
]

# accelerate's names -> what a learner reads; "no" is accelerate's name for fp32
PRECISION_LABELS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
assert tuple(PRECISION_LABELS) == PRECISIONS  # one list of allowed values (lowvram.config's)

# CPU flags (Linux /proc/cpuinfo) of native bf16 matmuls: AVX512-BF16 (Cooper Lake, Zen 4) and
# AMX-BF16 (Sapphire Rapids). Without them oneDNN emulates bf16 and it is slower than fp32.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _accelerate_config_file() -> Path:
    """Where ``accelerate config`` writes its answers (by default)."""
    from accelerate.commands.config import default_config_file

    return Path(default_config_file)


def requested_precision(preset: str, override: str | None = None, *,
                        environ: Mapping[str, str] | None = None,
                        config_file: str | Path | None = None) -> tuple[str, str]:
    """The precision asked for and who asked: ``--mixed-precision`` > accelerate > the preset.

    ``override``: an explicit choice (the CLI's ``--mixed-precision``); it always wins.
    Otherwise accelerate's configured precision, ``ACCELERATE_MIXED_PRECISION`` in ``environ``
    (default ``os.environ``), wins over ``preset``. ``accelerate launch`` sets that variable from
    its ``--mixed_precision`` flag or from ``accelerate config``'s file, and to ``"no"`` when
    neither exists; so a ``"no"`` counts only when an accelerate config file (``config_file``,
    default accelerate's own) exists, otherwise it is the launcher's default and the preset
    wins. Plain ``python`` ignores the config file, as accelerate itself does. Returns
    ``(precision, source)``; raises ValueError naming a value that is not one of PRECISIONS.
    """
    def checked(value: str, where: str) -> str:
        if value not in PRECISIONS:
            allowed = ", ".join(repr(p) for p in PRECISIONS)
            raise ValueError(f"{where}={value!r} is not allowed: use one of {allowed} "
                             "('no' is fp32)")
        return value

    if override is not None:
        return checked(override, "--mixed-precision"), "--mixed-precision"
    environ = os.environ if environ is None else environ
    configured = environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if configured:
        config_file = _accelerate_config_file() if config_file is None else Path(config_file)
        if configured != "no" or config_file.exists():
            checked(configured, "ACCELERATE_MIXED_PRECISION")
            return configured, "accelerate (ACCELERATE_MIXED_PRECISION)"
    return checked(preset, "mixed_precision"), "the preset"


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """The one place precision is decided: (precision that will run, the reason in English).

    Warns (``UserWarning``) whenever what runs differs from what was requested.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        allowed = ", ".join(f"{p!r} ({PRECISION_LABELS[p]})" if p == "no" else repr(p)
                            for p in PRECISIONS)  # fmt: skip
        raise ValueError(f"mixed_precision={requested!r} is not allowed: use {allowed}")
    if requested == "no":
        return "no", "fp32 was requested"
    if device.type == "cuda":
        if requested == "fp16":
            return "fp16", (
                "fp16 autocast with a GradScaler on CUDA: matmuls in 16 bits (Tensor Cores), "
                "smaller saved activations, while weights, gradients and AdamW state stay fp32; "
                "the scaler keeps small gradients from underflowing to zero"
            )
        if torch.cuda.is_bf16_supported():
            return "bf16", (
                "bf16 autocast on CUDA: the same 16-bit matmuls as fp16, fp32's exponent range "
                "(no GradScaler, no skipped steps), 3 fewer mantissa bits"
            )
        reason = (
            f"bf16 was requested but {torch.cuda.get_device_name(device)} does not support it "
            "(bf16 needs an Ampere or newer GPU); running fp16 autocast with a GradScaler instead"
        )
        warnings.warn(reason, UserWarning, stacklevel=2)
        return "fp16", reason
    if requested == "bf16":
        return "bf16", (
            f"bf16 autocast on {device.type}: accelerate supports it there; it saves memory but "
            "may be slower than fp32 on CPUs without native bf16 instructions"
        )
    # fp16 on a CPU. accelerate would silently run fp32 and still report "fp16".
    # We choose fp32 and say so, rather than bf16: on a CPU memory is rarely the limit, bf16
    # matmuls are slower than fp32 on CPUs without AVX512-BF16/AMX, and bf16 would not show
    # what fp16 is about (a GradScaler) anyway; fp32 is also the reference every other run is
    # compared with.
    reason = (
        f"fp16 was requested on {device.type}, where accelerate runs no fp16 autocast and no "
        "GradScaler; running fp32 ('no') instead. fp16 needs a CUDA GPU; on a CPU use 'no' "
        "(or 'bf16' for bf16 autocast)"
    )
    warnings.warn(reason, UserWarning, stacklevel=2)
    return "no", reason


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native bf16 flags this CPU has (``avx512_bf16``, ``amx_bf16``); () if none or unknown.

    torch 2.13 has no public query for them (``torch.backends.cpu.get_cpu_capability()`` says
    only ``AVX512``, which Skylake also has), so the Linux flags are read; elsewhere ().
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return tuple(f for f in _NATIVE_BF16_FLAGS if f in flags)


def precision_advice(precision: str, device: torch.device | str) -> str | None:
    """Advice, never a decision: a hint that bf16 autocast would be faster here, or None.

    Given when an fp32 run is on a CPU with native bf16 instructions (``make bench`` measures
    the ratio on this machine: its "bf16 autocast vs fp32" row).
    """
    device = torch.device(device)
    flags = cpu_has_native_bf16() if device.type == "cpu" else ()
    if precision != "no" or not flags:
        return None
    return (
        f"this CPU has native bf16 instructions ({', '.join(flags)}): bf16 autocast "
        "(mixed_precision='bf16', --mixed-precision bf16) usually trains faster than fp32 here "
        "(`make bench` measures by how much on this CPU), at bf16's lower precision"
    )


def force_grad_scaler(accelerator, init_scale: float = 2.0**16) -> None:
    """Make a CPU Accelerator behave like fp16 on a GPU: fp16 autocast plus a GradScaler.

    For demonstrations and tests only: the Accelerator must have been created with
    ``mixed_precision="fp16"``; call this before ``accelerator.prepare``. ``init_scale`` is
    GradScaler's first loss scale (a larger one overflows and skips the first steps).
    """
    if accelerator.mixed_precision != "fp16":
        raise ValueError(
            f"accelerator.mixed_precision={accelerator.mixed_precision!r}: create the "
            "Accelerator with mixed_precision='fp16' before forcing a GradScaler"
        )
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=init_scale)
