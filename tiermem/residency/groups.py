"""``GroupState``: one slot group's objects as arrays, the view planners rank a group by.

A slot cache keeps, beside its directory, one ``GroupState`` per slot group and changes it in the same
calls that change the directory (load begun, landed, aborted, evicted; pin, unpin, use), so a planner
reads a group with a few vector operations instead of one Python call per object. Places: the objects
of the group's layers one after another, a layer's object ``i`` at ``first[layer] + i``.

Invariants: ``state`` is ``ABSENT``, ``IN_FLIGHT`` or ``RESIDENT`` exactly as the directory records the
object; ``pins`` counts the pins users hold (the directory also treats in-flight objects as pinned);
``last_use`` is the tick of the object's latest load or use (kept after eviction); callers only read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from tiermem.types import ObjectKey

ABSENT, IN_FLIGHT, RESIDENT = 0, 1, 2
NO_PLACES = np.empty(0, np.int64)


@dataclass(frozen=True)
class GroupState:
    """The arrays of one slot group (see the module docstring)."""

    keys: tuple[ObjectKey, ...]  # the object at each place
    first: dict[int, int]  # real layer -> the place of its object 0
    state: np.ndarray  # int8: ABSENT, IN_FLIGHT or RESIDENT
    pins: np.ndarray  # int32: pins held by users
    last_use: np.ndarray  # int64: tick of the latest load or use

    @classmethod
    def of(cls, layer_keys: list[tuple[int, tuple[ObjectKey, ...]]]) -> GroupState:
        """The empty state of a group holding each ``(layer, keys in index order)``."""
        first: dict[int, int] = {}
        flat: list[ObjectKey] = []
        for layer, keys in layer_keys:
            first[layer] = len(flat)
            flat.extend(keys)
        n = len(flat)
        return cls(tuple(flat), first, np.zeros(n, np.int8), np.zeros(n, np.int32), np.zeros(n, np.int64))

    def place(self, key: ObjectKey) -> int:
        return self.first[key.layer] + key.index


@numba.njit(cache=True, nogil=True)
def evictable_places(state: np.ndarray, pins: np.ndarray, last_use: np.ndarray, priority: np.ndarray,
                     needed: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """The resident, unpinned places not in ``needed``, first to evict first: lowest ``priority``, then least
    recently used, then lowest place (``eviction_order``'s ties). One compiled call: numpy's per-call cost
    on a group of 60 objects exceeds the work, and this runs for every demand and prefetch."""
    places = np.empty(state.shape[0], np.int64)
    count = 0
    for place in range(state.shape[0]):
        if state[place] == RESIDENT and pins[place] == 0:
            places[count] = place
            count += 1
    for i in range(needed.shape[0]):
        for j in range(count):
            if places[j] == needed[i]:
                places[j] = places[count - 1]
                count -= 1
                break
    places = np.sort(places[:count])
    places = places[np.argsort(last_use[places], kind="mergesort")]
    return places[np.argsort(priority[places], kind="mergesort")]


@functools.cache
def compile_now() -> None:
    """Compile (or load from numba's cache) ``evictable_places`` for each priority a cache passes, now rather
    than at the first eviction of a decode (a first compile takes about a second): int64 last uses (lru, and
    a group without predictions), writable float64 (lfu, a shared group's predictions) and the read-only
    float64 a per-layer group's published predictions are."""
    state, pins, last_use = np.zeros(1, np.int8), np.zeros(1, np.int32), np.zeros(1, np.int64)
    published = np.zeros(1, np.float64)
    read_only = published.view()
    read_only.flags.writeable = False
    for priority in (last_use, published, read_only):
        evictable_places(state, pins, last_use, priority, NO_PLACES)
