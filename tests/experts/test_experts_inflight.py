"""InFlight: a wave waits on the fewest handles that cover it, and never on a copy it does not use."""

from __future__ import annotations

from tiermem.prefetch.inflight import InFlight
from tiermem.types import ObjectKey


class Handle:
    """A submit of ``n`` copies (or one copy's part): done when told."""

    def __init__(self, name: str, n: int = 0) -> None:
        self.name, self.finished = name, False
        self.parts = [Handle(f"{name}.{i}") for i in range(n)]

    def part(self, index: int) -> Handle:
        return self.parts[index]

    def done(self) -> bool:
        return self.finished


def key(index: int) -> ObjectKey:
    return ObjectKey("expert", "t", 0, index)


def test_a_wave_using_a_whole_submit_waits_once_and_otherwise_on_its_own_copies():
    flight = InFlight()
    demand, prefetch = Handle("demand", 2), Handle("prefetch", 2)
    flight.add([key(0), key(1)], demand)
    flight.add([key(2), key(3)], prefetch)
    landing, waits = flight.handles_for([key(1), key(0), key(2), key(9)])
    assert landing == [key(1), key(0), key(2)]  # key 9 is not in flight
    assert waits == [demand, prefetch.parts[0]]  # all of demand: one wait; of prefetch only key 2's copy
    prefetch.parts[0].finished = True
    assert flight.handles_for([key(2)]) == ([key(2)], [])  # done copies are not waited on
    assert flight.done() == [key(2)]


def test_landing_forgets_a_key_and_iteration_survives_it():
    flight = InFlight()
    submit = Handle("s", 3)
    flight.add([key(0), key(1), key(2)], submit)
    assert key(1) in flight and flight.part(key(1)) is submit.parts[1]
    for k in flight:
        flight.land(k)
    assert key(1) not in flight and list(flight) == [] and flight.handles_for([key(0)]) == ([], [])
