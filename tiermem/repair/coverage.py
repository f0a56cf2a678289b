"""Coverage: which logical experts still have a replica on a live rank, and which are gaps.

A *gap* is a (layer, logical expert) with no replica on any live rank: tokens routed to it have no
GPU to go to until a repair lands a copy. Everything here is a pure function of a placement and a set
of live ranks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from tiermem.errors import RepairError
from tiermem.repair.placement import EpPlacement


@dataclass(frozen=True, order=True)
class Gap:
    """A logical expert of one layer with no live replica."""

    layer: int
    expert: int


def live_replicas(placement: EpPlacement, live_ranks: Collection[int], layer: int, expert: int) -> tuple[int, ...]:
    """Physical slots holding ``expert`` of ``layer`` on a live rank, ascending."""
    return tuple(p for p in placement.replicas(layer, expert) if placement.rank_of(p) in live_ranks)


def find_gaps(placement: EpPlacement, live_ranks: Collection[int]) -> tuple[Gap, ...]:
    """Every gap of every layer, sorted by (layer, expert)."""
    live = sorted(_checked_live(placement, live_ranks))
    gaps = []
    for layer, row in enumerate(placement.slots):
        covered = {e for rank in live for e in placement.experts_on(layer, rank)}
        gaps += [Gap(layer, e) for e in range(placement.num_logical_experts) if e not in covered]
    return tuple(gaps)


def gaps_by_layer(gaps: Iterable[Gap]) -> dict[int, tuple[int, ...]]:
    """``layer -> experts`` for the layers that have gaps."""
    grouped: dict[int, list[int]] = {}
    for gap in sorted(gaps):
        grouped.setdefault(gap.layer, []).append(gap.expert)
    return {layer: tuple(experts) for layer, experts in grouped.items()}


def _checked_live(placement: EpPlacement, live_ranks: Collection[int]) -> frozenset[int]:
    live = frozenset(live_ranks)
    outside = sorted(r for r in live if not 0 <= r < placement.num_ranks)
    if outside:
        raise RepairError(
            f"coverage: live ranks {outside} are outside the placement's {placement.num_ranks} ranks; the "
            "placement and the membership describe different deployments"
        )
    return live
