"""How much GPU memory one optimizer step of ``lowvram.train.train()`` needs, measured without
a GPU.

Measure one steady-state step of the real ``GPTModel`` + its optimizer and ask whether it fits::

    from lowvram.config import get_preset
    from lowvram.memory import Recipe, measure_step, plan, ablation, plan_table, ablation_table
    model_cfg, _ = get_preset("rtx2050")
    report = measure_step(model_cfg, 4, Recipe(precision="fp16"), gradient_accumulation_steps=4)
    print(report.peak_bytes / 2**20, report.peak_phase, report.peak_op)
    print(report.fits(card_gib=4.0))         # inside the headroom: max(5%, 300 MiB) stays free
    rows = plan(model_cfg, card_gib=4.0, target_effective_batch=16)
    print(plan_table(rows, preset="rtx2050"))   # each row's `python -m lowvram.train ...` command
    print(ablation_table(ablation(model_cfg, micro_batch=4)))   # at the lesson's 4 x 4

From a shell (``--json`` for machines, ``--verify-gpu`` to hold the estimate against a real GPU)::

    python -m lowvram.memory --preset rtx2050 --json
    python -m lowvram.memory --preset rtx2050 --plan --ablation
    python -m lowvram.memory --preset rtx2050 --per-device-train-batch-size 8 \
        --gradient-accumulation-steps 2 --mixed-precision fp16 --verify-gpu

A :class:`Recipe` names the options of a step: precision, optimizer ("adamw" or "adamw8bit", as
``TrainConfig.optimizer``), AdamW's kernel, and the model options ``tie_embeddings``,
``gradient_checkpointing`` and ``loss_chunk_size`` (as ``ModelConfig`` spells them).

How it measures. The model, optimizer and batch are fake tensors on the ``cpu`` device
(``FakeTensorMode``: shapes and dtypes, no data, no arithmetic), and a ``TorchDispatchMode`` sees
every ATen op of the step: it records each new untyped storage and, through a weakref finalizer,
the moment it dies (``tracker.py``). Two optimizer steps run as ``lowvram.train.train()`` runs
them (``tracker.run_steps``), and the 2nd one is reported (AdamW creates its state lazily in the
1st). Each step is ``gradient_accumulation_steps`` micro-batches:

- from the 2nd micro-batch on, backward runs with every parameter's accumulated ``.grad``
  alive (4 bytes per parameter) and adds into it: the peak of any accumulation >= 2 is the same,
  and higher than that of 1 by up to the gradients' size;
- the previous micro-batch's ``logits, loss`` stay alive until the next forward returns (they
  are ``train()``'s loop variables), and under autocast they are accelerate's fp32 copy of the
  16-bit logits (``convert_outputs_to_fp32``);
- ``accelerator.backward`` divides the loss by the accumulation (and scales it for fp16);
  once the gradients are complete, fp16's ``GradScaler.unscale_`` (in place), ``foreach``
  gradient clipping, the optimizer step, the scaler's update and ``zero_grad(set_to_none=True)``.

On the CPU allocator this reproduces the real peak to a few bytes (``tests/test_memory.py``
checks it against ``torch.profiler``, around the same loop and around ``train()`` itself).

What ``target="cuda"`` (the default) adds, to predict a CUDA GPU instead of this CPU:

- AdamW's implementation is the one you choose (``foreach`` is the CUDA default; CPU's default is
  the per-parameter loop). ``foreach`` keeps a temporary as large as all parameters
  (``_foreach_sqrt``), ``fused`` does not. Gradient clipping uses ``foreach`` as on CUDA.
- 8-bit AdamW ("adamw8bit"): the state bitsandbytes' ``AdamW8bit`` allocates (uint8 moments and
  one fp32 scale per 256 values for tensors of >= 4096 elements, fp32 moments below that),
  updated in place as its CUDA kernel does (``tracker.Adam8bitLayout``).
- The loss under CUDA autocast: ``log_softmax`` runs in 16 bits and ``nll_loss`` (on CUDA's fp32
  list) keeps an fp32 copy of it for backward, so the step computes ``F.cross_entropy`` exactly
  that way; CPU autocast instead casts the logits to fp32 first.
- PyTorch's CUDA caching allocator, simulated block by block (``_allocator.py``):
  sizes rounded up to 512 B, requests <= 1 MiB packed into 2 MiB segments, 1-10 MiB requests in
  20 MiB segments, larger ones rounded up to 2 MiB, best-fit reuse of cached blocks, splitting
  and coalescing. ``peak_bytes`` is then what ``torch.cuda.max_memory_allocated()`` reports and
  ``reserved_bytes`` what ``torch.cuda.max_memory_reserved()`` reports (cached segments are never
  given back, as on a card with room to spare). ``capped_reserved_bytes`` is what a card must
  let the allocator reserve: the smallest cap the simulated run fits under, since under a cap
  the allocator returns its wholly free cached segments before it reports out-of-memory
  (``_allocator.smallest_capacity``; within 2% of an H200 trace of the real ``train()`` for
  fp16 4 x 4 and 16 x 1 with the chunked loss, where the uncapped peak varied by 12% between
  two runs of the same step).
- ``train()``'s evaluation before step 1 (one batch of ``per_device_eval_batch_size`` = 4 rows,
  no grad, full fp32 logits even with a chunked loss): its freed blocks stay cached when the
  steps begin, as on the GPU, and the steps reuse or split them.
- The cuBLAS workspace (8 MiB on an RTX 2050), allocated at the first matmul through the caching
  allocator, so it is part of ``max_memory_allocated`` since PyTorch 2.0 (pytorch#95668); twice,
  since cuBLAS keeps one per thread's handle and backward runs in the autograd engine's thread.
- Outside the allocator: the CUDA context (:data:`CUDA_CONTEXT_BYTES`). ``total_bytes`` is
  ``reserved_bytes`` plus the context (the uncapped run), ``needed_bytes``
  ``capped_reserved_bytes`` plus the context: :meth:`MemoryReport.fits` holds that against the
  card minus a reserve of max(5%, 300 MiB) (:func:`reserve_bytes`, which says why).

Not modelled (each is small next to the terms above, or absent with the presets): fused
attention kernels' scratch buffers during backward (a few MiB, transient); dropout masks
(``dropout > 0``: CPU keeps a 4-byte mask per element, CUDA a 1-byte one, so the estimate is
high); other processes and the display on the same GPU (that is
what the reserve is for).

A deep model's step (the lesson's 12 layers) is recorded at 2 and 3 layers and synthesized
at its depth (``depth.py``: each layer's events repeated, each free's allocation by a rule learnt
from the pair), the same recording to the serial, in about two thirds of the time; where the pair is not
regular enough for that to be exact, the step is recorded at its depth.

The package is one-way: ``_allocator`` -> ``report`` -> ``replay`` -> ``_diskcache`` -> ``tracker``
-> ``depth`` -> ``measure`` -> ``plan`` -> ``show`` -> ``real`` -> ``cli`` (and ``_plan_worker``,
plan()'s worker processes, over ``plan``); each module imports only those before it, and this face only
re-exports them.

A step recorded once is kept on disk (``~/.cache/lowvram/recordings``, or
``$LOWVRAM_CACHE_DIR``; ``off`` turns it off), keyed on its arguments, the torch version and
lowvram's source: a plan that took ~25 s on 2 cores the first time takes under 2 s the next
time, in any process (:mod:`lowvram.memory._diskcache`).
"""

