"""Property tests of the arena allocator: no overlap, exact accounting, full coalescing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import OwnershipError
from tiermem.tiers.arena import Arena, align_up

ARENA_BYTES = 64 * 1024
ALIGNMENT = 512

operations = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=9000)),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=10_000)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_random_alloc_free_never_overlaps_and_accounts_exactly(ops):
    arena = Arena(ARENA_BYTES, ALIGNMENT)
    live: dict[int, int] = {}
    for op, value in ops:
        if op == "alloc":
            offset = arena.allocate(value)
            if offset is None:
                assert arena.largest_free_bytes < align_up(value, ALIGNMENT)
                continue
            assert offset % ALIGNMENT == 0
            live[offset] = align_up(value, ALIGNMENT)
        elif live:
            offset = sorted(live)[value % len(live)]
            assert arena.free(offset) == live.pop(offset)
        extents = sorted(live.items())
        for (a, size_a), (b, _) in zip(extents, extents[1:]):
            assert a + size_a <= b, "allocated extents overlap"
        assert all(o + s <= ARENA_BYTES for o, s in extents)
        assert arena.used_bytes == sum(live.values())
        assert arena.used_bytes + arena.free_bytes == ARENA_BYTES
        free_extents = arena.free_extents()
        for (a, size_a), (b, _) in zip(free_extents, free_extents[1:]):
            assert a + size_a < b, "adjacent free extents were not merged"
    for offset in list(live):
        arena.free(offset)
    assert arena.free_extents() == [(0, ARENA_BYTES)]


def test_best_fit_reuses_the_smallest_hole():
    arena = Arena(8 * ALIGNMENT, ALIGNMENT)
    a, b, c, d = (arena.allocate(ALIGNMENT * n) for n in (2, 1, 3, 1))
    arena.free(a)  # hole of 2
    arena.free(c)  # hole of 3
    assert arena.allocate(2 * ALIGNMENT) == a


def test_freeing_twice_is_an_ownership_error():
    arena = Arena(4 * ALIGNMENT, ALIGNMENT)
    offset = arena.allocate(100)
    arena.free(offset)
    with pytest.raises(OwnershipError, match="double free"):
        arena.free(offset)
