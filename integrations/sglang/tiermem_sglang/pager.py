"""Pages one MoE layer's experts from their tiermem host home into the layer's K HBM slot rows.

The slots are the layer's own expert tensors (SGLang: ``w13_weight [K, 2I, H]``, ``w2_weight [K, H, I]``),
so the MoE kernel runs on them unchanged with slot ids in place of expert ids. Every expert's home is
one packed block of an ``ExpertStore`` on a host tier; paging an expert in copies each of its tensors
from that block into its slot row through the ``TierManager``'s transfer engine.

A step's distinct experts are served in waves of at most K: the resident ones first, then the rest
(``plan``, ``plan_waves``); ``place`` makes a wave resident and maps the routing to slot ids (the
same two calls as ``device.DeviceLayerPager``, the GPU-decided pager). ``make_resident`` plans a
wave with tiermem's pure demand planner, applies the plan to the residency ``Directory``, issues
the copies and makes the compute stream wait for them (no host sync on a GPU). ``prefetch`` does
the same for predicted experts without waiting; a later wave that needs them waits for the copy then.

Invariants: the directory, the slot pool and ``entries`` always agree; a slot is never overwritten
while an expert the current wave needs sits in it; a copy into a slot is ordered after every kernel
already queued on the compute stream (the transfer engine's streams wait on it), so an evicted
expert's last reader finishes before its slot is reused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tiermem.errors import CapacityError, ConfigError
from tiermem.experts.store import ExpertStore
from tiermem.manager import TierManager
from tiermem.prefetch import DemandPlan, PrefetchBudget, plan_demand, plan_prefetch
from tiermem.residency import CacheEntry, Directory, PolicySignals, SlotPool, eviction_order, make_policy
from tiermem.transfer.engine import TransferHandle
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.sglang")


@dataclass
class PagerStats:
    """What a layer's pager did since it was built (one ``step`` per forward pass through the layer)."""

    steps: int = 0
    waves: int = 0
    hits: int = 0  # needed experts that were resident
    prefetch_hits: int = 0  # needed experts whose prefetch copy was issued before the step
    misses: int = 0  # needed experts copied on demand
    prefetched: int = 0  # experts copied ahead of use
    bytes_loaded: int = 0


def plan_waves(distinct: Sequence[int], resident: set[int], num_slots: int) -> list[list[int]]:
    """Split a step's distinct experts into waves of at most ``num_slots``, resident ones first.

    A step with no routed expert still gets one empty wave, so the layer runs.
    """
    ordered = [e for e in distinct if e in resident] + [e for e in distinct if e not in resident]
    return [ordered[i:i + num_slots] for i in range(0, len(ordered), num_slots)] or [[]]


def check_slots(store: ExpertStore, slots: Mapping[str, torch.Tensor]) -> int:
    """K, the slot count of ``slots`` (one contiguous ``[K, *shape]`` tensor per tensor of the store's layout);
    raises ``ConfigError`` naming what differs."""
    layout = store.layout
    if sorted(slots) != sorted(layout.names):
        raise ConfigError(
            f"expert pager: slot tensors {sorted(slots)} differ from the store's {list(layout.names)}"
        )
    counts = {name: tensor.shape[0] for name, tensor in slots.items()}
    for spec in layout.tensors:
        row = slots[spec.name]
        if tuple(row.shape[1:]) != spec.shape or row.dtype != spec.dtype or not row.is_contiguous():
            raise ConfigError(
                f"expert pager: slot tensor {spec.name} is {tuple(row.shape)} {row.dtype} (contiguous="
                f"{row.is_contiguous()}), expected contiguous [K, {', '.join(map(str, spec.shape))}] {spec.dtype}"
            )
    if len(set(counts.values())) != 1:
        raise ConfigError(f"expert pager: slot tensors have different slot counts {counts}")
    num_slots = next(iter(counts.values()))
    if num_slots >= store.num_experts:
        raise ConfigError(f"expert pager: {num_slots} slots for {store.num_experts} experts page nothing")
    return num_slots


def distinct_experts(topk_ids: torch.Tensor) -> list[int]:
    """The step's routed experts, ascending (padding, ``-1``, left out); reads the ids back to the host."""
    return [e for e in torch.unique(topk_ids).tolist() if e >= 0]


def slot_ids(topk_ids: torch.Tensor, placed: Mapping[int, int], num_experts: int) -> torch.Tensor:
    """``topk_ids`` with each expert of ``placed`` replaced by its slot and every other entry ``-1`` (masked)."""
    # Index E (and -1, which wraps to it) stays -1: padded routing entries are masked.
    to_slot = torch.full((num_experts + 1,), -1, dtype=torch.int32)
    to_slot[list(placed)] = torch.tensor(list(placed.values()), dtype=torch.int32)
    return to_slot.to(topk_ids.device)[topk_ids]


