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
