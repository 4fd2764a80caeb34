"""A model of PyTorch's CUDA caching allocator, for predicting a GPU's memory on a CPU.

Private to :mod:`lowvram.memory`, whose tracker charges every new storage through
:class:`CachingAllocatorSim` when it predicts a CUDA card (``target="cuda"``).

Checked rule by rule against ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x, default
``PYTORCH_CUDA_ALLOC_CONF``), and against the real allocator: :func:`replay` runs an allocation
trace recorded on a GPU (``torch.cuda.memory._record_memory_history``) through the simulation.
On traces of the real ``train()`` on an H200 (rtx2050 model, 4 optimizer steps) the simulation's
reserved peak equals the GPU's to within one 2 MiB small segment when new segments get the
addresses the driver gave them (``tests/data/alloc_trace_*``). What it cannot know is those
addresses: the driver's ``cudaMalloc`` hands out virtual addresses in its own order, and the
allocator breaks best-fit ties between equal-sized free blocks by address. The simulation gives
each new segment the next higher address (an assumption: in those traces, recorded in a process
that had returned segments before, the driver's order was not ascending); on the chunked-loss
trace that alone moves the reserved peak by +2.8% (one 94 MiB segment more).

The uncapped reserved peak (``torch.cuda.max_memory_reserved()`` on a big GPU) overstates what a
card must hold: under a cap the allocator returns wholly free cached segments before it fails.
:func:`smallest_capacity` finds the smallest cap a simulated sequence fits under.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["CachingAllocatorSim", "OutOfMemory", "replay", "smallest_capacity", "trace_reserved_peak"]

MiB = 2**20


class OutOfMemory(Exception):
    """A request that would pass the simulated card's ``capacity``."""


