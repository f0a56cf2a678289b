"""The residency directory: which object occupies which HBM slot, which loads are in flight, what is pinned.

It records and checks; it decides nothing (no policy) and moves nothing (no I/O). A planner reads a
``snapshot()``, an executor moves bytes and then tells the directory what happened.

State of one object (absent objects are not recorded)::

    absent --begin_load--> in flight --finish_load--> resident --evict--> absent
                              |  (implicitly pinned)      |
                              +-------abort_load----------+--> absent (from in flight)

Invariants, checked under one lock:
- a slot holds at most one object, and an object at most one slot (slot <-> key is a bijection);
- an in-flight object is never evicted (it is pinned until ``finish_load`` or ``abort_load``);
- a pinned object (pin count > 0) is never evicted; pins are counted, so nested users compose;
- every misuse raises ``OwnershipError`` (wrong state of a key or a slot) or ``CapacityError``
  (a slot outside the directory) and leaves the state unchanged.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tiermem.errors import CapacityError, OwnershipError
from tiermem.types import ObjectKey


@dataclass(frozen=True)
class DirectorySnapshot:
    """A consistent copy of the directory's state at one instant, for pure planners."""

    resident: Mapping[ObjectKey, int]  # key -> slot, loads completed
    in_flight: Mapping[ObjectKey, int]  # key -> slot, loads issued but not completed
    pinned: frozenset[ObjectKey]  # pinned by a user, or in flight
    num_slots: int

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self.resident) - len(self.in_flight)


