"""The repair planner: a pure function from a placement, the live ranks and the sources to a frozen plan.

For every gap it picks a destination slot on a live rank (a free slot, else one holding a redundant
replica: an expert that keeps another live replica) and a source route (``tiermem.repair.fabric``),
so that the modelled time until full coverage (the busiest link's total) is as small as the search
in ``tiermem.repair.search`` can make it: proven optimal on small instances, greedy above.

Invariants of every plan (tested): each move fills a gap or a rejoining rank's slot; no two moves
share a destination slot; a destination never ends with two replicas of one expert; an eviction
never takes an expert's last live replica; moves are ordered hottest expert first, so that degraded
serving recovers the experts that carry the most tokens first.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tiermem.config import option, require
from tiermem.errors import RepairError
from tiermem.repair.backup import BackupMap, BackupTier
from tiermem.repair.coverage import Gap, find_gaps, live_replicas
from tiermem.repair.fabric import FabricConfig, Link, LinkKind, Route
from tiermem.repair.membership import MembershipView
from tiermem.repair.placement import EpPlacement, SlotRef
from tiermem.repair.search import Option, assign

log = logging.getLogger("tiermem.repair")


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner may use and how hard it searches."""

    routes: tuple[Route, ...] = option(tuple(Route), help="Routes the planner may use (fewer: model a source mix).")
    evict_redundant: bool = option(True, help="Overwrite redundant replicas when a layer has no free slot left.")
    exact_max_moves: int = option(10, help="Search exhaustively (branch and bound) up to this many moves.")
    node_budget: int = option(200_000, help="Branch-and-bound nodes before settling for the best plan found.")

    def __post_init__(self) -> None:
        require(len(self.routes) > 0, self, "routes must name at least one route")
        require(self.exact_max_moves >= 0, self, f"exact_max_moves must be >= 0, got {self.exact_max_moves}")
        require(self.node_budget >= 1, self, f"node_budget must be >= 1, got {self.node_budget}")


@dataclass(frozen=True)
class Move:
    """Copy one expert of one layer into one slot of one rank."""

    layer: int
    expert: int
    nbytes: int
    dst_rank: int
    dst_physical: int
    evicts: int | None  # the logical expert whose redundant replica the slot held, if any
    route: Route
    holder: int | None  # source rank (HBM routes) or node (host copies); None for the pool
    sender_rank: int | None  # the rank that sends the bytes when the route crosses ranks
    src_physical: int | None  # HBM routes: the sender's slot holding the replica
    links: tuple[Link, ...]
    duration_s: float  # modelled time of this move alone (its slowest link)


class UnfilledReason(str, enum.Enum):
    NO_SOURCE = "no_source"  # no allowed route reaches a copy (all holders dead, disk disallowed)
    NO_SLOT = "no_slot"  # every live rank's slots of the layer hold experts that have no other replica


@dataclass(frozen=True)
class Unfilled:
    """A gap the plan cannot fill, and why."""

    gap: Gap
    reason: UnfilledReason


@dataclass(frozen=True)
class RepairPlan:
    """The moves of one repair (or reintegration), for the membership at ``epoch``."""

    epoch: int
    moves: tuple[Move, ...]
    unfilled: tuple[Unfilled, ...]
    makespan_s: float  # modelled time until every move landed: the busiest link's total
    link_busy_s: tuple[tuple[Link, float], ...]  # busiest first
    optimal: bool  # proven minimal makespan (small instances), else the greedy/local-search result
    releasable: tuple[SlotRef, ...] = ()  # reintegration: emergency replicas made redundant again
    vacates: tuple[SlotRef, ...] = ()  # reintegration: slots of the rejoining rank left empty

    @property
    def complete(self) -> bool:
        return not self.unfilled

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.moves)

    @property
    def bottleneck(self) -> Link | None:
        return self.link_busy_s[0][0] if self.link_busy_s else None

    def bytes_by_route(self) -> dict[Route, int]:
        totals: dict[Route, int] = {}
        for move in self.moves:
            totals[move.route] = totals.get(move.route, 0) + move.nbytes
        return totals

    def apply(self, placement: EpPlacement) -> EpPlacement:
        """The placement once every move has landed."""
        updates: dict[SlotRef, int | None] = {slot: None for slot in self.vacates}
        updates.update({(m.layer, m.dst_physical): m.expert for m in self.moves})
        return placement.with_slots(updates)


@dataclass(frozen=True)
class Sources:
    """What the planner may copy from: the host copies, and the nodes whose host memory is gone."""

    backups: BackupMap
    failed_hosts: frozenset[int] = frozenset()  # nodes whose host memory (DRAM, CXL) is gone


