"""Directory and slot pool: misuse raises and changes nothing; random operations keep every invariant."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tiermem.errors import CapacityError, OwnershipError
from tiermem.residency import Directory, SlotLayout, SlotPool, slots_for_budget, slots_for_fraction
from tiermem.types import ObjectKey

SLOTS = 4
KEYS = [ObjectKey("expert", "w", layer, index) for layer in range(2) for index in range(5)]
A, B = KEYS[0], KEYS[1]
MIB = 1 << 20


def test_load_finish_pin_evict_round_trip():
    directory = Directory(SLOTS)
    directory.begin_load(A, 2)
    assert directory.is_in_flight(A) and directory.is_pinned(A) and directory.owner_of(2) == A
    directory.finish_load(A)
    assert directory.is_resident(A) and not directory.is_pinned(A)
    assert directory.pin(A) == 2
    directory.unpin(A)
    assert directory.evict(A) == 2
    assert directory.slot_of(A) is None and len(directory) == 0


def test_pinning_an_absent_key_raises():
    with pytest.raises(OwnershipError, match="neither resident nor in flight"):
        Directory(SLOTS).pin(A)


def test_evicting_a_pinned_key_raises_and_keeps_it():
    directory = Directory(SLOTS)
    directory.begin_load(A, 0)
    directory.finish_load(A)
    directory.pin(A)
    directory.pin(A)
    with pytest.raises(OwnershipError, match="pinned by 2 user"):
        directory.evict(A)
    assert directory.is_resident(A) and directory.pin_count(A) == 2


def test_evicting_an_in_flight_key_raises():
    directory = Directory(SLOTS)
    directory.begin_load(A, 0)
    with pytest.raises(OwnershipError, match="not resident"):
        directory.evict(A)


def test_slot_double_use_raises():
    directory = Directory(SLOTS)
    directory.begin_load(A, 1)
    with pytest.raises(OwnershipError, match="already holds"):
        directory.begin_load(B, 1)
    assert directory.owner_of(1) == A and directory.slot_of(B) is None


def test_duplicate_load_raises():
    directory = Directory(SLOTS)
    directory.begin_load(A, 1)
    with pytest.raises(OwnershipError, match="already in flight"):
        directory.begin_load(A, 2)


def test_slot_outside_the_directory_raises_capacity_error():
    with pytest.raises(CapacityError, match="slot 4 does not exist"):
        Directory(SLOTS).begin_load(A, SLOTS)


def test_unpin_without_pin_raises():
    directory = Directory(SLOTS)
    directory.begin_load(A, 0)
    with pytest.raises(OwnershipError, match="not pinned"):
        directory.unpin(A)


def test_pinning_and_unpinning_many_is_all_or_nothing():
    directory = Directory(SLOTS)
    directory.begin_load(KEYS[0], 0)
    directory.begin_load(KEYS[1], 1)
    directory.pin_many([KEYS[0], KEYS[1], KEYS[0]])
    assert (directory.pin_count(KEYS[0]), directory.pin_count(KEYS[1])) == (2, 1)
    with pytest.raises(OwnershipError, match="neither resident nor in flight"):
        directory.pin_many([KEYS[1], KEYS[2]])  # KEYS[2] is absent: KEYS[1] is not pinned either
    assert directory.pin_count(KEYS[1]) == 1
    with pytest.raises(OwnershipError, match="holds 1 pin"):
        directory.unpin_many([KEYS[0], KEYS[1], KEYS[1]])
    assert (directory.pin_count(KEYS[0]), directory.pin_count(KEYS[1])) == (2, 1)
    directory.unpin_many([KEYS[0], KEYS[1], KEYS[0]])
    assert not directory.snapshot().pinned - {KEYS[0], KEYS[1]}  # in flight still counts as pinned
    assert (directory.pin_count(KEYS[0]), directory.pin_count(KEYS[1])) == (0, 0)


def test_abort_frees_the_slot_unless_a_waiter_pinned_it():
    directory = Directory(SLOTS)
    directory.begin_load(A, 3)
    directory.pin(A)
    with pytest.raises(OwnershipError, match="wait for it"):
        directory.abort_load(A)
    directory.unpin(A)
    assert directory.abort_load(A) == 3
    assert directory.owner_of(3) is None


def test_budget_below_one_steps_working_set_names_the_bytes_needed():
    with pytest.raises(CapacityError, match=f"needs 8 object\\(s\\) = {8 * MIB} bytes"):
        slots_for_budget(7 * MIB, MIB, working_set_objects=8)
    assert slots_for_budget(9 * MIB + 5, MIB, working_set_objects=8) == 9


def test_per_layer_pool_splits_the_budget_and_a_shared_pool_needs_one_layer():
    per_layer = SlotPool.for_budget(40 * MIB, MIB, layout=SlotLayout.PER_LAYER, num_layers=4, working_set_per_layer=2)
    assert (per_layer.num_groups, per_layer.slots_per_group) == (4, 10)
    shared = SlotPool.for_budget(4 * MIB, MIB, layout=SlotLayout.SHARED, num_layers=4, working_set_per_layer=2)
    assert (shared.num_groups, shared.slots_per_group) == (1, 4)
    with pytest.raises(CapacityError, match="working set needs 8"):
        SlotPool.for_budget(4 * MIB, MIB, layout=SlotLayout.PER_LAYER, num_layers=4, working_set_per_layer=2)


def test_fraction_rounds_down_and_rejects_less_than_one_slot():
    assert slots_for_fraction(0.25, 60) == 15
    assert slots_for_fraction(0.3, 8) == 2
    with pytest.raises(CapacityError, match="less than one slot"):
        slots_for_fraction(0.01, 8)


def test_pool_hands_out_each_slot_once_and_only_from_its_group():
    pool = SlotPool(slot_bytes=MIB, slots_per_group=2, num_groups=2)
    assert [pool.acquire(1), pool.acquire(1)] == [2, 3]
    with pytest.raises(CapacityError, match="group 1 has all 2 slots occupied"):
        pool.acquire(1)
    pool.release(3)
    with pytest.raises(OwnershipError, match="already free"):
        pool.release(3)
    assert pool.free_count(0) == 2 and pool.free_count(1) == 1


class DirectoryMachine(RuleBasedStateMachine):
    """Random operations on a pool and its directory, checked against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = SlotPool(slot_bytes=1, slots_per_group=SLOTS // 2, num_groups=2)
        self.directory = Directory(self.pool.num_slots)
        self.pins: dict[ObjectKey, int] = {}

    @rule(key=st.sampled_from(KEYS))
    def load(self, key):
        group = key.layer
        if self.pool.free_count(group) == 0:
            with pytest.raises(CapacityError):
                self.pool.acquire(group)
            return
        slot = self.pool.acquire(group)
        if self.directory.slot_of(key) is not None:
            with pytest.raises(OwnershipError):
                self.directory.begin_load(key, slot)
            self.pool.release(slot)
            return
        self.directory.begin_load(key, slot)

    @rule(key=st.sampled_from(KEYS), slot=st.integers(0, SLOTS - 1))
    def load_into_an_occupied_slot(self, key, slot):
        owner = self.directory.owner_of(slot)
        if owner is not None and self.directory.slot_of(key) is None:
            with pytest.raises(OwnershipError, match="already holds"):
                self.directory.begin_load(key, slot)
            assert self.directory.owner_of(slot) == owner

    @rule(key=st.sampled_from(KEYS))
    def finish(self, key):
        if self.directory.is_in_flight(key):
            self.directory.finish_load(key)
        else:
            with pytest.raises(OwnershipError):
                self.directory.finish_load(key)

    @rule(key=st.sampled_from(KEYS))
    def pin(self, key):
        if self.directory.slot_of(key) is None:
            with pytest.raises(OwnershipError):
                self.directory.pin(key)
        else:
            self.directory.pin(key)
            self.pins[key] = self.pins.get(key, 0) + 1

    @rule(key=st.sampled_from(KEYS))
    def unpin(self, key):
        if self.pins.get(key, 0) == 0:
            with pytest.raises(OwnershipError):
                self.directory.unpin(key)
        else:
            self.directory.unpin(key)
            self.pins[key] -= 1

    @rule(key=st.sampled_from(KEYS))
    def evict(self, key):
        was_resident = self.directory.is_resident(key)
        if not was_resident or self.pins.get(key, 0) > 0:
            slot = self.directory.slot_of(key)
            with pytest.raises(OwnershipError):
                self.directory.evict(key)
            assert self.directory.slot_of(key) == slot  # a refused eviction changes nothing
            return
        self.pool.release(self.directory.evict(key))
        self.pins.pop(key, None)

    @invariant()
    def occupancy_never_exceeds_slots_and_matches_the_pool(self):
        snapshot = self.directory.snapshot()
        slots = list(snapshot.resident.values()) + list(snapshot.in_flight.values())
        assert len(slots) == len(set(slots)) <= self.pool.num_slots
        for group in range(self.pool.num_groups):
            used = [s for s in slots if self.pool.group_of_slot(s) == group]
            assert len(used) + self.pool.free_count(group) == self.pool.slots_per_group

    @invariant()
    def pinned_keys_are_still_placed(self):
        for key, count in self.pins.items():
            if count > 0:
                assert self.directory.slot_of(key) is not None and self.directory.is_pinned(key)


TestDirectoryMachine = DirectoryMachine.TestCase
TestDirectoryMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
