"""How much GPU memory one training step needs, measured without a GPU.

Measure one steady-state step of the real ``GPTModel`` + AdamW and ask whether it fits a card::

    from lowvram.config import get_preset
    from lowvram.memory import measure_step, plan, ablation, plan_table, ablation_table
    model_cfg, _ = get_preset("rtx2050")
    report = measure_step(model_cfg, micro_batch=4, precision="fp16")
    print(report.peak_bytes / 2**20, report.peak_phase, report.peak_op)
    print(report.fits(card_gib=4.0))
    print(plan_table(plan(model_cfg, card_gib=4.0, target_effective_batch=16)))
    print(ablation_table(ablation(model_cfg, micro_batch=4)))

From a shell (``--json`` for machines, ``--verify-gpu`` to hold the estimate against a real GPU)::

    python -m lowvram.memory --preset rtx2050 --precision fp16 --json
    python -m lowvram.memory --preset rtx2050 --plan --ablation
    python -m lowvram.memory --preset rtx2050 --precision fp16 --verify-gpu

How it measures. The model, optimizer and batch are fake tensors on the ``cpu`` device
(``FakeTensorMode``: shapes and dtypes, no data, no arithmetic), and a ``TorchDispatchMode`` sees
every ATen op of the step: it records each new untyped storage and, through a weakref finalizer,
the moment it dies. Two whole steps run (forward, backward, gradient clipping, AdamW step,
``zero_grad(set_to_none=True)``), in the order of the seed's loop, and the 2nd one is reported
(AdamW creates its state lazily in the 1st). On the CPU allocator this reproduces the real peak to
a few bytes (``tests/test_memory.py`` checks it against ``torch.profiler``).

What ``target="cuda"`` (the default) adds, to predict a CUDA GPU instead of this CPU:

- AdamW's implementation is the one you choose (``foreach`` is the CUDA default; CPU's default is
  the per-parameter loop). ``foreach`` keeps a temporary as large as all parameters
  (``_foreach_sqrt``), ``fused`` does not. Gradient clipping uses ``foreach`` as on CUDA.
- The loss under CUDA autocast: ``log_softmax`` runs in 16 bits and ``nll_loss`` (on CUDA's fp32
  list) keeps an fp32 copy of it for backward, so the step computes ``F.cross_entropy`` exactly
  that way (:func:`_cross_entropy_like_cuda`); CPU autocast instead casts the logits to fp32 first.
- PyTorch's CUDA caching allocator, simulated block by block (:class:`_CachingAllocatorSim`):
  sizes rounded up to 512 B, requests <= 1 MiB packed into 2 MiB segments, 1-10 MiB requests in
  20 MiB segments, larger ones rounded up to 2 MiB, best-fit reuse of cached blocks, splitting
  and coalescing. ``peak_bytes`` is then what ``torch.cuda.max_memory_allocated()`` reports and
  ``reserved_bytes`` what ``torch.cuda.max_memory_reserved()`` reports (cached segments are never
  given back, as on a card with room to spare).
- The cuBLAS workspace (8 MiB on an RTX 2050), allocated at the first matmul through the caching
  allocator, so it is part of ``max_memory_allocated`` since PyTorch 2.0 (pytorch#95668).
- Outside the allocator: the CUDA context (:data:`CUDA_CONTEXT_BYTES`). ``total_bytes`` (the number
  :meth:`MemoryReport.fits` holds against the card) is ``reserved_bytes`` plus the context.

Not modelled (each is small next to the terms above, or absent with the presets): fused
attention kernels' scratch buffers during backward (a few MiB, transient); the GradScaler of fp16
(a few scalars); dropout masks (``dropout > 0``: CPU keeps a 4-byte mask per element, CUDA a
1-byte one, so the estimate is high); other processes and the display on the same GPU.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowvram._display import MarkdownTable
from lowvram.config import PRECISIONS, ModelConfig, get_preset
from lowvram.model import GPTModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ACTIVATION_PARTS",
    "COMPONENTS",
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_RECIPES",
    "OPTIMIZERS",
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
    "verify_gpu",
]

MiB = 2**20
GiB = 2**30

OPTIMIZERS = ("foreach", "fused", "loop")
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

# CUDA context: ~270 MiB with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since
# CUDA 12.2 on Linux), ~640 MiB without it: PyTorch PR #86509. It is not in any allocator
# statistic; `nvidia-smi` or torch.cuda.mem_get_info() show it.
CUDA_CONTEXT_BYTES = 270 * MiB

# cuBLAS workspace: PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" (4096 KiB x 2 +
# 16 KiB x 8) on GPUs before Hopper, 32 MiB on Hopper (sm 9.x). Allocated through the caching
# allocator and kept for reuse: in max_memory_allocated since PyTorch 2.0 (pytorch#95668).
CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8
_CUBLAS_WORKSPACE_HOPPER = 4096 * 8 * 1024

RTX2050_CAPABILITY = (8, 6)  # GA107 Ampere

# Where the activations come from (``MemoryReport.activations_detail``).
ACTIVATION_PARTS = (
    "embeddings",  # token + position embeddings
    "blocks",  # the transformer blocks (with checkpointing: only each block's input)
    "head_and_loss",  # final LayerNorm, logits, log-softmax and the loss
    "autocast_weight_copies",  # autocast's 16-bit copies of the Linear weights, kept for backward
    "other",
)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul"}


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one steady-state training step, in bytes.

    ``params_bytes``, ``grads_bytes``, ``optimizer_state_bytes`` and ``activations_bytes`` are the
    full sizes of those parts (activations: what the 2nd forward leaves for backward, logits
    included); ``at_peak`` is what is live at the peak moment, one entry per :data:`COMPONENTS`
    item, and sums to ``peak_bytes``; ``temporaries_bytes`` is its ``temporaries`` entry.
    """

    model_config: ModelConfig = field(repr=False)
    micro_batch: int
    seq_len: int
    precision: str
    optimizer: str
    target: str
    keep_logits: bool
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
    reserved_bytes: int  # target "cuda": simulated torch.cuda.max_memory_reserved()
    overheads: Mapping[str, int] = field(repr=False)  # outside max_memory_allocated

    @property
    def tie(self) -> bool:
        return self.model_config.tie_embeddings

    @property
    def checkpointing(self) -> bool:
        return self.model_config.gradient_checkpointing

    @property
    def total_bytes(self) -> int:
        """What the card must hold: the peak plus every overhead (allocator cache, CUDA context)."""
        return self.peak_bytes + sum(self.overheads.values())

    def fits(self, card_gib: float = 4.0) -> bool:
        """Whether ``total_bytes`` fits a card of ``card_gib`` GiB.

        Conservative: the simulated allocator never gives cached segments back, whereas the real
        one frees them and retries before it reports out-of-memory. Check the card's usable
        memory with ``torch.cuda.mem_get_info()`` (a display on the same GPU takes its share).
        """
        _check_card(card_gib)
        return self.total_bytes <= card_gib * GiB

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the options, every byte count, the peak's phase and op."""
        out: dict[str, Any] = {
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "tie": self.tie,
            "checkpointing": self.checkpointing,
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
            "overheads": dict(self.overheads),
            "total_bytes": self.total_bytes,
        }
        return out


