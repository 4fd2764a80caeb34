"""How :mod:`lowvram.memory` turns a recorded step into its report: the :class:`Recording`
(every allocation, free and phase mark of a fake-tensor step, in order), its :func:`replay`
through the allocator simulation, and the exact replay of another micro-batch or another GPU
generation from the same recording (:func:`sizes_at`, :func:`with_workspace`).

Private: call ``lowvram.memory.measure_step``. Layer 3 of the package (``_allocator`` ->
``report`` -> ``replay`` -> ``_diskcache`` -> ``tracker`` -> ``depth`` -> ``measure`` -> ``plan``
-> ``show`` -> ``real`` -> ``cli``): pure bookkeeping over integers, no torch;
:mod:`lowvram.memory.tracker` records.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from lowvram.config import ModelConfig
from lowvram.memory._allocator import CachingAllocatorSim
from lowvram.memory.report import (
    ACTIVATION_PARTS,
    COMPONENTS,
    CUBLAS_WORKSPACE_BYTES,
    CUBLAS_WORKSPACE_HOPPER,
    CUDA_CONTEXT_BYTES,
    PHASES,
    MemoryReport,
    Recipe,
)

__all__ = [
    "Recording", "allocator_requests", "at_micro_batch", "replay", "sizes_at", "with_workspace",
    "workspace_bytes",
]


@dataclass(frozen=True, eq=False)
class Recording:
    """One fake-tensor run of the step (:func:`record_fake`): every allocation, free and phase
    mark in order (``events``), each allocation's bytes (``sizes``), and which serials are the
    parameters, the gradients, the optimizer state, the cuBLAS workspaces and the activations
    the last forward kept. :func:`replay` turns it into the :class:`MemoryReport`; with other
    ``sizes`` (:func:`at_micro_batch`) into the report of another micro-batch."""

    cfg: ModelConfig
    micro_batch: int
    recipe: Recipe
    target: str
    accumulation: int
    num_parameters: int
    events: tuple[tuple[Any, ...], ...]
    sizes: tuple[int, ...]
    params: frozenset[int]
    grads: frozenset[int]
    state: frozenset[int]
    workspaces: frozenset[int]
    activations: frozenset[int]

    def same_structure(self, other: Recording) -> bool:
        """The same ops, frees, phases and classes in the same order (only sizes may differ)."""
        return (self.events == other.events and self.params == other.params
                and self.grads == other.grads and self.state == other.state
                and self.workspaces == other.workspaces and self.activations == other.activations
                and self.num_parameters == other.num_parameters)  # fmt: skip


def replay(recording: Recording, sizes: tuple[int, ...] | None = None,
           micro_batch: int | None = None) -> MemoryReport:
    """The report of a recorded step, its allocations charged ``sizes`` bytes (default: the
    recorded ones) through a fresh allocator simulation (CUDA) or as they are (CPU). The same
    bookkeeping as :class:`StorageTracker`, done afterwards: tens of milliseconds."""
    cuda = recording.target == "cuda"
    sizes = recording.sizes if sizes is None else sizes
    allocator = CachingAllocatorSim() if cuda else None
    events = recording.events
    charged: dict[int, int] = {}
    origin: dict[int, str] = {}
    regions: dict[int, str] = {}
    current = peak = reserved_peak = 0
    peak_index, peak_phase, peak_op = -1, "", ""
    phase, name, window = "setup", "setup", False
    phase_peaks: dict[str, int] = {}
    k = 0
    for i, event in enumerate(events):
        kind = event[0]
        if kind == "a":
            serial = event[1]
            nbytes = sizes[k]
            k += 1
            c = allocator.malloc(serial, nbytes) if allocator is not None else nbytes
            charged[serial] = c
            origin[serial] = phase
            regions[serial] = event[3]
            current += c
            if window:
                if current > peak:
                    peak, peak_index, peak_phase, peak_op = current, i, name, event[2]
                if current > phase_peaks.get(name, 0):
                    phase_peaks[name] = current
                if allocator is not None and allocator.reserved > reserved_peak:
                    reserved_peak = allocator.reserved
        elif kind == "f":
            serial = event[1]
            current -= charged[serial]
            if allocator is not None:
                allocator.free(serial)
        elif kind == "p":
            phase = event[1]
            name = phase.split(":")[0]
            if window:
                phase_peaks[name] = max(phase_peaks.get(name, 0), current)
        else:  # "w": the measured step starts
            window = True
            peak, peak_index, peak_phase, peak_op = current, i, "forward", "(start of step)"
            if allocator is not None:
                reserved_peak = allocator.reserved

    live: dict[int, int] = {}
    for event in events[: peak_index + 1]:
        if event[0] == "a":
            if charged[event[1]]:
                live[event[1]] = charged[event[1]]
        elif event[0] == "f":
            live.pop(event[1], None)
    at_peak = dict.fromkeys(COMPONENTS, 0)
    for serial, c in live.items():
        if serial in recording.params:
            part = "params"
        elif serial in recording.state:
            part = "optimizer_state"
        elif serial in recording.grads:
            part = "grads"
        elif serial in recording.workspaces:
            part = "cublas_workspace"
        elif origin[serial].startswith(("forward", "setup")):
            part = "activations"  # both forwards' outputs, and the batch
        else:
            part = "temporaries"
        at_peak[part] += c
    if not cuda:
        del at_peak["cublas_workspace"]
    assert sum(at_peak.values()) == peak
    activations = dict.fromkeys(ACTIVATION_PARTS, 0)
    for serial in recording.activations:
        activations[regions[serial]] += charged[serial]
    reserved = reserved_peak if cuda else peak
    overheads = {"allocator_cache": reserved - peak, "cuda_context": CUDA_CONTEXT_BYTES}
    cfg = recording.cfg
    return MemoryReport(
        model_config=cfg,
        recipe=recording.recipe,
        micro_batch=recording.micro_batch if micro_batch is None else micro_batch,
        gradient_accumulation_steps=recording.accumulation,
        seq_len=cfg.block_size,
        target=recording.target,
        num_parameters=recording.num_parameters,
        params_bytes=sum(charged[s] for s in recording.params),
        grads_bytes=sum(charged[s] for s in recording.grads),
        optimizer_state_bytes=sum(charged[s] for s in recording.state),
        activations_bytes=sum(activations.values()),
        activations_detail=MappingProxyType(activations),
        temporaries_bytes=at_peak["temporaries"],
        peak_bytes=peak,
        peak_phase=peak_phase,
        peak_op=peak_op,
        at_peak=MappingProxyType(at_peak),
        phase_peaks=MappingProxyType({p: phase_peaks.get(p, 0) for p in PHASES}),
        reserved_bytes=reserved,
        overheads=MappingProxyType(overheads if cuda else {}),
        allocator_requests=(lambda: allocator_requests(events, sizes)) if cuda else None,
    )


def allocator_requests(events: tuple[tuple[Any, ...], ...],
                       sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """A recording's allocator requests as ``CachingAllocatorSim(record=True)`` keeps them:
    ``(serial, bytes)`` per allocation, ``(serial, -1)`` per free (for ``smallest_capacity``)."""
    out: list[tuple[int, int]] = []
    k = 0
    for event in events:
        if event[0] == "a":
            out.append((event[1], sizes[k]))
            k += 1
        elif event[0] == "f":
            out.append((event[1], -1))
    return out


def sizes_at(first: Recording, second: Recording, micro_batch: int) -> tuple[int, ...] | None:
    """Every allocation's bytes at ``micro_batch``, from two recordings of the same step at two
    other micro-batches, or None where that is not exact.

    Exact when both runs did the same ops in the same order and every allocation's bytes are
    ``a + b * micro_batch`` (weights, gradients and optimizer state: b = 0; activations: a = 0):
    each size at ``micro_batch`` then follows from the two, and :func:`replay` redoes the
    bookkeeping and the allocator simulation with them. Not with a chunked loss (its number of
    chunks, so its ops, grows with the micro-batch, and the last chunk's size is not linear),
    nor below the two micro-batches (a batch of 1 takes other paths): there it returns None.
    ``tests/test_memory_golden.py`` holds the result against direct measurements.
    """
    m1, m2 = first.micro_batch, second.micro_batch
    if first.cfg.loss_chunk_size or micro_batch < min(m1, m2) or m1 == m2:
        return None  # chunks: their count and sizes; a batch of 1: views that need no copy
    if not first.same_structure(second):
        return None
    sizes = []
    for s1, s2 in zip(first.sizes, second.sizes, strict=True):
        slope, rest = divmod(s2 - s1, m2 - m1)
        size = s1 + slope * (micro_batch - m1)
        if rest or size < 0:
            return None
        sizes.append(size)
    return tuple(sizes)


def at_micro_batch(first: Recording, second: Recording, micro_batch: int) -> MemoryReport | None:
    """The report at ``micro_batch`` from two recordings (:func:`sizes_at`), or None."""
    sizes = sizes_at(first, second, micro_batch)
    return None if sizes is None else replay(first, sizes, micro_batch)


def workspace_bytes(cuda_capability: tuple[int, int]) -> int:
    """cuBLAS's workspace on a GPU of this compute capability (32 MiB on Hopper)."""
    return CUBLAS_WORKSPACE_HOPPER if cuda_capability[0] == 9 else CUBLAS_WORKSPACE_BYTES


def with_workspace(recording: Recording, sizes: tuple[int, ...], nbytes: int) -> tuple[int, ...]:
    """``sizes`` with the cuBLAS workspaces' allocations made ``nbytes`` each: the step of
    another GPU generation (only that allocation's size depends on it)."""
    if not recording.workspaces:
        return sizes
    out = list(sizes)
    k = 0
    for event in recording.events:
        if event[0] == "a":
            if event[1] in recording.workspaces:
                out[k] = nbytes
            k += 1
    return tuple(out)
