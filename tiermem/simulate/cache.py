"""The simulator's per-layer expert caches, built on the real residency layer and planners.

``LayerCaches`` drives a ``SlotPool`` (one group of C slots per traced layer), a ``Directory``, a
policy from ``EVICTION_POLICIES`` and the pure planners exactly as a GPU executor would, except that a
"copy" is instantaneous bookkeeping: the cost model (``tiermem.simulate.cost``) supplies the time.

Invariants: group ``g`` holds only keys of traced layer ``layers[g]``; every in-flight load of a group
targets that group's next use (the engine never prefetches a full round of layers ahead), so
``land(g)`` completes them all; pins taken by ``serve`` are released before it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tiermem.prefetch.planner import PrefetchBudget, PrefetchPlan, plan_demand, plan_prefetch
from tiermem.residency.directory import Directory
from tiermem.residency.policies import CacheEntry, PolicySignals, eviction_order, make_policy
from tiermem.residency.signals import FutureUses
from tiermem.residency.slots import SlotPool
from tiermem.types import ObjectKey

EXPERT_KIND = "expert"
SIM_TABLE = "sim"


class ExpertKeys:
    """One shared ``ObjectKey`` per (layer, expert): lookups then hit by identity, never by field comparison."""

    def __init__(self, layers: Sequence[int], num_experts: int) -> None:
        self._keys = {layer: [ObjectKey(EXPERT_KIND, SIM_TABLE, layer, e) for e in range(num_experts)] for layer in layers}

    def __call__(self, layer: int, expert: int) -> ObjectKey:
        return self._keys[layer][expert]


@dataclass(frozen=True)
class ServeOutcome:
    """What one layer of one step found and fetched."""

    present: frozenset[ObjectKey]  # needed and resident or in flight when the layer was routed
    fetched: tuple[ObjectKey, ...]  # needed and fetched on demand (misses), in fetch order
    evicted: tuple[ObjectKey, ...]
    waves: int  # > 1 when the layer needed more experts than its group has slots


class LayerCaches:
    """One cache group of ``slots_per_layer`` slots for each traced layer."""

    def __init__(self, layers: Sequence[int], slots_per_layer: int, policy: str, signals: PolicySignals) -> None:
        self.layers = tuple(layers)
        self.pool = SlotPool(slot_bytes=1, slots_per_group=slots_per_layer, num_groups=len(self.layers))
        self.directory = Directory(self.pool.num_slots)
        self.policy = make_policy(policy, signals)
        self.entries: dict[ObjectKey, CacheEntry] = {}
        self._resident: list[set[ObjectKey]] = [set() for _ in self.layers]
        self._in_flight: list[dict[ObjectKey, int]] = [{} for _ in self.layers]  # key -> issue tick
        self._displaced: dict[ObjectKey, CacheEntry] = {}  # in-flight prefetch -> the entry its slot held

    def resident(self, group: int) -> frozenset[ObjectKey]:
        return frozenset(self._resident[group])

    def in_flight(self, group: int) -> frozenset[ObjectKey]:
        return frozenset(self._in_flight[group])

    def order(self, group: int) -> list[ObjectKey]:
        """The group's resident keys, lowest eviction priority first."""
        return eviction_order((self.entries[k] for k in self._resident[group]), self.policy)

    def land(self, group: int) -> tuple[ObjectKey, ...]:
        """Complete every in-flight load of ``group``; returns the keys that landed."""
        landed = tuple(sorted(self._in_flight[group]))
        for key in landed:
            self._land_one(key, group)
        return landed

    def serve(self, group: int, needed: Sequence[ObjectKey], tick: int, future: FutureUses | None) -> ServeOutcome:
        """Make every needed key resident (evicting by policy), use them at ``tick``, and unpin them.

        In-flight loads must have landed (``land``). When the misses do not fit in the group at once,
        the layer runs in waves: the keys of a wave are pinned, used, unpinned, and the next wave may
        evict them (the oracle's clock moves past this tick so it sees them as done).
        """
        present = frozenset(k for k in needed if k in self._resident[group])
        pending = [k for k in needed if k not in present]
        pinned: list[ObjectKey] = []
        fetched: list[ObjectKey] = []
        evicted: list[ObjectKey] = []
        for key in sorted(present):
            self.directory.pin(key)
            self.entries[key].touch(tick)
            pinned.append(key)
        waves = 1
        while pending:
            room = self.pool.free_count(group) + len(self._resident[group]) - len(pinned)
            if room == 0:
                self._unpin(pinned)
                waves += 1
                if future is not None:
                    future.advance(tick + 1)
                continue
            chunk, pending = pending[:room], pending[room:]
            plan = plan_demand(
                chunk, self.order(group), frozenset(), self.directory.pinned_keys(), self.pool.free_count(group)
            )
            for key in plan.evictions:
                self._evict(key, group)
            for key in plan.loads:
                self._load(key, group, tick, self.pool.acquire(group))
                self._land_one(key, group)
                self.directory.pin(key)
                self.entries[key].touch(tick)
                pinned.append(key)
            fetched.extend(plan.loads)
            evicted.extend(plan.evictions)
        self._unpin(pinned)
        return ServeOutcome(present, tuple(fetched), tuple(evicted), waves)

    def prefetch(
        self, group: int, scores: Mapping[ObjectKey, float], budget: PrefetchBudget, tick: int,
    ) -> PrefetchPlan:
        """Plan and apply a prefetch into ``group``; the loads stay in flight until ``land``."""
        plan = plan_prefetch(
            scores, self.order(group), self.in_flight(group), self.directory.pinned_keys(),
            self.pool.free_count(group), budget,
        )
        into_free = len(plan.loads) - len(plan.evictions)  # the planner fills free slots first
        for i, key in enumerate(plan.loads):
            if i < into_free:
                self._load(key, group, tick, self.pool.acquire(group))
                continue
            victim = self.entries[plan.evictions[i - into_free]]
            self._forget(victim.key, group)
            self._load(key, group, tick, victim.slot)  # the copy overwrites the victim's slot
            self._displaced[key] = victim
        return plan

    def cancel(self, group: int, key: ObjectKey, *, copy_started: bool) -> None:
        """Drop the in-flight load of ``key``, which will not finish.

        If its copy never started, the object it displaced is still intact in the slot and becomes
        resident again; otherwise the slot is free.
        """
        del self._in_flight[group][key]
        slot = self.directory.abort_load(key)
        victim = self._displaced.pop(key, None)
        if copy_started or victim is None or self.directory.slot_of(victim.key) is not None:
            self.pool.release(slot)
            return
        self.directory.begin_load(victim.key, slot)
        self.directory.finish_load(victim.key)
        self.entries[victim.key] = victim
        self._resident[group].add(victim.key)

    def _load(self, key: ObjectKey, group: int, tick: int, slot: int) -> None:
        self.directory.begin_load(key, slot)
        self._in_flight[group][key] = tick

    def _land_one(self, key: ObjectKey, group: int) -> None:
        self._displaced.pop(key, None)
        tick = self._in_flight[group].pop(key)
        self.directory.finish_load(key)
        self._add_entry(key, group, tick)

    def _add_entry(self, key: ObjectKey, group: int, tick: int) -> None:
        slot = self.directory.slot_of(key)
        assert slot is not None, f"{key} landed without a slot"
        self.entries[key] = CacheEntry(key=key, slot=slot, loaded_tick=tick, last_use_tick=tick)
        self._resident[group].add(key)

    def _evict(self, key: ObjectKey, group: int) -> None:
        self.pool.release(self._forget(key, group))

    def _forget(self, key: ObjectKey, group: int) -> int:
        """Evict ``key`` and return its slot without releasing it to the pool."""
        self._resident[group].remove(key)
        del self.entries[key]
        return self.directory.evict(key)

    def _unpin(self, pinned: list[ObjectKey]) -> None:
        for key in pinned:
            self.directory.unpin(key)
        pinned.clear()