class Directory:
    """Records the occupancy of ``num_slots`` slots, numbered ``0 .. num_slots - 1``."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise CapacityError(f"residency directory: needs at least 1 slot, got {num_slots}")
        self.num_slots = num_slots
        self._lock = threading.Lock()
        self._resident: dict[ObjectKey, int] = {}
        self._in_flight: dict[ObjectKey, int] = {}
        self._owner: dict[int, ObjectKey] = {}
        self._pins: dict[ObjectKey, int] = {}

    # ---- queries -------------------------------------------------------------------------------
    def slot_of(self, key: ObjectKey) -> int | None:
        """The slot holding ``key`` (resident or in flight), or None when it has none."""
        with self._lock:
            return self._slot(key)

    def owner_of(self, slot: int) -> ObjectKey | None:
        """The object occupying ``slot``, or None when the slot is free."""
        with self._lock:
            return self._owner.get(slot)

    def is_resident(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._resident

    def is_in_flight(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._in_flight

    def is_pinned(self, key: ObjectKey) -> bool:
        with self._lock:
            return key in self._in_flight or self._pins.get(key, 0) > 0

    def pin_count(self, key: ObjectKey) -> int:
        with self._lock:
            return self._pins.get(key, 0)

    def pinned_keys(self) -> frozenset[ObjectKey]:
        """Keys that may not be evicted: pinned by a user, or in flight."""
        with self._lock:
            return frozenset(self._in_flight) | frozenset(k for k, n in self._pins.items() if n > 0)

    def snapshot(self) -> DirectorySnapshot:
        with self._lock:
            pinned = frozenset(self._in_flight) | frozenset(k for k, n in self._pins.items() if n > 0)
            return DirectorySnapshot(
                resident=MappingProxyType(dict(self._resident)),
                in_flight=MappingProxyType(dict(self._in_flight)),
                pinned=pinned,
                num_slots=self.num_slots,
            )

    def __len__(self) -> int:
        """Occupied slots (resident plus in flight)."""
        with self._lock:
            return len(self._owner)

    # ---- transitions ---------------------------------------------------------------------------
    def begin_load(self, key: ObjectKey, slot: int) -> None:
        """Record that ``key`` is being copied into the free ``slot``; it stays pinned until it lands."""
        with self._lock:
            self._check_slot_range(slot)
            if key in self._resident or key in self._in_flight:
                state = "resident" if key in self._resident else "in flight"
                raise OwnershipError(
                    f"residency directory: cannot load {key} into slot {slot}: it is already {state} in slot "
                    f"{self._slot(key)}; check the directory before issuing a copy (no duplicate loads)"
                )
            if slot in self._owner:
                raise OwnershipError(
                    f"residency directory: cannot load {key} into slot {slot}: the slot already holds "
                    f"{self._owner[slot]}; evict it first or take a free slot from the pool"
                )
            self._in_flight[key] = slot
            self._owner[slot] = key

    def finish_load(self, key: ObjectKey) -> None:
        """Record that the copy of ``key`` completed: it becomes resident in the same slot."""
        with self._lock:
            if key not in self._in_flight:
                raise OwnershipError(
                    f"residency directory: cannot finish loading {key}: no load of it is in flight "
                    f"({self._describe(key)})"
                )
            self._resident[key] = self._in_flight.pop(key)

    def abort_load(self, key: ObjectKey) -> int:
        """Forget a failed or cancelled load of ``key``; returns the slot it held, now free."""
        with self._lock:
            if key not in self._in_flight:
                raise OwnershipError(
                    f"residency directory: cannot abort loading {key}: no load of it is in flight "
                    f"({self._describe(key)})"
                )
            if self._pins.get(key, 0) > 0:
                raise OwnershipError(
                    f"residency directory: cannot abort loading {key}: {self._pins[key]} user(s) pinned it "
                    f"and wait for it; unpin first"
                )
            slot = self._in_flight.pop(key)
            del self._owner[slot]
            self._pins.pop(key, None)
            return slot

    def evict(self, key: ObjectKey) -> int:
        """Forget the resident, unpinned ``key``; returns the slot it held, now free."""
        with self._lock:
            if key not in self._resident:
                raise OwnershipError(
                    f"residency directory: cannot evict {key}: it is not resident ({self._describe(key)})"
                )
            pins = self._pins.get(key, 0)
            if pins > 0:
                raise OwnershipError(
                    f"residency directory: cannot evict {key} from slot {self._resident[key]}: it is pinned "
                    f"by {pins} user(s) (in use by the running step); unpin it first or evict another object"
                )
            slot = self._resident.pop(key)
            del self._owner[slot]
            self._pins.pop(key, None)
            return slot

    def pin(self, key: ObjectKey) -> int:
        """Protect ``key`` (resident or in flight) from eviction; returns its slot. Pins nest."""
        with self._lock:
            slot = self._slot(key)
            if slot is None:
                raise OwnershipError(
                    f"residency directory: cannot pin {key}: it is neither resident nor in flight; "
                    f"load it (or begin its load) before pinning"
                )
            self._pins[key] = self._pins.get(key, 0) + 1
            return slot

    def pin_many(self, keys: Sequence[ObjectKey]) -> None:
        """``pin`` each of ``keys`` (a key listed twice is pinned twice), under one lock; all or none."""
        with self._lock:
            for key in keys:
                if self._slot(key) is None:
                    raise OwnershipError(
                        f"residency directory: cannot pin {key}: it is neither resident nor in flight; "
                        f"load it (or begin its load) before pinning"
                    )
            pins = self._pins
            for key in keys:
                pins[key] = pins.get(key, 0) + 1

    def unpin_many(self, keys: Sequence[ObjectKey]) -> None:
        """``unpin`` each of ``keys``, under one lock; all or none."""
        with self._lock:
            wanted = Counter(keys)
            for key, count in wanted.items():
                if self._pins.get(key, 0) < count:
                    raise OwnershipError(
                        f"residency directory: cannot unpin {key} {count} time(s): it holds "
                        f"{self._pins.get(key, 0)} pin(s) ({self._describe(key)}); every unpin must match a pin"
                    )
            for key, count in wanted.items():
                left = self._pins[key] - count
                if left:
                    self._pins[key] = left
                else:
                    del self._pins[key]

    def unpin(self, key: ObjectKey) -> None:
        """Release one pin of ``key``."""
        with self._lock:
            count = self._pins.get(key, 0)
            if count == 0:
                raise OwnershipError(
                    f"residency directory: cannot unpin {key}: it is not pinned ({self._describe(key)}); "
                    f"every unpin must match a pin"
                )
            if count == 1:
                del self._pins[key]
            else:
                self._pins[key] = count - 1

    # ---- helpers (lock held) -------------------------------------------------------------------
    def _slot(self, key: ObjectKey) -> int | None:
        slot = self._resident.get(key)
        return self._in_flight.get(key) if slot is None else slot

    def _describe(self, key: ObjectKey) -> str:
        if key in self._resident:
            return f"resident in slot {self._resident[key]}"
        if key in self._in_flight:
            return f"in flight to slot {self._in_flight[key]}"
        return "absent"

    def _check_slot_range(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise CapacityError(
                f"residency directory: slot {slot} does not exist; this directory has {self.num_slots} slots "
                f"(0..{self.num_slots - 1})"
            )