class _Block:
    __slots__ = ("addr", "size", "small", "allocated", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class CachingAllocatorSim:
    """PyTorch's native CUDA caching allocator with its default settings, one stream.

    The rules, each with the function of ``c10/cuda/CUDACachingAllocator.cpp`` it follows:

    - ``round_size``: a request is rounded up to a multiple of 512 B (``kMinBlockSize``);
      ``roundup_power2_divisions`` is off by default. A request of 0 bytes gets no block.
    - ``get_pool``: requests <= 1 MiB (``kSmallSize``) use the small pool, larger ones the large
      pool; a free block is reused only from its own pool (and stream: one here).
    - ``get_allocation_size``: a new segment is 2 MiB (``kSmallBuffer``) for the small pool,
      20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), otherwise the
      request rounded up to 2 MiB (``kRoundLarge``).
    - ``get_free_block``: best fit, the smallest cached free block that is large enough; the
      pool is ordered by (stream, size, address) (``BlockComparatorSize``), so ties go to the
      lowest address. No oversize rules: ``max_split_size`` is unlimited by default.
    - ``should_split`` / ``alloc_found_block``: the request takes the front of the block; the
      rest becomes a free block when it is >= 512 B (small pool) or > 1 MiB (large pool),
      otherwise the whole block is allocated (and counted in ``allocated``).
    - ``free_block`` / ``try_merge_blocks``: a freed block merges with its free neighbours in
      its segment. Freed on the stream it was allocated on (no ``record_stream`` in
      ``train()``; autograd's backward runs on the forward's stream), it is reusable at once.
    - ``alloc_block`` / ``release_cached_blocks``: with ``capacity`` (what
      ``set_per_process_memory_fraction`` caps), a segment that would pass it first releases
      every wholly free segment, then retries, then raises :class:`OutOfMemory`.
      (``release_available_cached_blocks`` does nothing while ``max_split_size`` is unlimited.)
      Without ``capacity`` segments are never returned, so ``reserved`` only grows.

    Not modelled: expandable segments, ``max_split_size``/garbage collection settings, several
    streams, CUDA graphs. A new segment's address is the next higher one (the driver's own
    order is unknowable here), unless :meth:`malloc` is given it.
    """

    def __init__(self, capacity: int | None = None, record: bool = False) -> None:
        self.capacity = capacity
        # with record: every request, (key, nbytes) for a malloc and (key, -1) for a free, for
        # smallest_capacity()
        self.requests: list[tuple[int, int]] | None = [] if record else None
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

    def release_segment(self, addr: int) -> bool:
        """Return the segment at ``addr`` to the driver if it is wholly free (``release_block``,
        as ``torch.cuda.empty_cache()`` does); False if there is none such."""
        block = self.free_blocks.get(addr)
        if block is None or block.prev is not None or block.next is not None:
            return False
        self._remove(block)
        self.reserved -= block.size
        return True

    def malloc(self, key: int, nbytes: int, segment_addr: int | None = None) -> int:
        """Allocate ``nbytes`` for ``key``; return the bytes charged to ``allocated``.

        ``segment_addr``: the address a new segment gets if this request needs one (a replayed
        trace's ``cudaMalloc`` address); by default the next address above every segment.
        """
        if self.requests is not None:
            self.requests.append((key, nbytes))
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
                    raise OutOfMemory
            addr = self.next_addr if segment_addr is None else segment_addr
            block = _Block(addr, seg, small)
            self.next_addr = max(self.next_addr, addr + seg)
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
        if self.requests is not None:
            self.requests.append((key, -1))
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



def replay(events: Iterable[tuple[str, int, int]], trace_addresses: bool = False) -> int:
    """The simulated peak reserved bytes of an allocation trace recorded on a GPU.

    ``events``: ``(action, address, size)`` in order, as ``torch.cuda.memory._snapshot()``'s
    ``device_traces`` entries give them after ``torch.cuda.memory._record_memory_history()``:
    each ``"alloc"`` (size: the bytes requested) is simulated, each ``"free_completed"`` frees
    the block at that address. With ``trace_addresses`` a new segment gets the address of the
    real allocator's ``"segment_alloc"`` just before (if it made one), and a ``"segment_free"``
    (``empty_cache``) releases the simulated segment at that address; otherwise both are
    ignored. Other actions are ignored.
    Blocks allocated before the trace began are unknown: their frees are ignored.
    """
    sim = CachingAllocatorSim()
    if trace_addresses:
        sim.next_addr = 1 << 62  # segments the GPU did not make: far from every real address
    peak = 0
    new_segment: int | None = None
    for action, addr, size in events:
        if action == "alloc":
            sim.malloc(addr, size, new_segment if trace_addresses else None)
            new_segment = None
            peak = max(peak, sim.reserved)
        elif action == "free_completed":
            sim.free(addr)
        elif action == "segment_alloc":
            new_segment = addr  # the real allocator's new segment for the next "alloc"
        elif action == "segment_free" and trace_addresses:
            sim.release_segment(addr)
    return peak


def trace_reserved_peak(events: Iterable[tuple[str, int, int]]) -> int:
    """The real allocator's peak reserved bytes during a trace (its segment allocs and frees):
    the segments made within the trace, like :func:`replay`'s (a segment made before the trace
    began and freed in it is not counted)."""
    segments: dict[int, int] = {}
    reserved = peak = 0
    for action, addr, size in events:
        if action == "segment_alloc":
            segments[addr] = size
            reserved += size
            peak = max(peak, reserved)
        elif action == "segment_free" and segments.pop(addr, None) is not None:
            reserved -= size
    return peak


def _fits(requests: list[tuple[int, int]], capacity: int) -> bool:
    sim = CachingAllocatorSim(capacity)
    try:
        for key, nbytes in requests:
            if nbytes < 0:
                sim.free(key)
            else:
                sim.malloc(key, nbytes)
    except OutOfMemory:
        return False
    return True


def smallest_capacity(requests: list[tuple[int, int]], resolution: int = 2 * MiB) -> int:
    """The smallest cap on reserved memory under which ``requests`` (a recording simulation's
    ``requests``) raise no :class:`OutOfMemory`, to within ``resolution`` (rounded up).

    This, not the uncapped reserved peak, is what a card must hold: under a cap the allocator
    returns its wholly free cached segments before it fails (``release_cached_blocks``), so a
    run whose uncapped cache grows past the card can still fit. On the H200 traces of the real
    ``train()`` the two differ by up to 14% (the chunked loss: its final evaluation's logits
    need new segments when the cache is fragmented, or reuse released ones under a cap).
    Found by bisection, which assumes that a larger cap never fails where a smaller one fits.
    """
    sim = CachingAllocatorSim()
    allocated = 0
    for key, nbytes in requests:
        if nbytes < 0:
            sim.free(key)
        else:
            sim.malloc(key, nbytes)
            allocated = max(allocated, sim.allocated)
    high = -(-max(sim.reserved, 1) // resolution) * resolution  # fits: nothing is ever released
    # fails: below the peak of the allocated blocks (or 0: nothing is allocated)
    low = max(0, -(-allocated // resolution) * resolution - resolution)
    while high - low > resolution:
        mid = (low + high) // 2 // resolution * resolution
        if mid <= low:
            break
        if _fits(requests, mid):
            high = mid
        else:
            low = mid
    return high
