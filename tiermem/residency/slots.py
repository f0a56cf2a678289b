"""HBM slot pools: a fixed number of equally sized slots, one group per MoE layer or one shared group.

A slot holds exactly one object (one expert: gate+up+down and scales, packed). The pool only hands out
and takes back slot numbers; the ``Directory`` records which object sits in which slot.

Invariants:
- slots are numbered ``0 .. num_slots - 1``; group ``g`` owns ``g * slots_per_group ..
  (g + 1) * slots_per_group - 1``, so a slot number is also the index into one flat HBM tensor;
- a slot is either free or acquired, never both; ``release`` of a free slot raises ``OwnershipError``;
- the pool is sized once (from a byte budget or a fraction) and never grows or shrinks.
"""

from __future__ import annotations

import enum
import math
import threading

from tiermem.config import format_bytes
from tiermem.errors import CapacityError, ConfigError, OwnershipError


class SlotLayout(str, enum.Enum):
    """How slots are grouped: one group per MoE layer, or one group shared by all layers."""

    PER_LAYER = "per_layer"
    SHARED = "shared"


def slots_for_budget(budget_bytes: int, object_bytes: int, *, working_set_objects: int = 1) -> int:
    """How many ``object_bytes`` slots fit in ``budget_bytes``; raises if one step's working set does not.

    ``working_set_objects`` is the number of objects one step must hold at once (for a per-layer
    pool: the slots every layer needs, summed over layers).
    """
    if object_bytes <= 0:
        raise ConfigError(f"residency: object_bytes must be > 0, got {object_bytes}")
    if working_set_objects < 1:
        raise ConfigError(f"residency: working_set_objects must be >= 1, got {working_set_objects}")
    slots = budget_bytes // object_bytes
    if slots < working_set_objects:
        needed = working_set_objects * object_bytes
        raise CapacityError(
            f"residency: an HBM budget of {budget_bytes} bytes ({format_bytes(budget_bytes)}) holds {slots} "
            f"slot(s) of {format_bytes(object_bytes)}, but one step's working set needs {working_set_objects} "
            f"object(s) = {needed} bytes ({format_bytes(needed)}); raise the budget to at least that"
        )
    return slots


def slots_for_fraction(fraction: float, objects_per_group: int) -> int:
    """Slots that hold ``fraction`` of ``objects_per_group`` objects, rounded down (never above the fraction)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"residency: the resident fraction must be in (0, 1], got {fraction}")
    slots = math.floor(fraction * objects_per_group + 1e-9)
    if slots < 1:
        raise CapacityError(
            f"residency: {fraction:.1%} of {objects_per_group} objects is less than one slot; "
            f"use a fraction of at least {1 / objects_per_group:.4f}"
        )
    return slots


class SlotPool:
    """``num_groups`` groups of ``slots_per_group`` slots of ``slot_bytes`` each. Thread-safe."""

    def __init__(self, *, slot_bytes: int, slots_per_group: int, num_groups: int = 1) -> None:
        if slot_bytes <= 0 or slots_per_group < 1 or num_groups < 1:
            raise ConfigError(
                f"residency slot pool: slot_bytes, slots_per_group and num_groups must be positive, got "
                f"{slot_bytes}, {slots_per_group}, {num_groups}"
            )
        self.slot_bytes = slot_bytes
        self.slots_per_group = slots_per_group
        self.num_groups = num_groups
        self._lock = threading.Lock()
        # Free lists are stacks, lowest slot on top, so that allocation order is deterministic.
        self._free = [list(reversed(self.group_slots(g))) for g in range(num_groups)]
        self._acquired: set[int] = set()

    @classmethod
    def for_budget(
        cls, budget_bytes: int, object_bytes: int, *, layout: SlotLayout, num_layers: int,
        working_set_per_layer: int,
    ) -> SlotPool:
        """Size a pool from an HBM byte budget; raises ``CapacityError`` naming the bytes one step needs.

        A per-layer pool splits the budget evenly over ``num_layers`` groups, each of which must hold
        ``working_set_per_layer`` objects; a shared pool needs that working set only once, because
        layers run one after another.
        """
        if layout is SlotLayout.PER_LAYER:
            total = slots_for_budget(
                budget_bytes, object_bytes, working_set_objects=working_set_per_layer * num_layers
            )
            return cls(slot_bytes=object_bytes, slots_per_group=total // num_layers, num_groups=num_layers)
        total = slots_for_budget(budget_bytes, object_bytes, working_set_objects=working_set_per_layer)
        return cls(slot_bytes=object_bytes, slots_per_group=total, num_groups=1)

    @property
    def num_slots(self) -> int:
        return self.slots_per_group * self.num_groups

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def group_slots(self, group: int) -> range:
        self._check_group(group)
        start = group * self.slots_per_group
        return range(start, start + self.slots_per_group)

    def group_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise OwnershipError(f"residency slot pool: slot {slot} is outside this pool's {self.num_slots} slots")
        return slot // self.slots_per_group

    def free_count(self, group: int) -> int:
        self._check_group(group)
        with self._lock:
            return len(self._free[group])

    def acquire(self, group: int) -> int:
        """Take the lowest free slot of ``group``; raises ``CapacityError`` when the group is full."""
        self._check_group(group)
        with self._lock:
            if not self._free[group]:
                raise CapacityError(
                    f"residency slot pool: group {group} has all {self.slots_per_group} slots occupied; "
                    f"evict an unpinned object of this group before loading another"
                )
            slot = self._free[group].pop()
            self._acquired.add(slot)
            return slot

    def release(self, slot: int) -> None:
        """Return ``slot`` to its group's free list."""
        group = self.group_of_slot(slot)
        with self._lock:
            if slot not in self._acquired:
                raise OwnershipError(f"residency slot pool: slot {slot} is already free; release it only once")
            self._acquired.remove(slot)
            self._free[group].append(slot)
            self._free[group].sort(reverse=True)

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.num_groups:
            raise OwnershipError(
                f"residency slot pool: group {group} does not exist; this pool has {self.num_groups} group(s)"
            )
