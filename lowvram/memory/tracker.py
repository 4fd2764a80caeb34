"""How :mod:`lowvram.memory` measures a step: a storage tracker over fake tensors, the loop
body of ``train()`` that it watches, and the stand-in for an 8-bit optimizer's state.

Private: call ``lowvram.memory.measure_step``. Layer 5 of the package (``_allocator`` ->
``report`` -> ``replay`` -> ``_diskcache`` -> ``tracker`` -> ``depth`` -> ``measure`` -> ``plan``
-> ``show`` -> ``real`` -> ``cli``); :mod:`lowvram.memory.replay` turns its recordings into
reports, and :mod:`lowvram.memory._diskcache` keeps them between processes. The model,
optimizer and batch are fake tensors on the ``cpu`` device (``FakeTensorMode``: shapes and
dtypes, no data, no arithmetic), and a
``TorchDispatchMode`` sees every ATen op of the step: it records each new untyped storage and,
through a weakref finalizer, the moment it dies.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowvram.config import ModelConfig, TrainConfig
from lowvram.memory._allocator import CachingAllocatorSim
from lowvram.memory._diskcache import load as _load_stored
from lowvram.memory._diskcache import store as _store
from lowvram.memory.replay import Recording, replay, workspace_bytes
from lowvram.memory.report import Recipe
from lowvram.model import GPTModel, chunked_cross_entropy

__all__ = [
    "StorageTracker", "make_optimizer", "record_fake", "run_steps",
]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

def _metadata_queries() -> dict[Any, Callable[..., Any]]:
    """FakeTensorMode's own handlers of the ops that only read a fake tensor's metadata
    (``prim.device``, ``aten.size``, ...): no allocation, nothing to track. Private in torch:
    where it is missing, those ops dispatch as any other (the same answers, slower)."""
    try:
        from torch._subclasses.fake_tensor import _DISPATCH_META_HANDLERS
    except ImportError:  # pragma: no cover - another torch version
        return {}
    return dict(_DISPATCH_META_HANDLERS)


_METADATA_QUERIES = _metadata_queries()
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul"}


class StorageTracker(TorchDispatchMode):
    """Records every untyped storage that an op creates and, by a weakref finalizer, its death.

    ``live`` maps the storage's address to ``(serial, charged bytes, nbytes)``; ``log`` keeps the
    sequence of ``(serial, bytes)`` allocations and ``(serial, 0)`` frees so that the live set at
    the peak can be replayed afterwards. With an allocator simulation the charged bytes are the
    allocator's block sizes, otherwise the storage's ``nbytes()``.
    """

    def __init__(
        self,
        allocator: CachingAllocatorSim | None,
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
        self.backward_workspace_serial: int | None = None  # the autograd thread's own
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
        # what happened, in order, for replaying it with other sizes (:class:`Recording`):
        # ("a", serial, op, region) allocations (their nbytes in `sizes`), ("f", serial) frees,
        # ("p", tag) phase marks, ("w",) the window's opening
        self.events: list[tuple[Any, ...]] = []
        self.sizes: list[int] = []

    # allocation bookkeeping
    def _alloc(self, nbytes: int, op: str) -> int:
        self.serial += 1
        serial = self.serial
        charged = self.allocator.malloc(serial, nbytes) if self.allocator else nbytes
        self.events.append(("a", serial, op, self.region))
        self.sizes.append(nbytes)
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
        self.events.append(("f", serial))
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
        self.events.append(("p", tag))
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
        self.events.append(("w",))
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
        handler = _METADATA_QUERIES.get(func)
        if handler is not None:
            # a query of a fake tensor's metadata (its device: ~60 % of the step's dispatches):
            # answered as FakeTensorMode answers it, without dispatching through it again
            return handler(args)
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
        if self.cublas_workspace and name in _MATMULS:
            # cuBLAS keeps one workspace per (handle, stream), and each thread has its own handle:
            # the autograd engine runs backward in its own device thread, so its first matmul
            # allocates a second workspace (measured on an H200: train() sat ~37 MiB above the
            # prediction without it, with a 32 MiB workspace)
            if self.workspace_serial is None:
                self.workspace_serial = self._alloc(self.cublas_workspace, name)
            elif self.backward_workspace_serial is None and self.phase.startswith("backward"):
                self.backward_workspace_serial = self._alloc(self.cublas_workspace, name)
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


def cross_entropy_like_cuda(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy`` as CUDA autocast runs it on 16-bit logits.

    ``cross_entropy`` calls ``log_softmax(x, dtype=x.dtype)``, which autocast leaves in 16 bits,
    then ``nll_loss``, which is on CUDA autocast's fp32 list: its input is cast to fp32 and that
    copy is saved for backward. CPU autocast casts the logits to fp32 before ``log_softmax``.
    """
    logits = logits.view(-1, logits.size(-1))
    with torch.autocast("cpu", enabled=False):
        log_probs = torch.log_softmax(logits, dim=1)  # 16 bits, saved by log_softmax's backward
        # fp32 copy, saved by nll_loss
        return F.nll_loss(log_probs.float(), targets.reshape(-1), reduction=reduction)


