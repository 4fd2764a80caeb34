"""What :mod:`lowvram.memory` measures with and what it returns: the recipe, the report, the
constants of a CUDA card and the headroom a plan keeps.

Import these names from ``lowvram.memory``. Layer 2 of the package: it imports only
:mod:`lowvram.config` and the allocator simulation's ``smallest_capacity``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lowvram.config import OPTIMIZERS, PRECISIONS, ModelConfig
from lowvram.memory._allocator import smallest_capacity

MiB = 2**20
GiB = 2**30

ADAMW_IMPLS = ("foreach", "fused", "loop")  # torch.optim.AdamW's kernels
TARGETS = ("cuda", "cpu")
PHASES = ("forward", "backward", "optimizer")

# What is live at the peak, in the order the budget chart stacks it.
COMPONENTS = (
    "params",  # the fp32 weights
    "grads",  # fp32 gradients, one per parameter (those already computed at the peak)
    "optimizer_state",  # AdamW's exp_avg and exp_avg_sq (+ step counters: on a GPU only if fused)
    "activations",  # what forward keeps for backward, the logits and the batch
    "temporaries",  # everything else: backward intermediates, optimizer scratch
    "cublas_workspace",  # CUDA only: cuBLAS's workspace, kept after the first matmul
)

# Where the activations come from (``MemoryReport.activations_detail``).
ACTIVATION_PARTS = (
    "embeddings",  # token + position embeddings
    "blocks",  # the transformer blocks (with checkpointing: only each block's input)
    "head_and_loss",  # final LayerNorm, logits, log-softmax and the loss
    "autocast_weight_copies",  # autocast's 16-bit copies of the Linear weights, kept for backward
    "other",
)

# CUDA context: ~270 MiB with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since
# CUDA 12.2 on Linux), ~640 MiB without it: PyTorch PR #86509. It is not in any allocator
# statistic; `nvidia-smi` or torch.cuda.mem_get_info() show it.
CUDA_CONTEXT_BYTES = 270 * MiB

# cuBLAS workspace: PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" (4096 KiB x 2 +
# 16 KiB x 8) on GPUs before Hopper, 32 MiB on Hopper (sm 9.x). Allocated through the caching
# allocator and kept for reuse: in max_memory_allocated since PyTorch 2.0 (pytorch#95668).
CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_HOPPER = 4096 * 8 * 1024

RTX2050_CAPABILITY = (8, 6)  # GA107 Ampere

# The headroom every plan keeps: usable = card - CUDA context - reserve, where the reserve is
# max(5% of the card, 300 MiB). On a laptop the card is shared: the desktop and any browser or
# video player with GPU acceleration take a few hundred MiB, and the real allocator fragments
# across streams and frees in ways the one-stream simulation cannot see. 300 MiB is the floor
# that covers a 4 GiB card; 5% scales it to bigger ones. (The context is inside total_bytes.)
RESERVE_FRACTION = 0.05
RESERVE_MIN_BYTES = 300 * MiB


def reserve_bytes(card_gib: float) -> int:
    """The memory a plan leaves free on a card of ``card_gib`` GiB: max(5%, 300 MiB)."""
    check_card(card_gib)
    return max(int(RESERVE_FRACTION * card_gib * GiB), RESERVE_MIN_BYTES)


def usable_bytes(card_gib: float) -> int:
    """What a step's ``total_bytes`` (context included) may use: the card minus the reserve."""
    return int(card_gib * GiB) - reserve_bytes(card_gib)


# --------------------------------------------------------------------------- validation


def check_card(card_gib: float) -> None:
    ok = isinstance(card_gib, (int, float)) and not isinstance(card_gib, bool) and 0 < card_gib <= 4096
    if not ok:
        raise ValueError(
            f"card_gib={card_gib!r} is not allowed: give the card's memory in GiB (0 < card_gib "
            "<= 4096), e.g. 4.0"
        )


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not allowed: {name} must be one of "
            f"{', '.join(repr(a) for a in allowed)}"
        )


# The largest micro-batch anything here will measure: far beyond any card (one sequence of the
# lesson's model takes ~150 MiB), small enough that sizes stay exact integers.
MAX_MICRO_BATCH = 65536


