"""Hold the memory planner's prediction against the real ``train()`` on a CUDA GPU, under a cap
that makes a large GPU behave like a small card.

From a shell (the memory CLI's ``--verify-gpu`` runs the same check)::

    python -m lowvram.verify --preset rtx2050                      # the preset's fp16 4 x 4
    python -m lowvram.verify --preset rtx2050 --per-device-train-batch-size 16 \\
        --gradient-accumulation-steps 1 --loss-chunk-size 256 --optimizer adamw8bit
    python -m lowvram.verify --preset rtx2050 --plan               # every plan row that fits
    python -m lowvram.memory --preset rtx2050 --verify-gpu --micro-batch 8 --gradient-accumulation-steps 2

From Python::

    from lowvram.config import get_preset
    from lowvram.verify import verify_training
    model_cfg, train_cfg = get_preset("rtx2050")
    result = verify_training(model_cfg, train_cfg, card_gib=4.0)
    print(result["outcome"], result["measured_allocated_bytes"], result["predicted_allocated_bytes"])

What it does:

1. Measures what the card holds outside PyTorch's caching allocator (the CUDA context, the
   library handles, and anything else on the GPU, such as the display): ``torch.cuda.mem_get_info``
   once CUDA and cuBLAS are initialised, minus ``torch.cuda.memory_reserved``. It depends on the
   card, the driver and the display (270 MiB in PyTorch's notes, 767 MiB measured on an H200), so
   it is measured, not assumed.
2. Caps the caching allocator like the card: ``torch.cuda.set_per_process_memory_fraction((card -
   context) / total)`` (:func:`cap_fraction`). On the learner's own card the cap is the card
   itself; on a large GPU it emulates a small one.
3. Runs the real :func:`lowvram.train.train` (accelerate, the precision with its GradScaler, the
   accumulation, the optimizer and the model options of the configs) for ``steps`` optimizer
   steps on random token rows, and reads ``torch.cuda.max_memory_allocated`` and
   ``max_memory_reserved``.
4. Asks :func:`lowvram.memory.measure_step` for its prediction of the same step, and returns both,
   with "fits" or "ran out of memory". The cap is always lifted afterwards.

The package runs one way: ``check`` (the measurement; it imports the memory planner's
submodules) <- ``cli`` (the printing and ``python -m lowvram.verify``) <- this face, which only
re-exports them. ``lowvram.memory.cli`` (``--verify-gpu``) imports ``lowvram.verify.cli``.
"""

from lowvram.verify.check import (
    PLAN_TOLERANCE,
    bitsandbytes_problem,
    cap_fraction,
    configs_for,
    measure_context,
    verify_plan,
    verify_training,
    warm_matmul_libraries,
)
from lowvram.verify.cli import format_plan_table, format_result, main, verify_cli

__all__ = [
    "PLAN_TOLERANCE",
    "bitsandbytes_problem",
    "cap_fraction",
    "configs_for",
    "format_plan_table",
    "format_result",
    "main",
    "measure_context",
    "verify_cli",
    "verify_plan",
    "verify_training",
    "warm_matmul_libraries",
]
