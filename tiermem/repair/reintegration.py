"""Reintegration: fill returning ranks' slots without disturbing any healthy rank (pure plans).

A rank that comes back (``rejoining``) has empty HBM. Its targets are, per layer and local slot, the
logical expert it should hold: by default the layout it had before it failed (the placement still
lists it), or, with ``rebalance_targets``, the experts with the most load per live replica. Every move
of the plan lands on a returning rank; healthy ranks only ever act as sources (NVLink or RDMA from
their HBM), so their resident experts are neither moved nor evicted. The plan also lists, as
``releasable``, the emergency replicas a repair put on healthy ranks that the returning ranks now
cover again: the caller may free them to restore the redundancy headroom; nothing is freed for it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from tiermem.errors import RepairError
from tiermem.repair.coverage import Gap, live_replicas
from tiermem.repair.fabric import FabricConfig
from tiermem.repair.membership import Health, MembershipView
from tiermem.repair.placement import EpPlacement, SlotRef
from tiermem.repair.planner import (
    Candidate,
    PlannerConfig,
    RepairPlan,
    RouteFinder,
    Sources,
    Unfilled,
    UnfilledReason,
    build_plan,
)

Targets = Sequence[Sequence[int | None]]  # [layer][local slot] -> logical expert, or None to leave free


def plan_reintegration(
    placement: EpPlacement, view: MembershipView, ranks: Collection[int], fabric: FabricConfig, sources: Sources, *,
    expert_bytes: int, targets: Mapping[int, Targets] | None = None, home: EpPlacement | None = None,
    expert_load: Sequence[Sequence[float]] | None = None, config: PlannerConfig | None = None,
) -> RepairPlan:
    """Moves that fill the slots of the rejoining ``ranks`` with their ``targets`` (rank -> per layer and
    local slot; default: what the placement lists for them), planned together because they share links.

    ``home`` is the placement before the failure: with it, ``releasable`` lists the healthy ranks'
    slots whose content differs from home and whose expert a returning rank holds again.
    """
    config = config or PlannerConfig()
    ranks = sorted(set(ranks))
    for rank in ranks:
        if not 0 <= rank < view.world_size or view.health[rank] is not Health.REJOINING:
            state = view.health[rank].value if 0 <= rank < view.world_size else "not a rank"
            raise RepairError(
                f"reintegration: rank {rank} is {state} at epoch {view.epoch}; only a rejoining rank is refilled "
                "(call Membership.begin_rejoin first)"
            )
    targets = targets or {}
    wanted = {rank: targets.get(rank) or [placement.experts_on(layer, rank) for layer in range(placement.num_layers)]
              for rank in ranks}
    for rank, rows in wanted.items():
        _check_targets(placement, rank, rows)
    own = {rank: [placement.physical(rank, s) for s in range(placement.slots_per_rank)] for rank in ranks}
    emptied = placement.with_slots({(layer, p): None for layer in range(placement.num_layers)
                                    for slots in own.values() for p in slots})
    finder = RouteFinder(emptied, view.live_ranks, fabric, sources, config)
    demands: list[tuple[Gap, list[Candidate]]] = []
    slots: dict[tuple[int, ...], list[int]] = {}
    vacates: list[SlotRef] = []
    for rank, rows in wanted.items():
        for layer, row in enumerate(rows):
            for local, expert in enumerate(row):
                physical = own[rank][local]
                if expert is None:
                    vacates.append((layer, physical))
                    continue
                bucket = (layer, rank, physical)
                slots[bucket] = [physical]
                demands.append((Gap(layer, expert), [Candidate(bucket, rank, source)
                                                     for source in finder.routes(layer, expert, rank)]))
    unfilled = [Unfilled(gap, UnfilledReason.NO_SOURCE) for gap, c in demands if not c]
    demands = [(gap, c) for gap, c in demands if c]
    releasable = _releasable(placement, home, view, wanted) if home is not None else ()
    return build_plan(view.epoch, emptied, fabric, demands, slots, expert_bytes, expert_load, config, unfilled,
                      releasable=releasable, vacates=tuple(vacates))


def rebalance_targets(
    placement: EpPlacement, live_ranks: frozenset[int], rank: int, expert_load: Sequence[Sequence[float]],
) -> tuple[tuple[int | None, ...], ...]:
    """Per layer, the experts a (re)joining rank should hold to spread load best: repeatedly the expert
    with the highest load per live replica that the rank does not hold yet (ties: lower expert id)."""
    targets = []
    for layer in range(placement.num_layers):
        others = live_ranks - {rank}
        counts = [len(live_replicas(placement, others, layer, e)) for e in range(placement.num_logical_experts)]
        chosen: list[int | None] = []
        for _ in range(placement.slots_per_rank):
            candidates = [e for e in range(placement.num_logical_experts) if e not in chosen]
            best = max(candidates, key=lambda e: (expert_load[layer][e] / (counts[e] + 1), -e), default=None)
            chosen.append(best)
            if best is not None:
                counts[best] += 1
        targets.append(tuple(chosen))
    return tuple(targets)


def _releasable(placement: EpPlacement, home: EpPlacement, view: MembershipView,
                wanted: Mapping[int, Targets]) -> tuple[SlotRef, ...]:
    if (home.num_layers, home.num_physical) != (placement.num_layers, placement.num_physical):
        raise RepairError(
            f"reintegration: the home placement has {home.num_layers} layers x {home.num_physical} slots, the "
            f"current one {placement.num_layers} x {placement.num_physical}; pass the home of this deployment"
        )
    found = []
    live = view.live_ranks
    for layer, row in enumerate(placement.slots):
        back = {e for rows in wanted.values() for e in rows[layer] if e is not None}
        for physical, expert in enumerate(row):
            if placement.rank_of(physical) in live and expert in back and expert != home.slots[layer][physical]:
                found.append((layer, physical))
    return tuple(found)


def _check_targets(placement: EpPlacement, rank: int, targets: Targets) -> None:
    if len(targets) != placement.num_layers or any(len(row) != placement.slots_per_rank for row in targets):
        raise RepairError(
            f"reintegration: targets must be [num_layers={placement.num_layers}][slots_per_rank="
            f"{placement.slots_per_rank}] for rank {rank}"
        )
    for layer, row in enumerate(targets):
        held = [e for e in row if e is not None]
        if len(held) != len(set(held)) or any(not 0 <= e < placement.num_logical_experts for e in held):
            raise RepairError(
                f"reintegration: rank {rank}'s targets for layer {layer} ({list(row)}) must be distinct experts in "
                f"[0, {placement.num_logical_experts})"
            )