# --------------------------------------------------------------------------- validation


def _check_card(card_gib: float) -> None:
    ok = isinstance(card_gib, (int, float)) and not isinstance(card_gib, bool) and card_gib > 0
    if not ok:
        raise ValueError(f"card_gib={card_gib!r} is not allowed: give the card's memory in GiB, e.g. 4.0")


def _check_options(micro_batch: int, precision: str, optimizer: str, target: str) -> None:
    if not (isinstance(micro_batch, int) and not isinstance(micro_batch, bool) and micro_batch > 0):
        raise ValueError(f"micro_batch={micro_batch!r} is not allowed: it must be a positive integer")
    for name, value, allowed in (
        ("precision", precision, PRECISIONS),
        ("optimizer", optimizer, OPTIMIZERS),
        ("target", target, TARGETS),
    ):
        if value not in allowed:
            raise ValueError(
                f"{name}={value!r} is not allowed: {name} must be one of "
                f"{', '.join(repr(a) for a in allowed)}"
            )


# --------------------------------------------------------------------------- CUDA allocator


class _OutOfMemory(Exception):
    pass


class _Block:
    __slots__ = ("addr", "size", "small", "allocated", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _CachingAllocatorSim:
    """PyTorch's native CUDA caching allocator with its default settings, one stream.

    After ``c10/cuda/CUDACachingAllocator.cpp``: a request is rounded up to a multiple of 512 B;
    requests <= 1 MiB come from the small pool (2 MiB segments), larger ones from the large pool
    (a 20 MiB segment for 1-10 MiB, otherwise the size rounded up to 2 MiB). A request takes the
    smallest cached free block that is large enough (lowest address on ties), split when the
    rest is >= 512 B (small pool) or > 1 MiB (large pool); an unsplit block is counted whole in
    ``allocated``. Freed blocks merge with free neighbours of the same segment. Segments are
    never returned (``capacity=None``) or, when a new one would pass ``capacity``, every wholly
    free segment is released and the request retried, as the allocator does before an OOM.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, addr)
        self.free_blocks: dict[int, _Block] = {}
        self.by_key: dict[int, _Block] = {}
        self.next_addr = 0
        self.allocated = 0
        self.reserved = 0

    @staticmethod
    def round_size(nbytes: int) -> int:
        return max(512, -(-nbytes // 512) * 512)

    @staticmethod
    def segment_size(size: int) -> int:
        if size <= 1 * MiB:
            return 2 * MiB
        if size < 10 * MiB:
            return 20 * MiB
        return -(-size // (2 * MiB)) * (2 * MiB)

    def _insert(self, block: _Block) -> None:
        bisect.insort(self.pools[block.small], (block.size, block.addr))
        self.free_blocks[block.addr] = block

    def _remove(self, block: _Block) -> None:
        pool = self.pools[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.addr))]
        del self.free_blocks[block.addr]

    def _release_cached(self) -> None:
        for block in list(self.free_blocks.values()):
            if block.prev is None and block.next is None:
                self._remove(block)
                self.reserved -= block.size

    def malloc(self, key: int, nbytes: int) -> int:
        """Allocate ``nbytes`` for ``key``; return the bytes charged to ``allocated``."""
        if nbytes == 0:
            return 0  # the allocator hands out a null pointer for empty tensors
        size = self.round_size(nbytes)
        small = size <= 1 * MiB
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = self.free_blocks[pool[i][1]]
            self._remove(block)
        else:
            seg = self.segment_size(size)
            if self.capacity is not None and self.reserved + seg > self.capacity:
                self._release_cached()
                if self.reserved + seg > self.capacity:
                    raise _OutOfMemory
            block = _Block(self.next_addr, seg, small)
            self.next_addr += seg
            self.reserved += seg
        rest = block.size - size
        if (small and rest >= 512) or (not small and rest > 1 * MiB):
            tail = _Block(block.addr + size, rest, small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._insert(tail)
        block.allocated = True
        self.by_key[key] = block
        self.allocated += block.size
        return block.size

    def free(self, key: int) -> None:
        block = self.by_key.pop(key, None)
        if block is None:
            return
        block.allocated = False
        self.allocated -= block.size
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._remove(prev)
            prev.size += block.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            block = prev
        nxt = block.next
        if nxt is not None and not nxt.allocated:
            self._remove(nxt)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        self._insert(block)


# --------------------------------------------------------------------------- the tracker


class _StorageTracker(TorchDispatchMode):
    """Records every untyped storage that an op creates and, by a weakref finalizer, its death.

    ``live`` maps the storage's address to ``(serial, charged bytes, nbytes)``; ``log`` keeps the
    sequence of ``(serial, bytes)`` allocations and ``(serial, 0)`` frees so that the live set at
    the peak can be replayed afterwards. With an allocator simulation the charged bytes are the
    allocator's block sizes, otherwise the storage's ``nbytes()``.
    """

    def __init__(
        self,
        allocator: _CachingAllocatorSim | None,
        cublas_workspace: int = 0,
        host_constants: bool = False,
    ) -> None:
        super().__init__()
        self.allocator = allocator
        # On CUDA, `torch.tensor(x)` without a device (AdamW's step counters) stays in host memory
        self.host_constants = host_constants
        self.host: set[int] = set()
        self.cublas_workspace = cublas_workspace  # allocated at the first matmul (CUDA)
        self.workspace_serial: int | None = None
        self.live: dict[int, tuple[int, int, int]] = {}  # address -> (serial, charged, nbytes)
        self.log: list[tuple[int, int]] = []
        self.origin: dict[int, str] = {}  # serial -> phase tag it was allocated in
        self.region = "other"  # the model part running now (set by forward pre-hooks)
        self.regions: dict[int, str] = {}  # serial -> model part it was allocated in
        self.param_keys: set[int] = set()  # storages of the parameters (for autocast's copies)
        self.serial = 0
        self.current = 0
        self.phase = "setup"
        self.window_open = False
        self.peak = 0
        self.peak_index = -1
        self.peak_phase = ""
        self.peak_op = ""
        self.phase_peaks: dict[str, int] = {}
        self.reserved_peak = 0

    # allocation bookkeeping
    def _alloc(self, nbytes: int, op: str) -> int:
        self.serial += 1
        serial = self.serial
        charged = self.allocator.malloc(serial, nbytes) if self.allocator else nbytes
        self.current += charged
        self.log.append((serial, charged))
        self.origin[serial] = self.phase
        self.regions[serial] = self.region
        if self.window_open:
            if self.current > self.peak:
                self.peak = self.current
                self.peak_index = len(self.log) - 1
                self.peak_phase = self.phase.split(":")[0]
                self.peak_op = op
            name = self.phase.split(":")[0]
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
            if self.allocator is not None:
                self.reserved_peak = max(self.reserved_peak, self.allocator.reserved)
        return serial

    def _free(self, serial: int, charged: int) -> None:
        self.current -= charged
        self.log.append((serial, 0))
        if self.allocator is not None:
            self.allocator.free(serial)

    def _on_storage_death(self, key: int, serial: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] == serial:
            del self.live[key]
            self._free(serial, entry[1])

    def track(self, t: torch.Tensor, op: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.host:
            return
        if self.host_constants and op in ("lift_fresh", "lift_fresh_copy"):
            self.host.add(key)
            weakref.finalize(st, self.host.discard, key)
            return
        nbytes = st.nbytes()
        entry = self.live.get(key)
        if entry is not None:
            if nbytes <= entry[2]:
                return  # a view, an in-place op, or an input passed through
            # resized in place (an out= op): a new allocation replaces the old one
            del self.live[key]
            self._free(entry[0], entry[1])
        serial = self._alloc(nbytes, op)
        self.live[key] = (serial, self.log[-1][1], nbytes)
        weakref.finalize(st, self._on_storage_death, key, serial)

    def set_phase(self, tag: str) -> None:
        """Name the phase (``"forward:1"``); its peak starts at what is live now."""
        self.phase = tag
        self.region = "other"
        if self.window_open:
            name = tag.split(":")[0]
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)

    def tracked(self, tensors: Iterator[torch.Tensor]) -> dict[int, int]:
        """``{serial: charged bytes}`` of the tracked storages behind ``tensors``."""
        out = {}
        for t in tensors:
            entry = self.live.get(t.untyped_storage()._cdata)
            if entry is not None:
                out[entry[0]] = entry[1]
        return out

    def open_window(self) -> None:
        """Start measuring: the peak of the step starts at what is live now."""
        self.window_open = True
        self.peak = self.current
        self.peak_index = len(self.log) - 1
        self.peak_phase, self.peak_op = "forward", "(start of step)"
        if self.allocator is not None:
            self.reserved_peak = self.allocator.reserved

    def live_at_peak(self) -> dict[int, int]:
        live: dict[int, int] = {}
        for serial, charged in self.log[: self.peak_index + 1]:
            if charged:
                live[serial] = charged
            else:
                live.pop(serial, None)
        return live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            # The step's only data-dependent scalars: AdamW's step count (.item(): any positive
            # value gives the same memory) and the model's token-range check (passes).
            t = args[0]
            if t.dtype == torch.bool:
                return False
            if t.is_floating_point():
                return 1.0
            return 0
        name = func.overloadpacket.__name__
        if self.cublas_workspace and self.workspace_serial is None and name in _MATMULS:
            self.workspace_serial = self._alloc(self.cublas_workspace, name)
        out = func(*args, **(kwargs or {}))
        region = self.region
        if name == "_to_copy" and args[0].untyped_storage()._cdata in self.param_keys:
            self.region = "autocast_weight_copies"  # autocast's 16-bit copy of a weight
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, name)
        self.region = region
        return out


# --------------------------------------------------------------------------- the step


def _cross_entropy_like_cuda(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` as CUDA autocast runs it on 16-bit logits.

    ``cross_entropy`` calls ``log_softmax(x, dtype=x.dtype)``, which autocast leaves in 16 bits,
    then ``nll_loss``, which is on CUDA autocast's fp32 list: its input is cast to fp32 and that
    copy is saved for backward. CPU autocast casts the logits to fp32 before ``log_softmax``.
    """
    logits = logits.view(-1, logits.size(-1))
    with torch.autocast("cpu", enabled=False):
        log_probs = torch.log_softmax(logits, dim=1)  # 16 bits, saved by log_softmax's backward
        return F.nll_loss(log_probs.float(), targets.reshape(-1))  # fp32 copy, saved by nll_loss


def _make_optimizer(model: torch.nn.Module, optimizer: str) -> torch.optim.AdamW:
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(model.parameters(), lr=3e-4, **impl[optimizer])


def _run_steps(
    model: GPTModel,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    precision: str,
    device_type: str,
    cuda_loss: bool,
    keep_logits: bool,
    max_grad_norm: float | None,
    foreach_clip: bool,
    on_phase: Callable[[int, str], None],
    steps: int = 2,
) -> None:
    """The seed's loop body, ``steps`` times; ``on_phase(step, phase)`` marks each phase's start
    (and ``(steps, "end")`` the end)."""
    X, Y = batch[:, :-1], batch[:, 1:]  # as the seed splits a (B, block_size + 1) batch
    autocast = torch.autocast(device_type, dtype=_DTYPES[precision], enabled=precision != "no")
    logits = loss = None  # the seed's loop keeps both until the next forward returns
    for step in range(steps):
        on_phase(step, "forward")
        with autocast:
            if cuda_loss:
                logits, _ = model(X)
                loss = _cross_entropy_like_cuda(logits, Y)
            else:
                logits, loss = model(X, Y)
        if not keep_logits:
            logits = None  # `loss = model(X, Y)[1]`: the logits die with the forward
        on_phase(step, "backward")
        loss.backward()
        on_phase(step, "optimizer")
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=foreach_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    on_phase(steps, "end")
    del logits, loss


def _mark_regions(model: GPTModel, tracker: _StorageTracker) -> None:
    """Forward pre-hooks that tell the tracker which part of the model is running."""

    def enter(region: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            tracker.region = region

        return hook

    model.register_forward_pre_hook(enter("embeddings"))
    if len(model.blocks):
        model.blocks[0].register_forward_pre_hook(enter("blocks"))
    model.ln_f.register_forward_pre_hook(enter("head_and_loss"))


def _with_options(
    model_config: ModelConfig, tie: bool | None, checkpointing: bool | None
) -> ModelConfig:
    """The model config with ``tie`` / ``checkpointing`` applied (None keeps the config's)."""
    return dataclasses.replace(
        model_config,
        tie_embeddings=model_config.tie_embeddings if tie is None else bool(tie),
        gradient_checkpointing=(
            model_config.gradient_checkpointing if checkpointing is None else bool(checkpointing)
        ),
    )


def measure_step(
    model_config: ModelConfig,
    micro_batch: int,
    precision: str = "no",
    tie: bool | None = None,
    checkpointing: bool | None = None,
    optimizer: str = "foreach",
    target: str = "cuda",
    *,
    keep_logits: bool = True,
    max_grad_norm: float | None = 1.0,
    cuda_capability: tuple[int, int] = RTX2050_CAPABILITY,
) -> MemoryReport:
    """Measure the 2nd training step of ``GPTModel(model_config)`` with AdamW (no GPU needed;
    about a second for the 134M-parameter seed model, since fake tensors do no arithmetic).

    Args:
        model_config: the model's shape; each sequence has ``block_size`` tokens.
        micro_batch: sequences per forward/backward (the per-device batch).
        precision: "no" (fp32), "fp16" or "bf16" autocast (weights, grads and Adam stay fp32).
        tie: tie the lm head to the token embedding (None: the config's ``tie_embeddings``).
        checkpointing: gradient checkpointing of every block (None: the config's).
        optimizer: AdamW's implementation: "foreach" (CUDA's default), "fused" or "loop".
        target: "cuda" predicts a CUDA GPU (see the module docstring for what that adds);
            "cpu" reports the CPU allocator's numbers (what the tests check).
        keep_logits: the seed's ``logits, loss = model(X, Y)`` keeps the logits alive through
            backward and the optimizer step; False measures ``loss = model(X, Y)[1]``.
        max_grad_norm: clip gradients as the seed does (None: no clipping).
        cuda_capability: the GPU's compute capability: it sets the cuBLAS workspace size.
    """
    _check_options(micro_batch, precision, optimizer, target)
    cfg = _with_options(model_config, tie, checkpointing)
    return _measure_cached(cfg, micro_batch, precision, optimizer, target, keep_logits,
                           max_grad_norm, tuple(cuda_capability))


@lru_cache(maxsize=256)
def _measure_cached(
    cfg: ModelConfig,
    micro_batch: int,
    precision: str,
    optimizer: str,
    target: str,
    keep_logits: bool,
    max_grad_norm: float | None,
    cuda_capability: tuple[int, int],
) -> MemoryReport:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = target == "cuda"
    workspace = 0
    if cuda:
        workspace = _CUBLAS_WORKSPACE_HOPPER if cuda_capability[0] == 9 else CUBLAS_WORKSPACE_BYTES
    tracker = _StorageTracker(_CachingAllocatorSim() if cuda else None, workspace, host_constants=cuda)
    seen: dict[str, Any] = {}

    def on_phase(step: int, phase: str) -> None:
        if step == 1 and phase == "forward":
            tracker.open_window()
        if step == 1 and phase == "backward":  # end of the measured forward
            detail = dict.fromkeys(ACTIVATION_PARTS, 0)
            for serial, charged, _ in tracker.live.values():
                if tracker.origin.get(serial) == "forward:1":
                    detail[tracker.regions[serial]] += charged
            seen["activations"] = detail
        if step == 1 and phase == "optimizer":  # gradients complete, not yet freed
            seen["grads"] = tracker.tracked(p.grad for p in model.parameters() if p.grad is not None)
        if step == 2:
            seen["state"] = tracker.tracked(
                t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
            )
        tracker.set_phase(f"{phase}:{step}")

    with FakeTensorMode():
        model = GPTModel(cfg)  # untracked: this is the model on the host
        with tracker:
            # what accelerate.prepare's model.to("cuda") does: one new storage per parameter
            for p in model.parameters():
                p.data = p.data.clone()
            params = tracker.tracked(model.parameters())
            tracker.param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
            _mark_regions(model, tracker)
            opt = _make_optimizer(model, optimizer)
            batch = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.block_size + 1))
            _run_steps(
                model, opt, batch,
                precision=precision, device_type="cpu", cuda_loss=cuda and precision != "no",
                keep_logits=keep_logits, max_grad_norm=max_grad_norm, foreach_clip=cuda,
                on_phase=on_phase,
            )

    at_peak = dict.fromkeys(COMPONENTS, 0)
    for serial, charged in tracker.live_at_peak().items():
        if serial in params:
            part = "params"
        elif serial in seen["state"]:
            part = "optimizer_state"
        elif serial in seen["grads"]:
            part = "grads"
        elif serial == tracker.workspace_serial:
            part = "cublas_workspace"
        elif tracker.origin[serial].startswith(("forward", "setup")):
            part = "activations"  # both forwards' outputs, and the batch
        else:
            part = "temporaries"
        at_peak[part] += charged
    if not cuda:
        del at_peak["cublas_workspace"]
    assert sum(at_peak.values()) == tracker.peak
    reserved = tracker.reserved_peak if cuda else tracker.peak
    overheads = {"allocator_cache": reserved - tracker.peak, "cuda_context": CUDA_CONTEXT_BYTES}
    return MemoryReport(
        model_config=cfg,
        micro_batch=micro_batch,
        seq_len=cfg.block_size,
        precision=precision,
        optimizer=optimizer,
        target=target,
        keep_logits=keep_logits,
        num_parameters=sum(p.numel() for p in model.parameters()),
        params_bytes=sum(params.values()),
        grads_bytes=sum(seen["grads"].values()),
        optimizer_state_bytes=sum(seen["state"].values()),
        activations_bytes=sum(seen["activations"].values()),
        activations_detail=MappingProxyType(seen["activations"]),
        temporaries_bytes=at_peak["temporaries"],
        peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase,
        peak_op=tracker.peak_op,
        at_peak=MappingProxyType(at_peak),
        phase_peaks=MappingProxyType({p: tracker.phase_peaks.get(p, 0) for p in PHASES}),
        reserved_bytes=reserved,
        overheads=MappingProxyType(overheads if cuda else {}),
    )