class LayerPager:
    """Residency and copies for the ``num_slots`` HBM slots of MoE layer ``layer``."""

    def __init__(
        self, *, manager: TierManager, store: ExpertStore, layer: int, slots: Mapping[str, torch.Tensor],
        policy: str = "lru", signals: PolicySignals | None = None,
    ) -> None:
        self.manager = manager
        self.store = store
        self.layer = layer
        self.slots = dict(slots)
        self.num_slots = check_slots(store, self.slots)
        self.directory = Directory(self.num_slots)
        self.pool = SlotPool(slot_bytes=store.layout.block_bytes, slots_per_group=self.num_slots)
        self.policy = make_policy(policy, signals or PolicySignals())
        self.entries: dict[ObjectKey, CacheEntry] = {}
        self.stats = PagerStats()
        self._pending: dict[ObjectKey, TransferHandle] = {}
        self._prefetched: set[ObjectKey] = set()
        self._tick = 0
        self._on_gpu = next(iter(self.slots.values())).is_cuda

    @property
    def device(self) -> torch.device:
        return next(iter(self.slots.values())).device

    def key(self, expert: int) -> ObjectKey:
        return self.store.key(self.layer, expert)

    def resident_experts(self) -> set[int]:
        """Experts whose copy has been issued (landed or in flight) into a slot."""
        return {key.index for key in self.entries}

    def slot_of(self, expert: int) -> int | None:
        return self.directory.slot_of(self.key(expert))

    def fill(self) -> None:
        """Start with experts ``0 .. K-1`` in slots ``0 .. K-1`` (as after loading), and wait for them."""
        self.make_resident(list(range(self.num_slots)))
        self.stats = PagerStats()

    def plan(self, topk_ids: torch.Tensor) -> list[list[int]]:
        """One step's waves (``plan_waves``: reads the routing back to the host); counts the step."""
        self.stats.steps += 1
        return plan_waves(distinct_experts(topk_ids), self.resident_experts(), self.num_slots)

    def place(self, topk_ids: torch.Tensor, wave: Sequence[int]) -> torch.Tensor:
        """Make ``wave`` resident; returns ``topk_ids`` as slot ids, entries outside the wave masked (``-1``)."""
        return slot_ids(topk_ids, self.make_resident(wave), self.store.num_experts)

    def make_resident(self, wave: Sequence[int]) -> dict[int, int]:
        """Make the experts of one wave (at most K) resident; returns ``expert -> slot``.

        On a GPU the current stream waits for the copies (no host sync); on a CPU the call blocks.
        """
        if len(wave) > self.num_slots:
            raise ConfigError(f"expert pager: a wave of {len(wave)} experts exceeds the {self.num_slots} slots")
        self._tick += 1
        self._reap()
        keys = [self.key(e) for e in wave]
        for key in keys:
            if key in self._prefetched:
                self.stats.prefetch_hits += 1
                self._prefetched.discard(key)
            elif key in self.entries:
                self.stats.hits += 1
        try:
            plan = self._plan_demand(keys)
        except CapacityError:
            # Prefetches still in flight hold the slots this wave needs: let them land, then evict them.
            self._land(list(self._pending))
            plan = self._plan_demand(keys)
        for victim in plan.evictions:
            self._evict(victim)
        self._load(plan.loads)
        self.stats.misses += len(plan.loads)
        self._land([key for key in keys if key in self._pending])
        for key in keys:
            self.entries[key].touch(self._tick)
        self.stats.waves += 1
        return {key.index: self.entries[key].slot for key in keys}

    def prefetch(self, scores: Mapping[int, float], max_experts: int) -> int:
        """Start copying the best-scored experts that are not resident; returns how many copies started."""
        if max_experts <= 0:
            return 0
        self._reap()
        budget = PrefetchBudget(max_bytes=max_experts * self.store.layout.block_bytes,
                                object_bytes=self.store.layout.block_bytes)
        keyed = {self.key(e): float(s) for e, s in scores.items()}
        plan = plan_prefetch(keyed, self._eviction_order(), set(self._pending), self._pinned(), self._free_slots(),
                             budget)
        for victim in plan.evictions:
            self._evict(victim)
        self._load(plan.loads)
        self._prefetched.update(plan.loads)
        self.stats.prefetched += len(plan.loads)
        return len(plan.loads)

    def drain(self) -> None:
        """Wait for every copy still in flight (before teardown or a consistency check)."""
        self._land(list(self._pending))

    # ---- internals ---------------------------------------------------------------------------
    def _plan_demand(self, keys: Sequence[ObjectKey]) -> DemandPlan:
        return plan_demand(keys, self._eviction_order(), set(self._pending), self._pinned(), self._free_slots())

    def _eviction_order(self) -> list[ObjectKey]:
        landed = (entry for key, entry in self.entries.items() if key not in self._pending)
        return eviction_order(landed, self.policy)

    def _pinned(self) -> frozenset[ObjectKey]:
        return self.directory.snapshot().pinned

    def _free_slots(self) -> int:
        return self.pool.free_count(0)

    def _evict(self, key: ObjectKey) -> None:
        self.pool.release(self.directory.evict(key))
        del self.entries[key]
        self._prefetched.discard(key)

    def _load(self, keys: Sequence[ObjectKey]) -> None:
        if not keys:
            return
        pairs = []
        for key in keys:
            slot = self.pool.acquire(0)
            self.directory.begin_load(key, slot)
            self.entries[key] = CacheEntry(key=key, slot=slot, loaded_tick=self._tick, last_use_tick=self._tick)
            home = self.store.read(self.layer, key.index)
            pairs.extend((home[name], self.slots[name][slot]) for name in self.store.layout.names)
        handle = self.manager.copy(pairs)
        for key in keys:
            self._pending[key] = handle
        self.stats.bytes_loaded += len(keys) * self.store.layout.payload_bytes

    def _reap(self) -> None:
        """Record as resident every in-flight expert whose copy has finished."""
        for key in [k for k, handle in self._pending.items() if handle.done()]:
            del self._pending[key]
            self.directory.finish_load(key)

    def _land(self, keys: Sequence[ObjectKey]) -> None:
        for handle in {id(self._pending[k]): self._pending[k] for k in keys}.values():
            if self._on_gpu:
                handle.wait_on(torch.cuda.current_stream(self.device))
            else:
                handle.wait()
        for key in keys:
            del self._pending[key]
            self.directory.finish_load(key)
