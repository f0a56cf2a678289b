"""Offset allocator for one arena: best-fit sub-allocation with alignment and free-extent coalescing.

Pure bookkeeping over ``[0, size_bytes)``; it owns no memory and takes no lock (its tier does).
Invariants, checked by property tests:
- allocated extents never overlap and lie inside the arena;
- ``used_bytes + free_bytes == size_bytes`` at all times (extents are counted at their aligned size);
- adjacent free extents are always merged, so freeing everything restores one free extent.
"""

from __future__ import annotations

import bisect

from tiermem.errors import OwnershipError


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class Arena:
    """Best-fit allocator of aligned extents inside one mapping."""

    def __init__(self, size_bytes: int, alignment_bytes: int) -> None:
        assert size_bytes > 0 and alignment_bytes > 0 and size_bytes % alignment_bytes == 0
        self.size_bytes = size_bytes
        self.alignment_bytes = alignment_bytes
        self._free_offsets: list[int] = [0]  # sorted starts of free extents
        self._free_sizes: dict[int, int] = {0: size_bytes}
        self._allocated: dict[int, int] = {}  # offset -> aligned size
        self.used_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return max(self._free_sizes.values(), default=0)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new aligned extent of at least ``nbytes``, or None when no extent fits."""
        assert nbytes > 0
        size = align_up(nbytes, self.alignment_bytes)
        best = None
        for offset in self._free_offsets:
            extent = self._free_sizes[offset]
            if extent >= size and (best is None or extent < self._free_sizes[best]):
                best = offset
                if extent == size:
                    break
        if best is None:
            return None
        extent = self._free_sizes.pop(best)
        self._free_offsets.remove(best)
        if extent > size:
            self._insert_free(best + size, extent - size)
        self._allocated[best] = size
        self.used_bytes += size
        return best

    def free(self, offset: int) -> int:
        """Release the extent starting at ``offset``; returns its aligned size."""
        size = self._allocated.pop(offset, None)
        if size is None:
            raise OwnershipError(
                f"allocator: no live allocation starts at offset {offset} of this arena "
                "(double free, or a view that is not the start of a tiermem tensor)"
            )
        self.used_bytes -= size
        start, end = offset, offset + size
        i = bisect.bisect_left(self._free_offsets, offset)
        if i < len(self._free_offsets) and self._free_offsets[i] == end:  # merge with the next extent
            end += self._free_sizes.pop(self._free_offsets.pop(i))
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == start:  # merge with the previous extent
                self._free_sizes[prev] += end - start
                return size
        self._insert_free(start, end - start)
        return size

    def is_allocated(self, offset: int) -> bool:
        return offset in self._allocated

    def allocations(self) -> list[tuple[int, int]]:
        """(offset, aligned size) of live allocations, sorted."""
        return sorted(self._allocated.items())

    def free_extents(self) -> list[tuple[int, int]]:
        """(offset, size) of free extents, sorted."""
        return [(o, self._free_sizes[o]) for o in self._free_offsets]

    def _insert_free(self, offset: int, size: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_sizes[offset] = size