# --------------------------------------------------------------------------- planner


@dataclass(frozen=True)
class Recipe:
    """A set of memory options for :func:`measure_step` (the micro-batch is searched)."""

    name: str
    precision: str = "no"
    optimizer: str = "foreach"
    tie: bool = False
    checkpointing: bool = False
    keep_logits: bool = True

    def measure(self, model_config: ModelConfig, micro_batch: int) -> MemoryReport:
        return measure_step(
            model_config, micro_batch, precision=self.precision, tie=self.tie,
            checkpointing=self.checkpointing, optimizer=self.optimizer,
            keep_logits=self.keep_logits,
        )


DEFAULT_RECIPES = (
    Recipe("fp32 (seed baseline)"),
    Recipe("fp16 (the seed's choice)", precision="fp16"),
    Recipe("bf16 + fused AdamW", precision="bf16", optimizer="fused"),
    Recipe("bf16 + fused + tied", precision="bf16", optimizer="fused", tie=True),
    Recipe(
        "bf16 + fused + tied + checkpointing",
        precision="bf16", optimizer="fused", tie=True, checkpointing=True,
    ),
)


@dataclass(frozen=True)
class PlanRow:
    """The largest micro-batch of one recipe that fits, and the accumulation it then needs."""

    recipe: Recipe
    micro_batch: int  # 0: not even one sequence fits
    accumulation: int  # ceil(target_effective_batch / micro_batch)
    effective_batch: int  # micro_batch x accumulation (>= the target)
    report: MemoryReport | None  # the measurement at micro_batch

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def plan(
    model_config: ModelConfig,
    card_gib: float = 4.0,
    target_effective_batch: int = 16,
    recipes: Sequence[Recipe] = DEFAULT_RECIPES,
) -> list[PlanRow]:
    """For each recipe, the largest micro-batch (up to the target) whose step fits the card.

    A micro-batch larger than ``target_effective_batch`` is never needed, so the search stops
    there; the accumulation is then ``ceil(target / micro_batch)``.
    """
    _check_card(card_gib)
    if not (isinstance(target_effective_batch, int) and target_effective_batch > 0):
        raise ValueError(
            f"target_effective_batch={target_effective_batch!r} is not allowed: "
            "it must be a positive integer, e.g. 16"
        )
    return [_plan_one(model_config, r, card_gib, target_effective_batch) for r in recipes]