from lowvram.config import OPTIMIZERS
from lowvram.memory._allocator import CachingAllocatorSim as _CachingAllocatorSim
from lowvram.memory._allocator import OutOfMemory as _OutOfMemory
from lowvram.memory.measure import measure_step
from lowvram.memory.plan import (
    DEFAULT_RECIPES,
    LARGEST_SEARCH_FACTOR,
    AblationRow,
    PlanRow,
    ablation,
    plan,
)
from lowvram.memory.real import real_cpu_peaks, verify_gpu
from lowvram.memory.report import (
    ACTIVATION_PARTS,
    ADAMW_IMPLS,
    COMPONENTS,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    MAX_MICRO_BATCH,
    RESERVE_FRACTION,
    RESERVE_MIN_BYTES,
    TARGETS,
    GiB,
    MemoryReport,
    MiB,
    Recipe,
    reserve_bytes,
    usable_bytes,
)
from lowvram.memory.show import ablation_table, format_report, plan_table, plot_budget
from lowvram.memory.tracker import record_fake as _measure_cached  # the memo `make bench` clears

__all__ = [
    "ACTIVATION_PARTS",
    "ADAMW_IMPLS",
    "COMPONENTS",
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_RECIPES",
    "GiB",
    "LARGEST_SEARCH_FACTOR",
    "MAX_MICRO_BATCH",
    "MiB",
    "OPTIMIZERS",
    "RESERVE_FRACTION",
    "RESERVE_MIN_BYTES",
    "TARGETS",
    "AblationRow",
    "MemoryReport",
    "PlanRow",
    "Recipe",
    "ablation",
    "ablation_table",
    "format_report",
    "main",
    "measure_step",
    "plan",
    "plan_table",
    "plot_budget",
    "real_cpu_peaks",
    "reserve_bytes",
    "usable_bytes",
    "verify_gpu",
]
_ = (_CachingAllocatorSim, _OutOfMemory, _measure_cached)  # private names the tests and bench use


def main(argv=None) -> int:  # type: ignore[no-untyped-def]
    """``python -m lowvram.memory``: see ``--help``."""
    from lowvram.memory.cli import run  # the CLI is the top layer: imported when it runs

    return run(argv)
