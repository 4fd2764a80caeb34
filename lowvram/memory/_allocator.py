"""A model of PyTorch's CUDA caching allocator, for predicting a GPU's memory on a CPU.

Private to :mod:`lowvram.memory`, whose tracker charges every new storage through
:class:`CachingAllocatorSim` when it predicts a CUDA card (``target="cuda"``).
"""

from __future__ import annotations

import bisect

__all__ = ["CachingAllocatorSim", "OutOfMemory"]

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
                    raise OutOfMemory
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