class Adam8bitLayout(torch.optim.Optimizer):
    """The state of bitsandbytes' ``AdamW8bit``, allocated as that library lays it out, updated
    in place (its CUDA kernel needs no temporaries). For measuring only: it does not train.

    After ``bitsandbytes/optim/optimizer.py`` (``Optimizer2State.init_state``, 0.50): a
    parameter of at least ``min_8bit_size`` (4096) elements gets two uint8 states of its shape
    and two fp32 ``absmax`` vectors, one value per block of 256; smaller ones two fp32 states;
    the two 256-entry quantisation maps are shared by all parameters; the step count is a Python
    int. ``tests/test_optim.py`` checks these bytes against the real optimizer.
    """

    MIN_8BIT_SIZE = 4096
    BLOCKSIZE = 256

    def __init__(self, params: Any, lr: float = 3e-4) -> None:
        super().__init__(params, {"lr": lr})
        self.qmaps: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if p.numel() < self.MIN_8BIT_SIZE:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        if not self.qmaps:
                            self.qmaps = [torch.zeros(256, device=p.device) for _ in range(2)]
                        blocks = math.ceil(p.numel() / self.BLOCKSIZE)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["qmap1"], state["qmap2"] = self.qmaps
                        state["absmax1"] = torch.zeros(blocks, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])  # in place, as the fused kernel writes p


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw8bit":
        return Adam8bitLayout(model.parameters(), lr=3e-4)
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(model.parameters(), lr=3e-4, **impl[recipe.adamw_impl])


def run_steps(
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
    on_phase: Callable[[int, str, int], None],
    steps: int = 2,
    accumulation: int = 1,
    as_train: bool = True,
    shortcut: bool = False,
) -> None:
    """The loop body of ``lowvram.train.train()``, ``steps`` optimizer steps of ``accumulation``
    micro-batches each; ``on_phase(step, phase, micro)`` marks each phase's start (and
    ``(steps, "end", 0)`` the end). ``cuda_loss``: compute the loss as CUDA autocast does.

    What a step is, as ``train()`` runs it under accelerate (``as_train=True``):

    - each micro-batch: ``logits, loss = model(X, Y)`` (the previous micro-batch's pair stays
      alive until this forward returns: they are loop variables); under autocast accelerate's
      ``convert_outputs_to_fp32`` returns an fp32 copy of the 16-bit logits;
      ``accelerator.backward(loss)`` divides the loss by the accumulation and, for fp16,
      multiplies it by the GradScaler's scale. From the 2nd micro-batch on, backward runs with
      the accumulated ``.grad`` of every parameter alive, and adds into it;
    - once the gradients are complete: fp16's ``GradScaler.unscale_`` (an in-place inf check and
      unscale, a few scalars), gradient clipping (``foreach``), the optimizer step, the scaler's
      ``update`` and ``zero_grad(set_to_none=True)``.

    ``as_train=False`` is the plain loop of the lesson's notebooks (no fp32 copy, no scaler).

    ``shortcut=True`` (what ``measure.measure_fake`` runs, with ``steps=2``): for accumulation >= 2 the
    1st step runs only its 1st micro-batch and keeps its gradients (no ``zero_grad``), and the
    2nd step only its last micro-batch, which so starts as every later micro-batch of a real
    step does: the gradients and the previous ``logits, loss`` alive, the AdamW state made.
    Its peaks are the full loop's (a 1st micro-batch has less alive than a later one), at 2
    forward/backward passes instead of ``2 * accumulation``.
    """
    X, Y = batch[:, :-1], batch[:, 1:]  # as the lesson splits a (B, block_size + 1) batch
    autocast = torch.autocast(device_type, dtype=_DTYPES[precision], enabled=precision != "no")
    chunk = model.config.loss_chunk_size
    scaler = torch.amp.GradScaler(device_type) if as_train and precision == "fp16" else None
    logits = loss = None  # train() keeps both until the next forward returns
    short = shortcut and accumulation > 1
    for step in range(steps):
        micros = range(accumulation) if not short else [0] if step == 0 else [accumulation - 1]
        for micro in micros:
            on_phase(step, "forward", micro)
            with autocast:
                if cuda_loss and chunk:
                    # the model's own chunked loss, each chunk's loss computed the CUDA way
                    new_logits, new_loss = None, chunked_cross_entropy(
                        model.hidden(X).flatten(0, 1), model.lm_head.weight, Y.reshape(-1), chunk,
                        cross_entropy_like_cuda,
                    )
                elif cuda_loss:
                    new_logits, _ = model(X)
                    new_loss = cross_entropy_like_cuda(new_logits, Y)
                else:
                    new_logits, new_loss = model(X, Y)
            if as_train and new_logits is not None and new_logits.dtype != torch.float32:
                new_logits = new_logits.float()  # accelerate's convert_outputs_to_fp32
            logits, loss = new_logits, new_loss
            del new_logits, new_loss
            if not keep_logits:
                logits = None  # `loss = model(X, Y)[1]`: the logits die with the forward
            on_phase(step, "backward", micro)
            scaled = loss / accumulation if as_train else loss  # accelerator.backward
            if scaler is not None:
                scaled = scaler.scale(scaled)
            scaled.backward()
            del scaled
        on_phase(step, "optimizer", micros[-1])
        if scaler is not None:
            scaler.unscale_(optimizer)  # accelerator.clip_grad_norm_ unscales first
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=foreach_clip)
        optimizer.step()  # GradScaler.step skips this only on an inf (not measured)
        if scaler is not None:
            scaler.update()
        if not (short and step == 0):  # the shortcut keeps them: the 2nd step's micro-batch
            optimizer.zero_grad(set_to_none=True)  # is then a later one
    on_phase(steps, "end", 0)
    del logits, loss


