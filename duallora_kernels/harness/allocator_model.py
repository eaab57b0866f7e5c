"""The PyTorch CUDA caching allocator, replayed on a traced step's allocations and frees, to predict
``torch.cuda.max_memory_reserved`` (what the process takes from the GPU) from
``max_memory_allocated`` (what its tensors hold).

The rules kept (c10/cuda/CUDACachingAllocator.cpp, default settings: no expandable segments, no
max_split_size): a block is rounded up to 512 B; requests up to 1 MiB come from a small pool of
2 MiB segments, larger ones from a large pool whose new segments are 20 MiB for requests under
10 MiB and the request rounded up to 2 MiB otherwise; a request takes the smallest free block of
its pool that fits (best fit), split when the rest is worth keeping (small pool: 512 B or more;
large pool: more than 1 MiB); a freed block merges with free neighbours of its segment. Cached
segments are never returned (the measured step's ``reset_peak_memory_stats`` comes after
``empty_cache``; the segments then held are those of the tensors alive, which the replay makes
first). Not modelled: streams other than the default one, the release-and-retry on an
out-of-memory error (so the reserved figure is the unconstrained one, an upper bound of what a
smaller GPU needs).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable

__all__ = ["MiB", "segment_bytes", "AllocatorReplay", "replay"]

MiB = 1 << 20
_SMALL_REQUEST = 1 * MiB  # kSmallSize
_SMALL_SEGMENT = 2 * MiB  # kSmallBuffer
_LARGE_SEGMENT = 20 * MiB  # kLargeBuffer
_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
_ROUND_LARGE = 2 * MiB  # kRoundLarge
_MIN_BLOCK = 512  # kMinBlockSize


def segment_bytes(request: int) -> int:
    """The size of the segment (cudaMalloc) a request that no cached block fits brings in."""
    if request <= _SMALL_REQUEST:
        return _SMALL_SEGMENT
    if request < _MIN_LARGE_ALLOC:
        return _LARGE_SEGMENT
    return -(-request // _ROUND_LARGE) * _ROUND_LARGE


@dataclass(eq=False)
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: "_Block | None" = None
    next: "_Block | None" = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


class AllocatorReplay:
    """Replays ``alloc(key, nbytes)`` / ``free(key)``; ``reserved`` and ``allocated`` are the
    totals now, ``peak_reserved`` and ``peak_allocated`` their maxima."""

    def __init__(self) -> None:
        self._free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small pool? -> sorted keys
        self._by_key: dict[tuple[int, int, int], _Block] = {}
        self._used: dict[int, tuple[_Block, bool]] = {}
        self._segments = 0
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0

    def _insert(self, block: _Block, small: bool) -> None:
        block.free = True
        bisect.insort(self._free[small], block.key())
        self._by_key[block.key()] = block

    def _remove(self, block: _Block, small: bool) -> None:
        pool = self._free[small]
        pool.pop(bisect.bisect_left(pool, block.key()))
        del self._by_key[block.key()]

    def alloc(self, key: int, nbytes: int) -> None:
        size = max(_MIN_BLOCK, -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK)
        small = size <= _SMALL_REQUEST
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block = self._by_key[pool[i]]
            self._remove(block, small)
        else:
            seg = segment_bytes(size)
            self._segments += 1
            block = _Block(self._segments, 0, seg)
            self.reserved += seg
        rest = block.size - size
        if rest >= _MIN_BLOCK if small else rest > _SMALL_REQUEST:
            tail = _Block(block.segment, block.offset + size, rest, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(tail, small)
        block.free = False
        self._used[key] = (block, small)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, key: int) -> None:
        block, small = self._used.pop(key)
        self.allocated -= block.size
        for side in (block.prev, block.next):
            if side is not None and side.free:
                self._remove(side, small)
                if side is block.prev:
                    side.size += block.size
                    side.next = block.next
                    if block.next is not None:
                        block.next.prev = side
                    block = side
                else:
                    block.size += side.size
                    block.next = side.next
                    if side.next is not None:
                        side.next.prev = block
        self._insert(block, small)


def replay(events: Iterable[tuple[int, int]], replay_into: AllocatorReplay | None = None) -> AllocatorReplay:
    """Replay ``(key, nbytes)`` events (``nbytes < 0``: free the block of ``key``)."""
    sim = replay_into or AllocatorReplay()
    for key, nbytes in events:
        if nbytes > 0:
            sim.alloc(key, nbytes)
        else:
            sim.free(key)
    return sim
