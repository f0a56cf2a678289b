"""Which host tier is the home of each expert: hot experts on the faster tier when it is short.

``place_experts`` is a pure function: tiers are given fastest first with the bytes each may hold;
experts are ranked by popularity (all layers together, hottest first; ties by layer, then expert)
and each goes to the fastest tier that still has room. Without popularity every expert ranks equal
and the order is (layer, expert).

Invariants: every expert has exactly one home; no tier holds more than its capacity; an expert on a
slower tier is never more popular than one on a faster tier that was full when it was placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tiermem.config import format_bytes
from tiermem.errors import CapacityError, ConfigError


@dataclass(frozen=True, eq=False)
class Placement:
    """``assignment[layer_position, expert]`` indexes ``tiers`` (fastest first)."""

    tiers: tuple[str, ...]
    assignment: np.ndarray  # int8 [num_layers, num_experts], read-only

    def tier_of(self, position: int, expert: int) -> str:
        return self.tiers[int(self.assignment[position, expert])]

    def experts_on(self, tier: str) -> int:
        return int((self.assignment == self.tiers.index(tier)).sum())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.assignment.shape[0]), int(self.assignment.shape[1])


def single_tier(tier: str, num_layers: int, num_experts: int) -> Placement:
    """Every expert on ``tier``."""
    assignment = np.zeros((num_layers, num_experts), dtype=np.int8)
    assignment.flags.writeable = False
    return Placement((tier,), assignment)


def place_experts(
    tiers: Sequence[tuple[str, int]], *, num_layers: int, num_experts: int, block_bytes: int,
    popularity: np.ndarray | None = None,
) -> Placement:
    """Place every expert on ``tiers`` (``(name, capacity_bytes)``, fastest first), hottest first."""
    if not tiers:
        raise ConfigError("expert placement: at least one host tier is needed")
    shape = (num_layers, num_experts)
    if popularity is None:
        popularity = np.zeros(shape, dtype=np.float64)
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.shape != shape:
        raise ConfigError(f"expert placement: popularity has shape {popularity.shape}, expected {list(shape)}")
    total = num_layers * num_experts
    slots = [capacity // block_bytes for _, capacity in tiers]
    if sum(slots) < total:
        summary = ", ".join(f"{name} {format_bytes(capacity)}" for name, capacity in tiers)
        raise CapacityError(
            f"expert placement: {total} experts of {format_bytes(block_bytes)} need {format_bytes(total * block_bytes)} "
            f"({total * block_bytes} bytes) but the host tiers hold {sum(slots)} experts ({summary}); raise "
            "capacity_bytes of a tier or add one"
        )
    flat = popularity.reshape(-1)
    order = np.lexsort((np.arange(total), -flat))  # hottest first, ties in (layer, expert) order
    assignment = np.empty(total, dtype=np.int8)
    start = 0
    for index, count in enumerate(slots):
        assignment[order[start:start + count]] = index
        start += count
        if start >= total:
            break
    assignment = assignment.reshape(shape)
    assignment.flags.writeable = False
    return Placement(tuple(name for name, _ in tiers), assignment)