def check_micro_batch(micro_batch: object) -> None:
    ok = isinstance(micro_batch, int) and not isinstance(micro_batch, bool)
    if not (ok and 0 < micro_batch <= MAX_MICRO_BATCH):  # type: ignore[operator]
        raise ValueError(
            f"micro_batch={micro_batch!r} is not allowed: it must be an integer in "
            f"[1, {MAX_MICRO_BATCH}]"
        )


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True, init=False)
class Recipe:
    """The memory options of one training step (the micro-batch is chosen separately).

    ``tie_embeddings``, ``gradient_checkpointing`` and ``loss_chunk_size`` are the
    :class:`~lowvram.config.ModelConfig` fields of the same names and ``optimizer`` is
    :class:`~lowvram.config.TrainConfig`'s; ``None`` keeps the model config's value.
    ``adamw_impl`` picks torch's AdamW kernel ("foreach" is CUDA's default; ignored for
    "adamw8bit"). ``keep_logits=False`` measures ``loss = model(X, Y)[1]``, which frees the
    logits right after the forward instead of keeping them through the step as the lesson's
    ``logits, loss = model(X, Y)`` does. ``tie=``/``checkpointing=`` are accepted as the old
    spellings of the two model options.
    """

    name: str
    precision: str
    optimizer: str
    adamw_impl: str
    tie_embeddings: bool | None
    gradient_checkpointing: bool | None
    loss_chunk_size: int | None
    keep_logits: bool

    def __init__(
        self,
        name: str = "",
        precision: str = "no",
        optimizer: str = "adamw",
        adamw_impl: str = "foreach",
        tie_embeddings: bool | None = None,
        gradient_checkpointing: bool | None = None,
        loss_chunk_size: int | None = None,
        keep_logits: bool = True,
        *,
        tie: bool | None = None,
        checkpointing: bool | None = None,
    ) -> None:
        values = {
            "name": name, "precision": precision, "optimizer": optimizer,
            "adamw_impl": adamw_impl,
            "tie_embeddings": tie_embeddings if tie is None else bool(tie),
            "gradient_checkpointing": (
                gradient_checkpointing if checkpointing is None else bool(checkpointing)
            ),
            "loss_chunk_size": loss_chunk_size, "keep_logits": keep_logits,
        }  # fmt: skip
        for key, value in values.items():
            object.__setattr__(self, key, value)
        check_choice("precision", precision, PRECISIONS)
        if optimizer in ADAMW_IMPLS:
            raise ValueError(
                f"optimizer={optimizer!r} is not allowed: optimizer is now the algorithm "
                f"({', '.join(map(repr, OPTIMIZERS))}); AdamW's kernel is adamw_impl={optimizer!r}"
            )
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("adamw_impl", adamw_impl, ADAMW_IMPLS)
        if loss_chunk_size is not None:
            # ModelConfig validates it (an integer >= 0) when the recipe is applied
            dataclasses.replace(ModelConfig(), loss_chunk_size=loss_chunk_size)

    def apply(self, model_config: ModelConfig) -> ModelConfig:
        """``model_config`` with this recipe's model options (those that are not None)."""
        changes = {
            k: getattr(self, k)
            for k in ("tie_embeddings", "gradient_checkpointing", "loss_chunk_size")
            if getattr(self, k) is not None
        }
        return dataclasses.replace(model_config, **changes)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one steady-state optimizer step of ``train()``, in bytes.

    ``params_bytes``, ``grads_bytes``, ``optimizer_state_bytes`` and ``activations_bytes`` are the
    full sizes of those parts (activations: what the 2nd forward leaves for backward, logits
    included); ``at_peak`` is what is live at the peak moment, one entry per :data:`COMPONENTS`
    item, and sums to ``peak_bytes``; ``temporaries_bytes`` is its ``temporaries`` entry.
    """

    model_config: ModelConfig = field(repr=False)  # with the recipe's options applied
    recipe: Recipe = field(repr=False)
    micro_batch: int
    gradient_accumulation_steps: int  # micro-batches per optimizer step, as train() runs them
    seq_len: int
    target: str
    num_parameters: int
    params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    activations_detail: Mapping[str, int] = field(repr=False)  # ACTIVATION_PARTS -> bytes
    temporaries_bytes: int
    peak_bytes: int  # target "cuda": torch.cuda.max_memory_allocated() of the 2nd step
    peak_phase: str  # "forward", "backward" or "optimizer"
    peak_op: str  # the ATen op whose output reached the peak, e.g. "_foreach_sqrt"
    at_peak: Mapping[str, int] = field(repr=False)
    phase_peaks: Mapping[str, int] = field(repr=False)
    reserved_bytes: int  # target "cuda": simulated torch.cuda.max_memory_reserved(), uncapped
    overheads: Mapping[str, int] = field(repr=False)  # outside max_memory_allocated
    # target "cuda": the simulated run's allocator requests, (key, bytes) and (key, -1) for a
    # free, made on demand for capped_reserved_bytes (None: a report made by hand: its reserved)
    allocator_requests: Callable[[], list[tuple[int, int]]] | None = field(
        default=None, repr=False, compare=False)

    # the recipe's options and the model's, read through (read-only properties, not fields)
    precision = property(lambda self: self.recipe.precision)
    optimizer = property(lambda self: self.recipe.optimizer)
    adamw_impl = property(lambda self: self.recipe.adamw_impl)
    keep_logits = property(lambda self: self.recipe.keep_logits)
    tie_embeddings = property(lambda self: self.model_config.tie_embeddings)
    gradient_checkpointing = property(lambda self: self.model_config.gradient_checkpointing)
    loss_chunk_size = property(lambda self: self.model_config.loss_chunk_size)

    tie = tie_embeddings  # the old spellings, read-only
    checkpointing = gradient_checkpointing

    @property
    def total_bytes(self) -> int:
        """What an uncapped run reserves plus the CUDA context: the peak plus every overhead
        (allocator cache, context). A card needs less: :attr:`needed_bytes`."""
        return self.peak_bytes + sum(self.overheads.values())

    @cached_property
    def capped_reserved_bytes(self) -> int:
        """The smallest cap on the allocator's reserved memory under which the simulated run
        (the model's setup, the evaluation before step 1, both steps) raises no out-of-memory,
        to 2 MiB (:func:`~lowvram.memory._allocator.smallest_capacity`): what a card must hold
        besides the CUDA context. Under a cap the allocator returns its wholly free cached
        segments and retries before it fails, so this is <= :attr:`reserved_bytes`, the uncapped
        peak (which on a real GPU also depends on the driver's segment addresses: the same
        chunked-loss run reserved 3,610 and 4,040 MiB on an H200). Computed on first use (a few
        tenths of a second: a bisection over full simulations), then kept. CPU: the peak."""
        if self.target != "cuda":
            return self.peak_bytes
        if self.allocator_requests is None:
            return self.reserved_bytes
        # never above the uncapped peak (the bisection's 2 MiB rounding could pass it)
        return min(smallest_capacity(self.allocator_requests()), self.reserved_bytes)

    @property
    def needed_bytes(self) -> int:
        """What the card must hold: :attr:`capped_reserved_bytes` plus the CUDA context. The
        figure :meth:`fits` judges (:attr:`total_bytes` is the uncapped run's)."""
        return self.capped_reserved_bytes + self.overheads.get("cuda_context", 0)

    def margin_bytes(self, card_gib: float = 4.0, free_bytes: int | None = None) -> int:
        """The bytes left under the limit :meth:`fits` holds the step against (>= 0 exactly when
        it fits): ``card - reserve - needed_bytes``, or with ``free_bytes``
        ``free_bytes - reserve - capped_reserved_bytes``.

        Exact near the limit only: where the uncapped reserved memory is under it too, the
        margin of that (smaller) is returned, and where the allocated peak alone is over it,
        the (larger) margin of the peak: :attr:`capped_reserved_bytes`, which lies between
        them, is computed only where it decides (it costs a few tenths of a second).
        """
        if free_bytes is not None:
            limit = free_bytes - reserve_bytes(card_gib)
        else:
            limit = usable_bytes(card_gib) - self.overheads.get("cuda_context", 0)
        if self.reserved_bytes <= limit or self.peak_bytes > limit:
            return limit - (self.reserved_bytes if self.reserved_bytes <= limit else self.peak_bytes)
        return limit - self.capped_reserved_bytes

    def fits(self, card_gib: float = 4.0, free_bytes: int | None = None) -> bool:
        """Whether the step fits a card of ``card_gib`` GiB and leaves its headroom free.

        ``needed_bytes <= card - reserve`` (:func:`reserve_bytes`: max(5%, 300 MiB)), where
        :attr:`needed_bytes` is what the run needs under a cap (as the card's own memory caps
        it), context included. With ``free_bytes`` (what ``torch.cuda.mem_get_info()`` says is
        free once the context exists) the context is already taken:
        ``capped_reserved_bytes <= free_bytes - reserve``.
        """
        return self.margin_bytes(card_gib, free_bytes) >= 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the options, every byte count, the peak's phase and op."""
        return {
            "micro_batch": self.micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "adamw_impl": self.adamw_impl,
            "tie_embeddings": self.tie_embeddings,
            "gradient_checkpointing": self.gradient_checkpointing,
            "loss_chunk_size": self.loss_chunk_size,
            "target": self.target,
            "keep_logits": self.keep_logits,
            "num_parameters": self.num_parameters,
            "params_bytes": self.params_bytes,
            "grads_bytes": self.grads_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "activations_bytes": self.activations_bytes,
            "activations_detail": dict(self.activations_detail),
            "temporaries_bytes": self.temporaries_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "peak_op": self.peak_op,
            "at_peak": dict(self.at_peak),
            "phase_peaks": dict(self.phase_peaks),
            "reserved_bytes": self.reserved_bytes,
            "capped_reserved_bytes": self.capped_reserved_bytes,
            "overheads": dict(self.overheads),
            "total_bytes": self.total_bytes,
            "needed_bytes": self.needed_bytes,
        }
