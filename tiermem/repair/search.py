"""Assignment search for repair planning: one option per demand so the busiest link finishes first.

Problem: demand ``i`` (an expert to copy) has options; option ``o`` adds ``t(o, l)`` seconds to each
of its links ``l`` and takes one unit of its bucket ``b(o)`` (interchangeable destination slots, with
a capacity). Minimise, in this order, the demands left unassigned and the makespan
``max over links of load(l)`` (the fluid model of ``tiermem.repair.fabric``). This is min-makespan
scheduling on unrelated machines with multi-link jobs, NP-hard in general, so:

- ``greedy``: LPT-style list scheduling (longest demand first, each to the option whose links finish
  earliest), Kuhn augmenting paths when a demand finds every bucket it can use full (so the number of
  assigned demands is the maximum possible), then local search off the busiest links: single moves,
  and swaps that free a full bucket by moving its occupant.
- ``exact``: depth-first branch and bound seeded with the greedy result; the bound for a partial
  assignment is the larger of its busiest link and, for every remaining demand, the earliest finish
  of its cheapest option given the loads so far (loads only grow). Identical demands are assigned in
  non-decreasing option order (symmetry breaking). It is used when there are at most
  ``exact_max_demands`` demands and is exact unless it runs out of ``node_budget``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

_EPS = 1e-12
_MAX_PASSES = 32  # local-search passes; each pass visits every demand once


@dataclass(frozen=True)
class Option:
    """One way to serve a demand: a bucket unit and the seconds it adds to each of its links."""

    bucket: int
    loads: tuple[tuple[int, float], ...]  # (link index, seconds)
    cost_s: float = field(init=False, compare=False)  # link time summed over its links (the tie-break)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost_s", sum(seconds for _, seconds in self.loads))


@dataclass(frozen=True)
class Assignment:
    """Option index per demand (``None``: no capacity left anywhere), its makespan, and whether proven best."""

    choice: tuple[int | None, ...]
    makespan_s: float
    optimal: bool

    @property
    def unassigned(self) -> int:
        return sum(c is None for c in self.choice)


def makespan(demands: Sequence[Sequence[Option]], choice: Sequence[int | None], num_links: int) -> float:
    """The busiest link's load under ``choice``."""
    loads = [0.0] * num_links
    for options, index in zip(demands, choice):
        if index is not None:
            for link, seconds in options[index].loads:
                loads[link] += seconds
    return max(loads, default=0.0)


def assign(
    demands: Sequence[Sequence[Option]], capacities: Sequence[int], num_links: int, *,
    exact_max_demands: int, node_budget: int,
) -> Assignment:
    """Greedy assignment, refined by branch and bound when the instance is small (see module doc)."""
    greedy = _Greedy(demands, capacities, num_links).run()
    if len(demands) > exact_max_demands:
        return greedy
    return _BranchAndBound(demands, capacities, num_links, greedy, node_budget).run()


def _finish(loads: list[float], option: Option) -> float:
    """When the last of ``option``'s links would finish if it were added now (a loop: this is the hot path)."""
    finish = 0.0
    for link, seconds in option.loads:
        finish = max(finish, loads[link] + seconds)
    return finish


