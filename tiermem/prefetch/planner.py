"""Prefetch and demand planning: pure functions from a residency snapshot to a frozen plan.

A planner reads state and returns a plan; it never touches the directory, the pool or a tier. The
caller applies the plan in order (evictions, then loads) and records each step in the directory.
Both planners work on one slot group (one layer of a per-layer pool, or a whole shared pool): call
them once per group, passing that group's keys.

Invariants of every plan (tested):
- it never evicts a pinned object, an in-flight object or an object the current step needs;
- it never loads an object that is resident or already in flight (no duplicate copies);
- loads never exceed the free slots plus the planned evictions;
- a prefetch plan never exceeds its byte budget and never displaces an object whose predicted score
  is at least that of the object it would load (no churn between equally likely experts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numba
import numpy as np

from tiermem.errors import CapacityError, ConfigError
from tiermem.residency.groups import ABSENT
from tiermem.types import ObjectKey


@dataclass(frozen=True)
class PrefetchBudget:
    """How much one prefetch plan may move."""

    max_bytes: int  # bytes the plan may load
    object_bytes: int  # size of one object (every slot has this size)
    min_score: float = 0.0  # only objects scored strictly above this are worth loading

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.object_bytes <= 0:
            raise ConfigError(
                f"prefetch budget: max_bytes must be >= 0 and object_bytes > 0, got {self.max_bytes} and "
                f"{self.object_bytes}"
            )

    @property
    def max_objects(self) -> int:
        return self.max_bytes // self.object_bytes


@dataclass(frozen=True)
class PrefetchPlan:
    """Objects to copy in, most valuable first, and the objects to evict to make room."""

    loads: tuple[ObjectKey, ...]
    evictions: tuple[ObjectKey, ...]
    load_bytes: int
    skipped_in_flight: int  # wanted objects left alone because their copy is already in flight


@dataclass(frozen=True)
class DemandPlan:
    """Objects the current step needs that must be fetched now, and the evictions that make room."""

    loads: tuple[ObjectKey, ...]
    evictions: tuple[ObjectKey, ...]


def plan_prefetch(
    scores: Mapping[ObjectKey, float],
    resident: Sequence[ObjectKey],
    in_flight: AbstractSet[ObjectKey],
    pinned: AbstractSet[ObjectKey],
    free_slots: int,
    budget: PrefetchBudget,
    needed_now: AbstractSet[ObjectKey] = frozenset(),
    resident_score: Callable[[ObjectKey], float] | None = None,
) -> PrefetchPlan:
    """Choose which predicted objects to load and which resident ones to evict for them.

    ``scores`` are predictions for the group's objects (higher = sooner needed); ``resident`` lists
    the group's resident objects in eviction order (lowest priority first, see
    ``tiermem.residency.eviction_order``). A resident object without a score counts as not predicted.
    ``resident_score(key)``, when given, scores resident objects instead (asked once per evictable
    object: a caller holding every score in an array need not build a dict of them).
    Candidates are taken by descending score (ties by key); each one takes a free slot or evicts the
    first evictable object whose score is lower than its own, until the budget or the room runs out.
    """
    if free_slots < 0:
        raise ConfigError(f"prefetch planner: free_slots must be >= 0, got {free_slots}")
    resident_set = set(resident)
    candidates = sorted(
        (key for key, score in scores.items() if score > budget.min_score and key not in resident_set),
        key=lambda key: (-scores[key], key),
    )
    skipped = sum(1 for key in candidates if key in in_flight)
    candidates = [key for key in candidates if key not in in_flight]
    protected = set(pinned) | set(in_flight) | set(needed_now)
    victims = [key for key in resident if key not in protected]

    victim_score = resident_score or (lambda key: scores.get(key, float("-inf")))
    candidates = candidates[: budget.max_objects]
    count, chosen = pair_victims(np.array([scores[key] for key in candidates], np.float64),
                                 np.array([victim_score(key) for key in victims], np.float64), free_slots)
    return PrefetchPlan(tuple(candidates[:count]), tuple(victims[i] for i in chosen.tolist()),
                        count * budget.object_bytes, skipped)


@numba.njit(cache=True, nogil=True)
def pair_victims(candidate_scores: np.ndarray, victim_scores: np.ndarray,
                 free_slots: int) -> tuple[int, np.ndarray]:  # pragma: no cover - compiled
    """The rule of both prefetch planners on bare scores: candidates best first, victims first to evict first.
    Each candidate takes a free slot, or evicts the next victim scored below it (a victim scored at least
    as high is skipped for good: later candidates score lower); returns how many candidates load and the
    indices of the victims they evict, in order."""
    chosen = np.empty(candidate_scores.shape[0], np.int64)
    evicted, count, free, next_victim = 0, 0, free_slots, 0
    for floor in candidate_scores:
        if free > 0:
            free -= 1
        else:
            while next_victim < victim_scores.shape[0] and victim_scores[next_victim] >= floor:
                next_victim += 1
            if next_victim == victim_scores.shape[0]:
                break
            chosen[evicted] = next_victim
            evicted += 1
            next_victim += 1
        count += 1
    return count, chosen[:evicted]


def plan_demand(
    needed: Iterable[ObjectKey],
    resident: Sequence[ObjectKey],
    in_flight: AbstractSet[ObjectKey],
    pinned: AbstractSet[ObjectKey],
    free_slots: int,
) -> DemandPlan:
    """Fetch every needed object that is neither resident nor in flight, evicting in ``resident`` order.

    Raises ``CapacityError`` when the missing objects do not fit in the free slots plus the
    evictable ones; the caller then splits the step into waves or needs a larger pool.
    """
    needed_set = set(needed)
    resident_set = set(resident)
    loads = sorted(key for key in needed_set if key not in resident_set and key not in in_flight)
    protected = set(pinned) | set(in_flight) | needed_set
    victims = [key for key in resident if key not in protected]
    shortfall = len(loads) - max(free_slots, 0)
    if shortfall > len(victims):
        raise CapacityError(
            f"demand planner: the step needs {len(loads)} object(s) that are not resident, but only "
            f"{free_slots} slot(s) are free and {len(victims)} can be evicted ({len(protected & resident_set)} "
            f"resident ones are pinned or needed); enlarge the slot group or split the step"
        )
    return DemandPlan(tuple(loads), tuple(victims[: max(shortfall, 0)]))


@numba.njit(cache=True, nogil=True)
def plan_group_prefetch(scores: np.ndarray, state: np.ndarray, victims: np.ndarray, base: int, min_score: float,
                        max_objects: int, free_slots: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """``plan_prefetch`` on one slot group's arrays (``tiermem.residency.groups``), in one compiled call.

    The target layer's object ``i`` sits at place ``base + i`` with score ``scores[i]``; ``state`` is the
    group's; ``victims`` are its evictable places, first to evict first (``evictable_places``). Returns the
    places to load, best first, and the places to evict, in order: the same plan as ``plan_prefetch``
    given the same state (a property test holds them equal)."""
    count = scores.shape[0]
    chosen = np.empty(max(max_objects, 0), np.int64)
    taken = np.zeros(count, np.bool_)
    wanted = 0
    for _ in range(max_objects):  # best absent candidates, ties by index
        best = -1
        for i in range(count):
            if not taken[i] and state[base + i] == ABSENT and scores[i] > min_score and (
                    best < 0 or scores[i] > scores[best]):
                best = i
        if best < 0:
            break
        taken[best] = True
        chosen[wanted] = best
        wanted += 1
    victim_scores = np.full(victims.shape[0], -np.inf)  # another layer's victim scores -inf
    for v in range(victims.shape[0]):
        place = victims[v] - base
        if 0 <= place < count:
            victim_scores[v] = scores[place]
    loads, evicted = pair_victims(scores[chosen[:wanted]].astype(np.float64), victim_scores, free_slots)
    return chosen[:loads] + base, victims[evicted]


@functools.cache
def compile_now() -> None:
    """Compile (or load from numba's cache) the prefetch planners' kernels now, not at a decode's first prefetch
    (a first compile takes about a second): ``plan_group_prefetch`` on float64 scores, ``pair_victims``."""
    plan_group_prefetch(np.zeros(1, np.float64), np.zeros(1, np.int8), np.zeros(0, np.int64), 0, 0.0, 1, 1)
    pair_victims(np.zeros(1, np.float64), np.zeros(0, np.float64), 1)