def _plan_one(model_config: ModelConfig, recipe: Recipe, card_gib: float, target: int) -> PlanRow:
    """The largest micro-batch in [1, target] that fits: the whole target first (the answer
    on a roomy card), then bisection, since memory grows with the micro-batch."""
    best: MemoryReport | None = None
    lo, hi = 1, target  # the answer is in [lo - 1, hi]
    while lo <= hi:
        mid = hi if best is None and hi == target else (lo + hi) // 2
        r = recipe.measure(model_config, mid)
        if r.fits(card_gib):
            best, lo = r, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return PlanRow(recipe, 0, 0, 0, None)
    micro = best.micro_batch
    accumulation = math.ceil(target / micro)
    return PlanRow(recipe, micro, accumulation, micro * accumulation, best)


@dataclass(frozen=True)
class AblationRow:
    """One step of the ablation: a recipe, its measurement and the change from the row above."""

    name: str
    recipe: Recipe
    report: MemoryReport
    peak_change: int  # bytes, vs the previous row (0 for the first)
    total_change: int


def _ablation_recipes() -> list[Recipe]:
    return [
        Recipe("seed baseline: fp32, untied, foreach AdamW"),
        Recipe("fp16 autocast", precision="fp16"),
        Recipe("bf16 autocast (instead of fp16)", precision="bf16"),
        Recipe("+ fused AdamW", precision="bf16", optimizer="fused"),
        Recipe("+ tied embeddings", precision="bf16", optimizer="fused", tie=True),
        Recipe(
            "+ gradient checkpointing",
            precision="bf16", optimizer="fused", tie=True, checkpointing=True,
        ),
        Recipe(
            "+ logits not kept (best recipe)",
            precision="bf16", optimizer="fused", tie=True, checkpointing=True, keep_logits=False,
        ),
    ]


