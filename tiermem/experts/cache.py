"""``ExpertCache``: a fixed pool of expert slots in HBM and the bookkeeping of what sits in them.

Memory is one tensor ``[num_slots, block_bytes]`` on ``device`` (a CUDA device; on a CPU-only host a
CPU tensor stands in for HBM so that the whole path runs in tests). Slots are grouped per MoE layer
or shared by all layers (``SlotLayout``), handed out by the residency ``SlotPool`` and recorded in the
residency ``Directory``; the eviction order comes from a registered single-method policy.

This class moves no bytes and decides nothing on its own: the prefetcher plans (pure planners),
then calls ``begin_load`` / ``finish_load`` / ``evict`` here, in that order, as copies are issued and
land. Invariants: an entry exists for every resident or in-flight key and only for them; only
resident, unpinned keys are ever offered to the policy; slot rows never move.

Each slot group also mirrors its objects' state in arrays (``tiermem.residency.groups.GroupState``:
absent / in flight / resident, pins, last use), so a planner ranks a group with a few vector
operations instead of a Python call per object; the directory stays the checked record, and the
arrays change in the same calls.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch

from tiermem.errors import ConfigError
from tiermem.experts.layout import ExpertLayout
from tiermem.residency.directory import Directory, DirectorySnapshot
from tiermem.residency.groups import ABSENT, IN_FLIGHT, NO_PLACES, RESIDENT, GroupState, compile_now, evictable_places
from tiermem.residency.policies import CacheEntry, PolicySignals, make_policy, priority_array
from tiermem.residency.slots import SlotLayout, SlotPool
from tiermem.types import ObjectKey


class ExpertCache:
    """HBM slots for the experts of ``layers``: ``slots_per_group`` slots per layer, or shared.

    ``keys[i]`` are the keys of ``layers[i]``'s experts in index order (the store's ``key``)."""

    def __init__(
        self, *, layout: ExpertLayout, layers: Sequence[int], keys: Sequence[Sequence[ObjectKey]],
        slots_per_group: int, slot_layout: SlotLayout, device: torch.device, policy: str, signals: PolicySignals,
    ) -> None:
        self.layout = layout
        self.layers = tuple(layers)
        if len(keys) != len(self.layers) or any(k.layer != layer or k.index != i for layer, layer_keys in
                                                zip(self.layers, keys) for i, k in enumerate(layer_keys)):
            raise ConfigError(f"expert cache: keys must list each of the {len(self.layers)} layers' experts in index "
                              "order (keys[i][e].layer == layers[i], .index == e)")
        self.slot_layout = slot_layout
        num_groups = len(self.layers) if slot_layout is SlotLayout.PER_LAYER else 1
        self.pool = SlotPool(slot_bytes=layout.block_bytes, slots_per_group=slots_per_group, num_groups=num_groups)
        self.directory = Directory(self.pool.num_slots)
        self.policy_name = policy
        self.policy = make_policy(policy, signals)
        if signals.counts is not None:
            for layer_keys in keys:
                signals.counts.track(layer_keys[0], len(layer_keys))
        self.memory = torch.empty((self.pool.num_slots, layout.block_bytes), dtype=torch.uint8, device=device)
        # with its index ("cuda:0", not "cuda"): torch.cuda.current_stream(device) then skips a device query
        # that costs ~9 us per call, and the prefetcher asks for it several times per layer
        self.device = self.memory.device
        self._rows = self.memory.unbind(0)  # one view per slot, made once: indexing costs microseconds per call
        self._group = {layer: (i if slot_layout is SlotLayout.PER_LAYER else 0) for i, layer in enumerate(self.layers)}
        self.entries: dict[ObjectKey, CacheEntry] = {}
        self._resident: list[set[ObjectKey]] = [set() for _ in range(num_groups)]
        self._in_flight: list[set[ObjectKey]] = [set() for _ in range(num_groups)]
        self.groups = [GroupState.of([(layer, tuple(k)) for layer, k in zip(self.layers, keys)
                                      if self._group[layer] == group]) for group in range(num_groups)]
        compile_now()  # the eviction ranking, compiled here rather than at a decode's first eviction

    @property
    def num_groups(self) -> int:
        return self.pool.num_groups

    @property
    def capacity_bytes(self) -> int:
        return self.pool.capacity_bytes

    def group_of(self, key: ObjectKey) -> int:
        try:
            return self._group[key.layer]
        except KeyError:
            raise ConfigError(f"expert cache: layer {key.layer} of {key} is not cached; layers: {list(self.layers)}") from None

    def contains(self, key: ObjectKey) -> bool:
        """Resident or in flight."""
        return key in self.entries

    def is_resident(self, key: ObjectKey) -> bool:
        return key in self._resident[self.group_of(key)]

    def resident(self, group: int) -> frozenset[ObjectKey]:
        return frozenset(self._resident[group])

    def in_flight(self, group: int) -> frozenset[ObjectKey]:
        return frozenset(self._in_flight[group])

    def free_slots(self, group: int) -> int:
        return self.pool.free_count(group)

    def snapshot(self) -> DirectorySnapshot:
        return self.directory.snapshot()

    def pinned(self) -> frozenset[ObjectKey]:
        """Keys that may not be evicted (pinned or in flight), without copying the whole directory."""
        return self.directory.pinned_keys()

    def order(self, group: int) -> list[ObjectKey]:
        """The group's resident keys, first to evict first (pinned ones included; planners skip them)."""
        state = self.groups[group]
        places = evictable_places(state.state, np.zeros_like(state.pins), state.last_use, self._priorities(group),
                                  NO_PLACES)
        return [state.keys[place] for place in places.tolist()]

    def evictable(self, group: int, needed: Collection[ObjectKey] = ()) -> np.ndarray:
        """The group's resident, unpinned places (``GroupState``) not holding a ``needed`` key, first to evict
        first: the policy's order, ranked in one compiled call."""
        state = self.groups[group]
        places = [state.place(k) for k in needed if k.layer in state.first]
        return evictable_places(state.state, state.pins, state.last_use, self._priorities(group),
                                np.array(places, np.int64) if places else NO_PLACES)

    def _priorities(self, group: int) -> np.ndarray:
        """The policy's priority of every place of the group that is resident (others are arbitrary): the
        policy's own array where it has one (lru, predicted, lfu), else asked once per resident object."""
        state = self.groups[group]
        priority = priority_array(self.policy, state.keys, state.first, state.last_use)
        if priority is None:
            priority = np.zeros(len(state.keys), np.float64)
            for key in self._resident[group]:
                priority[state.place(key)] = self.policy.priority(self.entries[key])
        return priority

    def slot_of(self, key: ObjectKey) -> int:
        """The slot of ``key`` (resident or in flight)."""
        return self.entries[key].slot

    def block(self, key: ObjectKey) -> torch.Tensor:
        """The slot row holding ``key`` (resident or in flight)."""
        return self._rows[self.entries[key].slot]

    def weights(self, key: ObjectKey) -> dict[str, torch.Tensor]:
        """Views of ``key``'s weights in its slot."""
        return self.layout.views(self.block(key))

    def begin_load(self, key: ObjectKey, tick: int) -> torch.Tensor:
        """Take a free slot of ``key``'s group for a copy about to be issued; returns the slot row."""
        group = self.group_of(key)
        slot = self.pool.acquire(group)
        try:
            self.directory.begin_load(key, slot)
        except BaseException:
            self.pool.release(slot)
            raise
        self.entries[key] = CacheEntry(key=key, slot=slot, loaded_tick=tick, last_use_tick=tick)
        self._in_flight[group].add(key)
        state, place = self._place(key)
        state.state[place] = IN_FLIGHT
        state.last_use[place] = max(state.last_use[place], tick)
        return self._rows[slot]

    def finish_load(self, key: ObjectKey) -> None:
        """The copy of ``key`` has landed: it becomes resident (and evictable once unpinned)."""
        group = self.group_of(key)
        self.directory.finish_load(key)
        self._in_flight[group].remove(key)
        self._resident[group].add(key)
        state, place = self._place(key)
        state.state[place] = RESIDENT

    def abort_load(self, key: ObjectKey) -> None:
        """A copy failed: forget ``key`` and free its slot."""
        self.pool.release(self.directory.abort_load(key))
        self._in_flight[self.group_of(key)].discard(key)
        del self.entries[key]
        state, place = self._place(key)
        state.state[place], state.pins[place] = ABSENT, 0

    def evict(self, key: ObjectKey) -> None:
        """Forget the resident, unpinned ``key``; its slot becomes free."""
        self.pool.release(self.directory.evict(key))
        self._resident[self.group_of(key)].remove(key)
        del self.entries[key]
        state, place = self._place(key)
        state.state[place], state.pins[place] = ABSENT, 0

    def pin(self, keys: Sequence[ObjectKey]) -> None:
        """Pin each of ``keys`` (resident or in flight) against eviction; pins nest."""
        self.directory.pin_many(keys)
        for key in keys:
            state, place = self._place(key)
            state.pins[place] += 1

    def unpin(self, keys: Sequence[ObjectKey]) -> None:
        """Release one pin of each of ``keys``."""
        self.directory.unpin_many(keys)
        for key in keys:
            state, place = self._place(key)
            state.pins[place] -= 1

    def release(self) -> None:
        """Give the slots' HBM back (the runtime closes); the cache holds nothing afterwards."""
        self.memory = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._rows = ()

    def touch(self, keys: Sequence[ObjectKey], tick: int) -> None:
        """Record a use of each of ``keys`` (resident or in flight) at ``tick`` (for recency-based policies)."""
        for key in keys:
            self.entries[key].touch(tick)
            state, place = self._place(key)
            state.last_use[place] = max(state.last_use[place], tick)

    def _place(self, key: ObjectKey) -> tuple[GroupState, int]:
        state = self.groups[self.group_of(key)]
        return state, state.place(key)