def _mark_regions(model: GPTModel, tracker: StorageTracker) -> None:
    """Forward pre-hooks that tell the tracker which part of the model is running."""

    def enter(region: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            tracker.region = region

        return hook

    model.register_forward_pre_hook(enter("embeddings"))
    model.wte.register_forward_pre_hook(enter("embeddings"))  # for model.hidden(X) too
    if len(model.blocks):
        model.blocks[0].register_forward_pre_hook(enter("blocks"))
    model.ln_f.register_forward_pre_hook(enter("head_and_loss"))


# train()'s per_device_eval_batch_size: TrainConfig's default (every preset keeps it)
EVAL_BATCH = TrainConfig().per_device_eval_batch_size


def evaluate_once(model: GPTModel, eval_batch: int, *, precision: str) -> None:
    """One batch of ``lowvram.train._evaluate``, as ``train()`` runs it before step 1: under
    ``torch.no_grad()``, ``logits, _ = model(X)`` in autocast (full logits even with a chunked
    loss: no targets), converted to fp32 (accelerate's ``convert_outputs_to_fp32``), then the
    per-sequence loss in fp32 outside autocast. Every later batch repeats its allocations."""
    cfg = model.config
    rows = torch.randint(0, cfg.vocab_size, (eval_batch, cfg.block_size + 1))
    X, Y = rows[:, :-1], rows[:, 1:]
    autocast = torch.autocast("cpu", dtype=_DTYPES[precision], enabled=precision != "no")
    model.eval()
    with torch.no_grad():
        with autocast:
            logits, _ = model(X)
        if logits.dtype != torch.float32:
            logits = logits.float()
        # (B, vocab, T): CUDA's log_softmax works on a contiguous copy of a non-contiguous
        # input (SoftMax.cu's host_softmax), which fake tensors do not make: made here (the
        # H200 trace shows three vocab-sized fp32 blocks: logits, log-probs and this copy)
        per_seq = F.cross_entropy(logits.transpose(1, 2).contiguous(), Y,
                                  reduction="none").mean(dim=1)
        del logits, per_seq
    model.train()
    del rows, X, Y


@lru_cache(maxsize=256)
def record_fake(
    cfg: ModelConfig,
    micro_batch: int,
    recipe: Recipe,
    target: str,
    max_grad_norm: float | None,
    cuda_capability: tuple[int, int],
    accumulation: int = 1,
    shortcut: bool = True,
    evaluation: bool = True,
    eval_batch: int = EVAL_BATCH,
) -> Recording:
    """Two optimizer steps of ``GPTModel(cfg)`` on fake tensors, ``accumulation`` micro-batches
    each, recorded (memoised: the expensive part, about a second per 100M parameters). The 2nd
    step is the measured one. Its peak is the same for any accumulation >= 2 (the 3rd
    micro-batch repeats the 2nd's state), so callers pass ``min(accumulation, 2)``.

    ``evaluation``: first the evaluation ``train()`` runs before step 1 (:func:`evaluate_once`
    on ``eval_batch`` rows), whose freed blocks stay cached when the steps begin, as on the
    GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (cfg, micro_batch, recipe, target, max_grad_norm, cuda_capability, accumulation, shortcut)
    _recorded.add(key)
    # plan()'s workers record with the default evaluation only (and plan() clears the rest)
    shipped = _shipped.pop(key, None) if evaluation and eval_batch == EVAL_BATCH else None
    if shipped is not None:
        return shipped  # recorded by one of plan()'s worker processes: the same code, the same run
    args = (*key, evaluation, eval_batch)  # all of this call's arguments: the disk cache's key
    stored = _load_stored(args)
    if stored is not None:
        return stored  # recorded on this machine before, by this code and this torch
    cuda = target == "cuda"
    workspace = 0
    if cuda:
        workspace = workspace_bytes(cuda_capability)
    tracker = StorageTracker(CachingAllocatorSim() if cuda else None, workspace, host_constants=cuda)
    seen: dict[str, Any] = {}

    last = accumulation - 1

    def on_phase(step: int, phase: str, micro: int) -> None:
        if step == 1 and phase == "forward" and not tracker.window_open:
            tracker.open_window()  # the step's peak starts here: once, at its first micro-batch
        if (step, phase, micro) == (1, "backward", last):  # end of the step's last forward
            seen["activations"] = frozenset(
                serial for serial, _, _ in tracker.live.values()
                if tracker.origin.get(serial) == f"forward:1:{last}"
            )  # fmt: skip
        if step == 1 and phase == "optimizer":  # gradients complete, not yet freed
            seen["grads"] = tracker.tracked(p.grad for p in model.parameters() if p.grad is not None)
        if step == 2:
            state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            seen["state"] = tracker.tracked(iter(state))
        tracker.set_phase(f"{phase}:{step}:{micro}")

    with FakeTensorMode():
        model = GPTModel(cfg)  # untracked: this is the model on the host
        with tracker:
            # what accelerate.prepare's model.to("cuda") does: one new storage per parameter
            for p in model.parameters():
                p.data = p.data.clone()
            params = tracker.tracked(model.parameters())
            tracker.param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
            _mark_regions(model, tracker)
            opt = make_optimizer(model, recipe)
            if evaluation and cuda:  # its blocks are all freed: only a cache can keep them
                tracker.set_phase("evaluate:0:0")
                evaluate_once(model, eval_batch, precision=recipe.precision)
            batch = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.block_size + 1))
            run_steps(
                model, opt, batch,
                precision=recipe.precision, device_type="cpu",
                cuda_loss=cuda and recipe.precision != "no", keep_logits=recipe.keep_logits,
                max_grad_norm=max_grad_norm, foreach_clip=True, on_phase=on_phase,
                accumulation=accumulation, shortcut=shortcut,
            )

    workspaces = frozenset(s for s in (tracker.workspace_serial, tracker.backward_workspace_serial)
                           if s is not None)  # fmt: skip
    recording = Recording(
        cfg, micro_batch, recipe, target, accumulation,
        num_parameters=sum(p.numel() for p in model.parameters()),
        events=_in_order(tracker.events), sizes=tuple(tracker.sizes),
        params=frozenset(params), grads=frozenset(seen["grads"]), state=frozenset(seen["state"]),
        workspaces=workspaces, activations=seen["activations"],
    )
    report = replay(recording)
    # the replay is the tracker's own bookkeeping done again: they must agree
    assert (report.peak_bytes, report.reserved_bytes if cuda else report.peak_bytes) == (
        tracker.peak, tracker.reserved_peak if cuda else tracker.peak)
    _store(args, recording)
    return recording


_clear_memo = record_fake.cache_clear


def _cache_clear() -> None:
    """``record_fake.cache_clear``: its memo and :data:`_recorded`, the keys ``measure.measure_fake`` reads."""
    _clear_memo()
    _recorded.clear()


record_fake.cache_clear = _cache_clear  # type: ignore[method-assign]


def _in_order(events: list[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    """``events`` with each run of consecutive frees sorted by serial. Weakref finalizers fire
    in an order that varies from run to run (the garbage collector's timing), but nothing
    observes the state between two frees: the peak moves only on an allocation, and the
    simulated allocator's free blocks after a run of frees are the same in any order (neighbours
    merge either way). Sorted, two runs of the same step have the same events."""
    out: list[tuple[Any, ...]] = []
    run: list[tuple[Any, ...]] = []
    for event in events:
        if event[0] == "f":
            run.append(event)
            continue
        out += sorted(run)
        run.clear()
        out.append(event)
    return tuple(out + sorted(run))


_recorded: set[tuple[Any, ...]] = set()  # record_fake's keys (its memo's, as cache_clear empties both)
# recordings made in plan()'s worker processes (plan._record_in_workers), by record_fake's
# arguments: record_fake's memo takes each over at its first call
_shipped: dict[tuple[Any, ...], Recording] = {}