def ablation(model_config: ModelConfig, micro_batch: int = 4, card_gib: float = 4.0) -> list[AblationRow]:
    """From the seed's baseline to the best recipe, one option at a time, at ``micro_batch``."""
    _check_card(card_gib)
    rows: list[AblationRow] = []
    for recipe in _ablation_recipes():
        r = recipe.measure(model_config, micro_batch)
        prev = rows[-1].report if rows else r
        rows.append(AblationRow(
            recipe.name, recipe, r, r.peak_bytes - prev.peak_bytes, r.total_bytes - prev.total_bytes,
        ))
    return rows


# --------------------------------------------------------------------------- tables


def _mib(n: int, digits: int = 0) -> str:
    return f"{n / MiB:,.{digits}f}"


def _signed_mib(n: int) -> str:
    return "0" if n == 0 else f"{n / MiB:+,.0f}"


_HEADERS = {
    "plan": {
        "en": ("Recipe", "Micro-batch", "Accumulation", "Effective batch", "Peak (MiB)", "Total (MiB)"),
        "az": ("Resept", "Mikro-batch", "Yığım addımları", "Effektiv batch", "Pik (MiB)", "Cəmi (MiB)"),
    },
    "ablation": {
        "en": ("Step", "Peak (MiB)", "Change (MiB)", "Change (%)", "Total (MiB)", "Fits {card} GiB"),
        "az": ("Addım", "Pik (MiB)", "Dəyişiklik (MiB)", "Dəyişiklik (%)", "Cəmi (MiB)", "{card} GiB-a sığır?"),
    },
}
_YES_NO = {"en": ("yes", "no"), "az": ("bəli", "xeyr")}


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> MarkdownTable:
    lines = ["| " + " | ".join(headers) + " |", "| :--- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return MarkdownTable("\n".join(lines))


def _check_lang(lang: str) -> None:
    if lang not in ("en", "az"):
        raise ValueError(f"lang={lang!r} is not allowed: lang must be 'en' or 'az'")


def plan_table(rows: Sequence[PlanRow], lang: str = "en") -> MarkdownTable:
    """The planner's rows as a Markdown table (``lang="az"``: Azerbaijani headers)."""
    _check_lang(lang)
    body = []
    for row in rows:
        if row.report is None:
            body.append([row.recipe.name, "0", "-", "-", "-", "-"])
            continue
        body.append([
            row.recipe.name, str(row.micro_batch), str(row.accumulation), str(row.effective_batch),
            _mib(row.report.peak_bytes), _mib(row.report.total_bytes),
        ])
    return _markdown(_HEADERS["plan"][lang], body)


def ablation_table(
    rows: Sequence[AblationRow], card_gib: float = 4.0, lang: str = "en"
) -> MarkdownTable:
    """The ablation's rows as a Markdown table (``lang="az"``: Azerbaijani headers)."""
    _check_lang(lang)
    yes, no = _YES_NO[lang]
    headers = [h.format(card=f"{card_gib:g}") for h in _HEADERS["ablation"][lang]]
    body = []
    for i, row in enumerate(rows):
        r = row.report
        before = r.peak_bytes - row.peak_change
        pct = "-" if i == 0 else f"{100 * row.peak_change / before:+.1f}"
        body.append([
            row.name, _mib(r.peak_bytes), "-" if i == 0 else _signed_mib(row.peak_change), pct,
            _mib(r.total_bytes), yes if r.fits(card_gib) else no,
        ])
    return _markdown(headers, body)


def format_report(report: MemoryReport, card_gib: float = 4.0) -> str:
    """A short text budget: the parts, the peak (phase and op), the overheads and the verdict."""
    r = report
    lines = [
        f"{r.num_parameters / 1e6:.1f}M parameters, micro-batch {r.micro_batch} x {r.seq_len} "
        f"tokens, precision={r.precision}, optimizer={r.optimizer}, tie={r.tie}, "
        f"checkpointing={r.checkpointing}, target={r.target}",
        f"  params           {_mib(r.params_bytes, 1):>10} MiB",
        f"  grads            {_mib(r.grads_bytes, 1):>10} MiB",
        f"  optimizer state  {_mib(r.optimizer_state_bytes, 1):>10} MiB",
        f"  activations      {_mib(r.activations_bytes, 1):>10} MiB  (kept by forward for backward)",
        f"  temporaries      {_mib(r.temporaries_bytes, 1):>10} MiB  (at the peak)",
        f"  peak             {_mib(r.peak_bytes, 1):>10} MiB  in {r.peak_phase}, at {r.peak_op}",
        "  live at the peak: " + ", ".join(f"{k} {_mib(v, 1)}" for k, v in r.at_peak.items() if v),
    ]
    for name, value in r.overheads.items():
        lines.append(f"  + {name:<15}{_mib(value, 1):>10} MiB")
    verdict = "fits" if r.fits(card_gib) else "does NOT fit"
    lines.append(f"  total            {_mib(r.total_bytes, 1):>10} MiB: {verdict} in {card_gib:g} GiB")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


_COLORS = {
    "params": "#4c72b0",
    "grads": "#55a868",
    "optimizer_state": "#c44e52",
    "activations": "#dd8452",
    "temporaries": "#8172b3",
    "cublas_workspace": "#937860",
    "allocator_cache": "#bbbbbb",
    "cuda_context": "#555555",
}


_PART_LABELS = {
    "en": {
        "params": "weights (fp32)", "grads": "gradients", "optimizer_state": "Adam state",
        "activations": "activations", "temporaries": "temporaries",
        "cublas_workspace": "cuBLAS workspace", "allocator_cache": "allocator cache",
        "cuda_context": "CUDA context",
    },
    "az": {
        "params": "çəkilər (fp32)", "grads": "qradiyentlər", "optimizer_state": "Adam vəziyyəti",
        "activations": "aktivasiyalar", "temporaries": "müvəqqəti tensorlar",
        "cublas_workspace": "cuBLAS iş sahəsi", "allocator_cache": "allocator keşi",
        "cuda_context": "CUDA konteksti",
    },
}


def plot_budget(
    reports: Sequence[MemoryReport],
    labels: Sequence[str] | None = None,
    card_gib: float = 4.0,
    lang: str = "en",
) -> Figure:
    """Stacked bars of what is live at each report's peak, then the overheads, and the card's line.

    Each bar's top is the report's ``total_bytes``. Returns the matplotlib Figure (matplotlib is
    imported here, not with the module); in a notebook end the cell with ``plt.show()``.
    """
    import matplotlib.pyplot as plt

    _check_card(card_gib)
    _check_lang(lang)
    if labels is None:
        labels = [f"{r.precision}, batch {r.micro_batch}" for r in reports]
    if len(labels) != len(reports):
        raise ValueError(
            f"labels has {len(labels)} entries for {len(reports)} reports: give one label per report"
        )
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = [{**r.at_peak, **r.overheads} for r in reports]
    parts = [p for p in _COLORS if any(v.get(p, 0) for v in values)]
    bottoms = [0.0] * len(reports)
    for part in parts:
        heights = [v.get(part, 0) / MiB for v in values]
        ax.bar(labels, heights, bottom=bottoms, width=0.55, color=_COLORS[part],
               label=_PART_LABELS[lang][part])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    card_mib = card_gib * GiB / MiB
    ax.axhline(card_mib, color="black", linestyle="--", linewidth=1)
    ax.text(-0.4, card_mib, f"{card_gib:g} GiB", va="bottom", ha="left")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(*bottoms, card_mib) * 1.1)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- real GPU


