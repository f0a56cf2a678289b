"""Slot fences: a copy into slots waits on the newest last use per stream of the objects evicted from them."""

from __future__ import annotations

from tiermem.prefetch.fences import SlotFences
from tiermem.types import ObjectKey


class RecordingGate:
    def __init__(self) -> None:
        self.waited: list[str] = []

    def wait_event(self, event: str) -> None:
        self.waited.append(event)


def key(index: int) -> ObjectKey:
    return ObjectKey("expert", "w", 0, index)


def test_a_copy_into_several_slots_waits_once_per_stream_on_the_newest_last_use():
    fences, gate = SlotFences(), RecordingGate()
    fences.wave_ended([key(0), key(1)], stream=7, event="wave1")
    fences.wave_ended([key(2)], stream=7, event="wave2")
    fences.wave_ended([key(3)], stream=9, event="side")  # another stream: ordered apart from stream 7
    for k, slot in ((key(0), 0), (key(2), 1), (key(1), 2), (key(3), 3)):
        fences.evicted(k, slot)
    assert fences.fence([0, 1, 2, 3], gate) == 2
    assert sorted(gate.waited) == ["side", "wave2"]  # wave2 ends after wave1 on stream 7: it implies it


def test_a_fence_is_handed_out_once_and_only_for_the_slots_copied_into():
    fences, gate = SlotFences(), RecordingGate()
    fences.wave_ended([key(0)], stream=7, event="wave1")
    fences.wave_ended([key(1)], stream=7, event="wave2")
    fences.evicted(key(0), 0)
    fences.evicted(key(1), 1)
    assert fences.fence([0], gate) == 1 and gate.waited == ["wave1"]  # not wave2: slot 1 is not copied into
    assert fences.fence([0, 5], gate) == 0  # slot 0's fence was used; slot 5 never held a used object
    assert fences.fence([1], gate) == 1 and gate.waited == ["wave1", "wave2"]


def test_an_object_never_used_leaves_its_slot_free_at_once_and_a_later_use_replaces_an_earlier():
    fences, gate = SlotFences(), RecordingGate()
    fences.evicted(key(4), 0)  # loaded (e.g. prefetched) but never used by a wave
    assert fences.fence([0], gate) == 0
    fences.wave_ended([key(5)], stream=7, event="first")
    fences.wave_ended([key(5)], stream=7, event="second")
    fences.evicted(key(5), 2)
    fences.fence([2], gate)
    assert gate.waited == ["second"]