class _Greedy:
    def __init__(self, demands: Sequence[Sequence[Option]], capacities: Sequence[int], num_links: int) -> None:
        self.demands = demands
        self.left = list(capacities)
        self.loads = [0.0] * num_links
        self.choice: list[int | None] = [None] * len(demands)
        self.members: dict[int, set[int]] = {}  # bucket -> demands assigned to it

    def run(self) -> Assignment:
        def length(i: int) -> float:
            return min((max(s for _, s in o.loads) for o in self.demands[i]), default=0.0)

        for i in sorted(range(len(self.demands)), key=lambda i: (-length(i), len(self.demands[i]), i)):
            index = self._best(i, self.loads)
            if index is None:
                index = self._augment(i)
            if index is not None:
                self._take(i, index)
        for _ in range(_MAX_PASSES):
            if not self._improve():
                break
        return Assignment(tuple(self.choice), max(self.loads, default=0.0), optimal=False)

    def _best(self, i: int, loads: list[float], bucket: int | None = None) -> int | None:
        """The option finishing earliest (ties: least link time, then lowest index), in ``bucket`` if given."""
        best, best_finish, best_cost = None, 0.0, 0.0
        left = self.left
        for index, option in enumerate(self.demands[i]):
            if (left[option.bucket] <= 0) if bucket is None else (option.bucket != bucket):
                continue
            finish = _finish(loads, option)
            if best is None or finish < best_finish:
                best, best_finish, best_cost = index, finish, option.cost_s
            elif finish == best_finish:
                cost = option.cost_s
                if cost < best_cost:
                    best, best_cost = index, cost
        return best

    def _take(self, i: int, index: int) -> None:
        option = self.demands[i][index]
        self.choice[i] = index
        self.left[option.bucket] -= 1
        self.members.setdefault(option.bucket, set()).add(i)
        for link, seconds in option.loads:
            self.loads[link] += seconds

    def _drop(self, i: int) -> None:
        option = self.demands[i][self.choice[i]]
        self.choice[i] = None
        self.left[option.bucket] += 1
        self.members[option.bucket].discard(i)
        for link, seconds in option.loads:
            self.loads[link] -= seconds

    def _augment(self, i: int) -> int | None:
        """Free a bucket ``i`` can use by moving other demands along an augmenting path; ``i``'s option."""
        visited: set[int] = set()
        for bucket in sorted({o.bucket for o in self.demands[i]}):
            if self._make_room(bucket, visited):
                return self._best(i, self.loads, bucket)
        return None

    def _make_room(self, bucket: int, visited: set[int]) -> bool:
        if self.left[bucket] > 0:
            return True
        if bucket in visited:
            return False
        visited.add(bucket)
        for j in sorted(self.members.get(bucket, ())):
            for other in sorted({o.bucket for o in self.demands[j]} - {bucket}):
                if self._make_room(other, visited):
                    self._drop(j)
                    self._take(j, self._best(j, self.loads, other))
                    return True
        return False

    def _improve(self) -> bool:
        """One pass: move each demand on a busiest link to an option that finishes below the makespan,
        directly or by swapping buckets with a demand of a full bucket."""
        moved = False
        for i, index in enumerate(self.choice):
            if index is None:
                continue
            top = max(self.loads)
            if any(self.loads[link] >= top - _EPS for link, _ in self.demands[i][index].loads):
                moved = self._move(i, index, top) or self._swap(i, index, top) or moved
        return moved

    def _move(self, i: int, index: int, top: float) -> bool:
        self._drop(i)  # releases i's bucket unit, so an option in the same bucket is a candidate too
        candidates = [(k, o) for k, o in enumerate(self.demands[i]) if k != index and self.left[o.bucket] > 0]
        better = min(candidates, key=lambda ko: (_finish(self.loads, ko[1]), ko[1].cost_s, ko[0]), default=None)
        if better is not None and _finish(self.loads, better[1]) < top - _EPS:
            self._take(i, better[0])
            return True
        self._take(i, index)
        return False

    def _swap(self, i: int, index: int, top: float) -> bool:
        """Give ``i`` an option in a full bucket whose occupant ``j`` moves to a bucket with room."""
        own = self.demands[i][index].bucket
        for k, option in enumerate(self.demands[i]):
            if option.bucket == own or self.left[option.bucket] > 0:
                continue
            for j in sorted(self.members.get(option.bucket, ())):
                j_index = self.choice[j]
                self._drop(i)
                self._drop(j)
                self._take(i, k)
                fallback = self._best(j, self.loads)
                if fallback is not None:
                    self._take(j, fallback)
                    if max(self.loads) < top - _EPS:
                        return True
                    self._drop(j)
                self._drop(i)
                self._take(j, j_index)
                self._take(i, index)
        return False


class _BranchAndBound:
    def __init__(self, demands: Sequence[Sequence[Option]], capacities: Sequence[int], num_links: int,
                 incumbent: Assignment, node_budget: int) -> None:
        self.demands = demands
        self.left = list(capacities)
        self.loads = [0.0] * num_links
        first_alike: dict[tuple[Option, ...], int] = {}  # identical demands sort next to each other
        self.order = sorted(range(len(demands)), key=lambda i: (
            len(demands[i]), first_alike.setdefault(tuple(demands[i]), i), i))
        self.best = (incumbent.unassigned, incumbent.makespan_s, incumbent.choice)
        self.choice: list[int | None] = [None] * len(demands)
        self.nodes_left = node_budget

    def run(self) -> Assignment:
        exhausted = self._search(0, 0, 0.0)
        _, span, choice = self.best
        return Assignment(choice, span, optimal=exhausted)

    def _bound(self, k: int, unassigned: int, span: float) -> tuple[int, float]:
        for i in self.order[k:]:
            usable = [o for o in self.demands[i] if self.left[o.bucket] > 0]
            if usable:
                span = max(span, min(_finish(self.loads, o) for o in usable))
            else:
                unassigned += 1
        return unassigned, span

    def _better(self, unassigned: int, span: float) -> bool:
        best_unassigned, best_span, _ = self.best
        return unassigned < best_unassigned or (unassigned == best_unassigned and span < best_span - _EPS)

    def _search(self, k: int, unassigned: int, span: float) -> bool:
        """Explore assignments of ``order[k:]``; False when the node budget ran out."""
        if self.nodes_left <= 0:
            return False
        self.nodes_left -= 1
        if k == len(self.order):
            if self._better(unassigned, span):
                self.best = (unassigned, span, tuple(self.choice))
            return True
        if not self._better(*self._bound(k, unassigned, span)):
            return True
        i = self.order[k]
        floor = self._symmetry_floor(k)
        options = self.demands[i]
        usable = (j for j in range(floor, len(options)) if self.left[options[j].bucket] > 0)
        ranked = sorted(usable, key=lambda j: (_finish(self.loads, options[j]), j))
        complete = True
        for index in ranked:
            option = options[index]
            finish = _finish(self.loads, option)
            self._apply(i, index, +1)
            complete = self._search(k + 1, unassigned, max(span, finish)) and complete
            self._apply(i, index, -1)
        if self._better(unassigned + 1, span):
            complete = self._search(k + 1, unassigned + 1, span) and complete
        return complete

    def _symmetry_floor(self, k: int) -> int:
        if k == 0:
            return 0
        i, previous = self.order[k], self.order[k - 1]
        if tuple(self.demands[i]) != tuple(self.demands[previous]):
            return 0
        chosen = self.choice[previous]
        return len(self.demands[i]) if chosen is None else chosen

    def _apply(self, i: int, index: int, sign: int) -> None:
        option = self.demands[i][index]
        self.choice[i] = index if sign > 0 else None
        self.left[option.bucket] -= sign
        for link, seconds in option.loads:
            self.loads[link] += sign * seconds