def real_cpu_peaks(
    model_config: ModelConfig,
    micro_batch: int,
    precision: str = "no",
    tie: bool | None = None,
    checkpointing: bool | None = None,
    optimizer: str = "foreach",
) -> dict[str, int]:
    """Run the same two steps for real on this CPU; the CPU allocator's peak in each phase of
    the 2nd step (bytes), from ``torch.profiler`` with ``profile_memory=True``.

    The reference that ``measure_step(..., target="cpu")`` is tested against. Real arithmetic:
    use a small model.
    """
    import torch._C._profiler as _prof
    from torch.profiler import ProfilerActivity, profile, record_function

    _check_options(micro_batch, precision, optimizer, "cpu")
    cfg = _with_options(model_config, tie, checkpointing)
    open_ranges: list[record_function] = []

    def on_phase(step: int, phase: str) -> None:
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)
        if step == 1:
            open_ranges.append(record_function(f"lowvram.measured:{phase}"))
            open_ranges[-1].__enter__()

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = GPTModel(cfg)
        opt = _make_optimizer(model, optimizer)
        batch = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.block_size + 1))
        _run_steps(
            model, opt, batch, precision=precision, device_type="cpu", cuda_loss=False,
            keep_logits=True, max_grad_norm=1.0, foreach_clip=False, on_phase=on_phase,
        )
    events: list[tuple[int, int, int]] = []  # (time, total allocated after it, its size)
    windows: dict[str, tuple[int, int]] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, _prof._ExtraFields_Allocation):
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name.startswith("lowvram.measured:"):
            windows[node.name.split(":")[1]] = (node.start_time_ns, node.end_time_ns)
        stack.extend(node.children)
    # The reporter's total is process-wide: storages from an earlier profiled run that died
    # after it stopped are still counted. What was live before is the first event's total
    # minus its own size.
    events.sort()
    before = events[0][1] - events[0][2]
    return {
        phase: max(total for t, total, _ in events if start <= t <= end) - before
        for phase, (start, end) in sorted(windows.items(), key=lambda kv: PHASES.index(kv[0]))
    }


