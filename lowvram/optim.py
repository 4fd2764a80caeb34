"""The optimizer a training run uses, chosen by ``TrainConfig.optimizer``.

    from lowvram.optim import build_optimizer
    optimizer = build_optimizer(model.parameters(), train_config)

- ``"adamw"``: ``torch.optim.AdamW``, the lesson's optimizer: two fp32 moments per parameter
  (8 bytes/parameter of state). ``train_config.adamw_impl`` picks its kernel: ``"foreach"``
  (``foreach=True``), ``"fused"`` (``fused=True``: one kernel per step, no temporary as large as
  the parameters; on CUDA and, since torch 2.4, on the CPU) or ``"loop"`` (``foreach=False``);
  None leaves torch's default for the device (foreach on CUDA, loop on the CPU). The kernels
  compute the same update (to rounding) and keep the same state, so a run may resume with
  another one.
- ``"adamw8bit"``: bitsandbytes' ``AdamW8bit``: the two moments are stored in 8 bits with one
  fp32 scale per block of 256 values (about 2 bytes/parameter); tensors under 4096 elements keep
  fp32 moments. It runs on CUDA, and on CPU through bitsandbytes' CPU backend (tested: 0.50.2), so the
  tests and a CPU run use the very same class. Install it with ``pip install "lowvram[lowbit]"``.

bitsandbytes is imported only when an 8-bit optimizer is built: accelerate's
``notebook_launcher`` refuses to fork once it is imported in the kernel, so build it inside the
launched function (``lowvram.train.train`` does).

The learning rate is ``train_config.max_lr`` (the schedule scales it), betas are AdamW's
defaults, weight decay is ``train_config.weight_decay``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch

from lowvram.config import ADAMW_IMPLS, OPTIMIZERS, TrainConfig

__all__ = ["ADAMW_IMPLS", "OPTIMIZERS", "build_optimizer"]

# TrainConfig.adamw_impl -> torch.optim.AdamW's keyword; None passes neither, so torch decides
# per device at each step (the parameters are still on the CPU when the optimizer is built)
_ADAMW_KERNELS: dict[str | None, dict[str, bool]] = {
    None: {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False},
}


def _bitsandbytes():  # type: ignore[no-untyped-def]
    """Import bitsandbytes without its import-time log line: on a CPU with avx512_bf16 its CPU
    backend warns that an optional 4-bit matmul kernel (from a model hub) is missing, which an
    8-bit optimizer does not use."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # its modules use torch.jit.script_method, which torch 2.13 deprecates on import
            warnings.simplefilter("ignore", DeprecationWarning)
            import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "optimizer='adamw8bit' needs bitsandbytes: pip install \"lowvram[lowbit]\" "
            "(or pip install bitsandbytes)"
        ) from err
    finally:
        logger.setLevel(level)
    return bitsandbytes


def build_optimizer(
    params: Iterable[torch.nn.Parameter], train_config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``train_config.optimizer`` names (with ``train_config.adamw_impl``'s
    kernel for AdamW), over ``params``."""
    if train_config.optimizer not in OPTIMIZERS:  # a TrainConfig validates it; this is for fakes
        raise ValueError(
            f"optimizer={train_config.optimizer!r} is not allowed: optimizer must be one of "
            f"{', '.join(repr(o) for o in OPTIMIZERS)}"
        )
    kwargs = {"lr": train_config.max_lr, "weight_decay": train_config.weight_decay}
    if train_config.optimizer == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs, **_ADAMW_KERNELS[train_config.adamw_impl])