def plan_repair(
    placement: EpPlacement, view: MembershipView, fabric: FabricConfig, sources: Sources, *, expert_bytes: int,
    expert_load: Sequence[Sequence[float]] | None = None, config: PlannerConfig | None = None,
) -> RepairPlan:
    """Fill every gap of ``placement`` under ``view``'s live ranks (see the module docstring)."""
    config = config or PlannerConfig()
    _check_inputs(placement, view, sources, expert_bytes)
    live = view.live_ranks
    gaps = find_gaps(placement, live)
    slots = _usable_slots(placement, live, {g.layer for g in gaps}, config.evict_redundant, expert_load)
    finder = RouteFinder(placement, live, fabric, sources, config)
    demands: list[tuple[Gap, list[Candidate]]] = []
    for gap in gaps:
        candidates = [
            Candidate((gap.layer, dst), dst, source)
            for dst in sorted(live) if (gap.layer, dst) in slots
            for source in finder.routes(gap.layer, gap.expert, dst)
        ]
        demands.append((gap, candidates))
    with_slots = {layer for layer, _ in slots}
    unfilled = [Unfilled(gap, UnfilledReason.NO_SOURCE if gap.layer in with_slots else UnfilledReason.NO_SLOT)
                for gap, c in demands if not c]
    demands = [(gap, c) for gap, c in demands if c]
    return build_plan(view.epoch, placement, fabric, demands, slots, expert_bytes, expert_load, config, unfilled)


@dataclass(frozen=True)
class SourceRoute:
    """Where one copy of an expert comes from and the route it takes to a destination."""

    route: Route
    holder: int | None  # source rank (HBM routes) or node (host copies); None for the pool
    sender_rank: int | None = None  # the rank that sends the bytes when the route crosses ranks
    src_physical: int | None = None  # HBM routes: the sender's slot holding the replica


class RouteFinder:
    """Every allowed ``SourceRoute`` that can bring an expert to a destination rank (cached per node)."""

    def __init__(self, placement: EpPlacement, live: Collection[int], fabric: FabricConfig, sources: Sources,
                 config: PlannerConfig) -> None:
        self.placement, self.live, self.fabric, self.sources = placement, frozenset(live), fabric, sources
        self.allowed = frozenset(config.routes)
        self._cache: dict[tuple[int, int, int], list[SourceRoute]] = {}  # (layer, expert, destination node)
        self.sender_of_node: dict[int, int] = {}  # host memory is served by a live rank process of its node
        for rank in sorted(self.live, reverse=True):
            self.sender_of_node[fabric.node_of(rank)] = rank

    def routes(self, layer: int, expert: int, dst: int) -> list[SourceRoute]:
        key = (layer, expert, self.fabric.node_of(dst))
        if key not in self._cache:
            self._cache[key] = self._routes_to_node(layer, expert, key[2])
        return [s for s in self._cache[key] if s.src_physical is None or s.holder != dst]

    def _routes_to_node(self, layer: int, expert: int, node: int) -> list[SourceRoute]:
        """Every allowed source for a destination on ``node``, HBM replicas on every live rank included."""
        fabric = self.fabric
        found: list[SourceRoute] = []
        for physical in live_replicas(self.placement, self.live, layer, expert):
            src = self.placement.rank_of(physical)
            route = Route.NVLINK if fabric.node_of(src) == node else Route.GPU_RDMA
            found.append(SourceRoute(route, src, src, physical))
        for copy in self.sources.backups.holders(layer, expert):
            dram = copy.tier is BackupTier.DRAM
            if copy.tier is BackupTier.CXL_POOL:
                found.append(SourceRoute(Route.CXL_POOL, None))
            elif copy.node in self.sources.failed_hosts:
                continue
            elif copy.node == node:
                found.append(SourceRoute(Route.LOCAL_DRAM if dram else Route.LOCAL_CXL, copy.node))
            elif copy.node in self.sender_of_node:
                route = Route.RDMA_DRAM if dram else Route.RDMA_CXL
                found.append(SourceRoute(route, copy.node, self.sender_of_node[copy.node]))
        if self.sources.backups.checkpoint_on_disk:
            found.append(SourceRoute(Route.DISK, node))
        return [f for f in found if f.route in self.allowed]


@dataclass(frozen=True)
class Candidate:
    """One way to serve a demand: a destination (a slot group ``bucket``, e.g. ``(layer, rank)``) and a route."""

    bucket: tuple[int, ...]
    dst_rank: int
    source: SourceRoute