def verify_gpu(
    model_config: ModelConfig,
    micro_batch: int,
    precision: str = "no",
    tie: bool | None = None,
    checkpointing: bool | None = None,
    optimizer: str = "foreach",
    *,
    keep_logits: bool = True,
) -> dict[str, int]:
    """Run the same two steps for real on CUDA; return the estimate next to the measurement.

    Keys: ``estimated_allocated``, ``max_memory_allocated``, ``estimated_reserved``,
    ``max_memory_reserved``, ``estimated_context``, ``measured_outside_allocator`` (the device's
    used memory minus what PyTorch reserved: the context and anything else on the card).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"--verify-gpu needs a CUDA GPU, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}): run it on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    _check_options(micro_batch, precision, optimizer, "cuda")
    device = torch.device("cuda")
    estimate = measure_step(
        model_config, micro_batch, precision, tie, checkpointing, optimizer, "cuda",
        keep_logits=keep_logits, cuda_capability=torch.cuda.get_device_capability(device),
    )
    cfg = estimate.model_config
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device)
    opt = _make_optimizer(model, optimizer)
    batch = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.block_size + 1), device=device)

    def on_phase(step: int, phase: str) -> None:
        if step == 1 and phase == "forward":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    _run_steps(
        model, opt, batch, precision=precision, device_type="cuda", cuda_loss=False,
        keep_logits=keep_logits, max_grad_norm=1.0, foreach_clip=True, on_phase=on_phase,
    )
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "estimated_allocated": estimate.peak_bytes,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device),
        "estimated_reserved": estimate.reserved_bytes,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        "estimated_context": CUDA_CONTEXT_BYTES,
        "measured_outside_allocator": total - free - torch.cuda.memory_reserved(device),
    }


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lowvram.memory",
        description="Measure the GPU memory of one training step (on CPU) and check it fits a card.",
    )
    p.add_argument("--preset", default="rtx2050", help="model preset from lowvram.config (default rtx2050)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default="no", help="autocast precision (default no = fp32)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    p.add_argument("--tie", action="store_true", help="tie the lm head to the token embedding")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="foreach", help="AdamW implementation (default foreach, CUDA's default)")
    p.add_argument("--target", choices=TARGETS, default="cuda", help="predict a CUDA GPU (default) or report the CPU allocator")
    p.add_argument("--card-gib", type=float, default=4.0, help="the card's memory in GiB (default 4)")
    p.add_argument("--plan", action="store_true", help="also print the planner's table")
    p.add_argument("--ablation", action="store_true", help="also print the ablation table")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--verify-gpu", action="store_true", help="run the real step on CUDA and print its peaks next to the estimate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model_cfg, train_cfg = get_preset(args.preset)
    except ValueError as err:
        parser.error(str(err))
    micro = args.micro_batch if args.micro_batch is not None else train_cfg.per_device_train_batch_size
    if micro < 1:
        parser.error(f"--micro-batch {micro} is not allowed: give a positive number of sequences")
    if not args.card_gib > 0:
        parser.error(f"--card-gib {args.card_gib:g} is not allowed: give the card's memory in GiB, e.g. 4")
    options = dict(
        precision=args.precision, tie=args.tie or None, checkpointing=args.checkpointing or None,
        optimizer=args.optimizer,
    )
    if args.verify_gpu:
        if not torch.cuda.is_available():
            print(
                f"error: --verify-gpu needs a CUDA GPU, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}): run it where an NVIDIA GPU and a CUDA build of "
                "torch are installed",
                file=sys.stderr,
            )
            return 2
        result = verify_gpu(model_cfg, micro, **options)  # type: ignore[arg-type]
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for what in ("allocated", "reserved"):
                est, real = result[f"estimated_{what}"], result[f"max_memory_{what}"]
                print(f"max_memory_{what}: estimated {_mib(est, 1)} MiB, measured {_mib(real, 1)} MiB "
                      f"({100 * (est - real) / real:+.1f}%)")
            print(f"outside the allocator: modelled {_mib(result['estimated_context'])} MiB, "
                  f"measured {_mib(result['measured_outside_allocator'])} MiB")
        return 0
    report = measure_step(model_cfg, micro, target=args.target, **options)  # type: ignore[arg-type]
    if args.json:
        out = report.to_dict()
        out["card_gib"] = args.card_gib
        out["fits"] = report.fits(args.card_gib)
        if args.plan:
            out["plan"] = [
                {"recipe": r.recipe.name, "micro_batch": r.micro_batch, "accumulation": r.accumulation,
                 "effective_batch": r.effective_batch,
                 "total_bytes": r.report.total_bytes if r.report else None}
                for r in plan(model_cfg, args.card_gib, train_cfg.effective_batch_size)
            ]
        if args.ablation:
            out["ablation"] = [
                {"step": r.name, "peak_bytes": r.report.peak_bytes, "total_bytes": r.report.total_bytes}
                for r in ablation(model_cfg, micro, args.card_gib)
            ]
        print(json.dumps(out, indent=2))
        return 0
    print(format_report(report, args.card_gib))
    if args.plan:
        print(f"\nLargest micro-batch per recipe on {args.card_gib:g} GiB "
              f"(effective batch {train_cfg.effective_batch_size}):")
        print(plan_table(plan(model_cfg, args.card_gib, train_cfg.effective_batch_size)))
    if args.ablation:
        print(f"\nAblation at micro-batch {micro}:")
        print(ablation_table(ablation(model_cfg, micro, args.card_gib), args.card_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
