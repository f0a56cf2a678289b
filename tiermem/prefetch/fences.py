"""Stream-order fences for slot reuse: a copy into a slot waits for the last use of the object it replaces.

The end of a wave of compute is one event recorded on the compute stream; every object the wave used
remembers it as its last use, and evicting an object hands that event to the object's slot. A copy into
a set of slots must start only after each slot's event. Events recorded on one stream complete in the
order they were recorded, so the newest one per stream implies every older one: a submit waits once per
stream (in practice once), not once per slot.

Invariants: a slot's fence is the last use of the object evicted from it, until a copy takes it; a copy
into slots waits, per stream, on the newest of their fences; a fence is handed out once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from tiermem.types import ObjectKey


class Gate(Protocol):
    """What a copy is submitted behind: a stream that can wait on an event."""

    def wait_event(self, event: Any) -> None: ...


@dataclass(frozen=True)
class WaveEnd:
    """The end of one wave: ``event`` recorded on stream ``stream`` (its handle), the ``seq``-th wave end."""

    seq: int
    stream: int
    event: Any  # torch.cuda.Event (any object a ``Gate`` waits on)


class SlotFences:
    """Last uses of objects and the fences of freed slots (see the module docstring)."""

    def __init__(self) -> None:
        self._waves = 0
        self._last_use: dict[ObjectKey, WaveEnd] = {}  # key -> the end of the last wave that used it
        self._slot_free: dict[int, WaveEnd] = {}  # slot -> the end after which it may be overwritten

    def wave_ended(self, keys: Iterable[ObjectKey], stream: int, event: Any) -> None:
        """A wave that used ``keys`` ends at ``event``, recorded just now on stream ``stream``."""
        self._waves += 1
        self._last_use.update(dict.fromkeys(keys, WaveEnd(self._waves, stream, event)))

    def evicted(self, key: ObjectKey, slot: int) -> None:
        """``key`` left ``slot``: the slot's next copy waits for ``key``'s last use (if it had one)."""
        used = self._last_use.pop(key, None)
        if used is not None:
            self._slot_free[slot] = used

    def fence(self, slots: Iterable[int], gate: Gate) -> int:
        """Make ``gate`` wait until every slot of ``slots`` is free to overwrite; returns the waits issued."""
        newest: dict[int, WaveEnd] = {}
        for slot in slots:
            free = self._slot_free.pop(slot, None)
            if free is not None and (free.stream not in newest or free.seq > newest[free.stream].seq):
                newest[free.stream] = free
        for free in newest.values():
            gate.wait_event(free.event)
        return len(newest)