def build_plan(
    epoch: int, placement: EpPlacement, fabric: FabricConfig, demands: list[tuple[Gap, list[Candidate]]],
    slots: dict[tuple[int, ...], list[int]], expert_bytes: int, expert_load: Sequence[Sequence[float]] | None,
    config: PlannerConfig, unfilled: list[Unfilled], *, releasable: tuple[SlotRef, ...] = (),
    vacates: tuple[SlotRef, ...] = (),
) -> RepairPlan:
    """Search the assignment of ``demands`` to candidates and turn it into a plan.

    ``slots`` maps each candidate bucket to its usable physical slots, best first (free, then the
    coldest redundant replicas); each chosen candidate takes the next slot of its bucket.
    """
    load = (lambda g: expert_load[g.layer][g.expert]) if expert_load is not None else (lambda g: 0.0)
    demands = sorted(demands, key=lambda d: (-load(d[0]), d[0]))  # hottest first: ties and shortfalls favour them
    buckets = {key: index for index, key in enumerate(sorted(slots))}
    seconds = {kind: fabric.profile(kind).transfer_time_s(expert_bytes) for kind in LinkKind}
    links: dict[Link, int] = {}
    made: dict[tuple, Option] = {}  # identical (bucket, route, holder, destination) options are shared
    options = []
    for gap, candidates in demands:
        row = []
        for c in candidates:
            key = (c.bucket, c.source.route, c.source.holder, c.dst_rank)
            if key not in made:
                route_links = fabric.route_links(c.source.route, c.source.holder, c.dst_rank)
                loads = tuple((links.setdefault(link, len(links)), seconds[link.kind]) for link in route_links)
                made[key] = Option(buckets[c.bucket], loads)
            row.append(made[key])
        options.append(row)
    capacities = [len(slots[key]) for key in sorted(slots)]
    result = assign(options, capacities, len(links), exact_max_demands=config.exact_max_moves,
                    node_budget=config.node_budget)

    chosen = sorted(((gap, candidates[index]) for (gap, candidates), index in zip(demands, result.choice)
                     if index is not None), key=lambda gc: (-load(gc[0]), gc[0]))
    unfilled = unfilled + [Unfilled(gap, UnfilledReason.NO_SLOT)
                           for (gap, _), index in zip(demands, result.choice) if index is None]
    taken: dict[tuple[int, ...], int] = {}
    moves = []
    for gap, c in chosen:
        physical = slots[c.bucket][taken.get(c.bucket, 0)]
        taken[c.bucket] = taken.get(c.bucket, 0) + 1
        src = c.source
        route_links = fabric.route_links(src.route, src.holder, c.dst_rank)
        moves.append(Move(
            layer=gap.layer, expert=gap.expert, nbytes=expert_bytes, dst_rank=c.dst_rank, dst_physical=physical,
            evicts=placement.slots[gap.layer][physical], route=src.route, holder=src.holder,
            sender_rank=src.sender_rank, src_physical=src.src_physical, links=route_links,
            duration_s=max(seconds[link.kind] for link in route_links),
        ))
    busy: dict[Link, float] = {}
    for move in moves:
        for link in move.links:
            busy[link] = busy.get(link, 0.0) + seconds[link.kind]
    link_busy = tuple(sorted(busy.items(), key=lambda kv: (-kv[1], kv[0])))
    if unfilled:
        log.warning("repair plan at epoch %d leaves %d gap(s) unfilled: %s", epoch, len(unfilled),
                    ", ".join(f"layer {u.gap.layer} expert {u.gap.expert} ({u.reason.value})" for u in unfilled[:8]))
    return RepairPlan(
        epoch=epoch, moves=tuple(moves), unfilled=tuple(sorted(unfilled, key=lambda u: u.gap)),
        makespan_s=link_busy[0][1] if link_busy else 0.0, link_busy_s=link_busy, optimal=result.optimal,
        releasable=releasable, vacates=vacates,
    )


def _usable_slots(
    placement: EpPlacement, live: frozenset[int], layers: Collection[int], evict_redundant: bool,
    expert_load: Sequence[Sequence[float]] | None,
) -> dict[tuple[int, ...], list[int]]:
    """``(layer, live rank) -> physical slots`` a repair may overwrite: free ones, then redundant replicas
    (every live replica of an expert but its first), coldest first."""
    usable: dict[tuple[int, ...], list[int]] = {}
    for layer in sorted(layers):
        row = placement.slots[layer]
        spare: dict[int, list[int]] = {}
        if evict_redundant:
            for expert in range(placement.num_logical_experts):
                for physical in live_replicas(placement, live, layer, expert)[1:]:
                    spare.setdefault(placement.rank_of(physical), []).append(physical)
        heat = expert_load[layer] if expert_load is not None else [0.0] * placement.num_logical_experts
        for rank in sorted(live):
            free = [p for p in range(placement.physical(rank, 0), placement.physical(rank + 1, 0)) if row[p] is None]
            redundant = sorted(spare.get(rank, ()), key=lambda p, row=row, heat=heat: (heat[row[p]], p))
            if free or redundant:
                usable[(layer, rank)] = free + redundant
    return usable


def _check_inputs(placement: EpPlacement, view: MembershipView, sources: Sources, expert_bytes: int) -> None:
    if view.world_size != placement.num_ranks:
        raise RepairError(
            f"repair planner: the membership has {view.world_size} ranks but the placement {placement.num_ranks}; "
            "build both for the same deployment"
        )
    shape = (len(sources.backups.copies), len(sources.backups.copies[0]) if sources.backups.copies else 0)
    if shape != (placement.num_layers, placement.num_logical_experts):
        raise RepairError(
            f"repair planner: the backup map covers {shape[0]} layers x {shape[1]} experts but the placement has "
            f"{placement.num_layers} x {placement.num_logical_experts}; plan the backup for this placement"
        )
    if expert_bytes <= 0:
        raise RepairError(f"repair planner: expert_bytes must be > 0, got {expert_bytes}")
