"""Copies in flight into HBM slots: each key's own completion, and the submit it came in.

A key is in flight from its submit until it lands (``land``): until then it is never copied again.
The compute stream waits on the fewest handles that cover a wave (``handles_for``): once on a whole
submit when the wave uses every copy of it (a demand wave's misses are one submit: one wait), else on
each used copy's own completion, so a wave never waits on a copy it does not use.

Invariants: a key's completion and its submit are recorded and forgotten together; a handle is
returned at most once per call to ``handles_for``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tiermem.transfer import TransferHandle
from tiermem.types import ObjectKey


class InFlight:
    """The copies submitted and not yet landed, by key."""

    def __init__(self) -> None:
        self._part: dict[ObjectKey, TransferHandle] = {}  # key -> its own copy's completion
        self._submit: dict[ObjectKey, tuple[TransferHandle, frozenset[ObjectKey]]] = {}  # -> the whole submit

    def add(self, keys: Sequence[ObjectKey], handle: TransferHandle) -> None:
        """``keys`` were copied in one submit, ``handle``; key ``i``'s own completion is ``handle.part(i)``."""
        batch = frozenset(keys)
        for index, key in enumerate(keys):
            self._part[key] = handle.part(index)
            self._submit[key] = (handle, batch)

    def __contains__(self, key: ObjectKey) -> bool:
        return key in self._part

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(list(self._part))  # a copy: callers land keys while iterating

    def part(self, key: ObjectKey) -> TransferHandle:
        return self._part[key]

    def handles_for(self, keys: Sequence[ObjectKey]) -> tuple[list[ObjectKey], list[TransferHandle]]:
        """The keys of ``keys`` in flight, and the handles not yet done that a wave using ``keys`` waits on."""
        needed = set(keys)
        landing, waits = [], {}
        for key in keys:
            part = self._part.get(key)
            if part is not None:
                landing.append(key)
                whole, batch = self._submit[key]
                handle = whole if batch <= needed else part  # never waits on a copy this wave does not use
                waits[id(handle)] = handle
        return landing, [handle for handle in waits.values() if not handle.done()]

    def done(self) -> list[ObjectKey]:
        """The keys whose own copy has completed."""
        return [key for key, part in self._part.items() if part.done()]

    def land(self, key: ObjectKey) -> None:
        del self._part[key], self._submit[key]
