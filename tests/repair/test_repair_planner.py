"""The repair planner: no gap left, optimal on small cases (brute force), sources and evictions."""

from __future__ import annotations

import itertools
import random

import pytest
from repair_helpers import EXPERT_BYTES, FABRIC, deployment

from tiermem.errors import RepairError
from tiermem.repair.backup import BackupPolicyConfig, BackupTier, HostCopy, plan_backup
from tiermem.repair.coverage import find_gaps, live_replicas
from tiermem.repair.fabric import Route
from tiermem.repair.membership import Membership
from tiermem.repair.placement import EpPlacement
from tiermem.repair.planner import PlannerConfig, RouteFinder, Sources, UnfilledReason, plan_repair


def failed(world_size: int, *ranks: int):
    membership = Membership(world_size)
    membership.mark_failed_many(set(ranks))
    return membership.view()


def brute_force_makespan(placement: EpPlacement, view, sources: Sources, config: PlannerConfig) -> float:
    """Every (destination rank, source) per gap, within each rank's free slots; the best busiest link."""
    live = view.live_ranks
    finder = RouteFinder(placement, live, FABRIC, sources, config)
    gaps = find_gaps(placement, live)
    free = {(layer, r): sum(e is None for e in placement.experts_on(layer, r)) for layer in range(placement.num_layers)
            for r in live}
    options = [[(dst, s) for dst in sorted(live) if free[(g.layer, dst)] for s in finder.routes(g.layer, g.expert, dst)]
               for g in gaps]
    best = float("inf")
    for choice in itertools.product(*options):
        used: dict[tuple[int, int], int] = {}
        busy: dict = {}
        for gap, (dst, source) in zip(gaps, choice):
            used[(gap.layer, dst)] = used.get((gap.layer, dst), 0) + 1
            for link in FABRIC.route_links(source.route, source.holder, dst):
                busy[link] = busy.get(link, 0.0) + FABRIC.seconds(link, EXPERT_BYTES)
        if all(n <= free[key] for key, n in used.items()):
            best = min(best, max(busy.values()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plans_on_small_deployments_are_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    setup = deployment(num_layers=2, num_experts=4, num_ranks=4, slots_per_rank=2,
                       dram_experts_per_node=rng.randint(0, 4), cxl_experts_per_node=rng.randint(0, 2),
                       pool_experts=rng.randint(0, 2))
    view = failed(4, rng.randrange(4))
    sources = Sources(setup.backups)
    config = PlannerConfig(exact_max_moves=8)
    plan = plan_repair(setup.placement, view, FABRIC, sources, expert_bytes=EXPERT_BYTES, config=config)
    assert plan.optimal and plan.complete
    assert plan.makespan_s == pytest.approx(brute_force_makespan(setup.placement, view, sources, config))


@pytest.mark.parametrize("replicate", [False, True])
@pytest.mark.parametrize("dead", [{3}, {4}, {0, 5}, {2, 3}, {4, 5}])  # with replicas of hot ones, all leave gaps
def test_no_gap_is_left_after_applying_a_plan(dead, replicate):
    setup = deployment(num_layers=3, num_experts=12, num_ranks=6, slots_per_rank=4, replicate=replicate,
                       dram_experts_per_node=3, pool_experts=6)
    view = failed(6, *dead)
    gaps = find_gaps(setup.placement, view.live_ranks)
    plan = plan_repair(setup.placement, view, FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES,
                       expert_load=setup.load)
    assert plan.complete and len(plan.moves) == len(gaps) > 0
    assert sorted((m.layer, m.expert) for m in plan.moves) == [(g.layer, g.expert) for g in gaps]
    repaired = plan.apply(setup.placement)
    assert find_gaps(repaired, view.live_ranks) == ()
    destinations = [(m.layer, m.dst_physical) for m in plan.moves]
    assert len(destinations) == len(set(destinations))
    assert all(m.dst_rank in view.live_ranks for m in plan.moves)


def test_evictions_only_take_replicas_that_have_another_live_copy():
    setup = deployment(num_layers=2, num_experts=8, num_ranks=4, slots_per_rank=3, replicate=True)
    view = failed(4, 1)
    plan = plan_repair(setup.placement, view, FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES,
                       expert_load=setup.load)
    repaired = plan.apply(setup.placement)
    evicted = [(m.layer, m.evicts) for m in plan.moves if m.evicts is not None]
    assert evicted, "every slot was full, so the repair must overwrite redundant replicas"
    for layer, expert in evicted:
        assert live_replicas(repaired, view.live_ranks, layer, expert)
    assert find_gaps(repaired, view.live_ranks) == ()


def test_a_same_node_dram_copy_goes_over_pcie_and_other_nodes_read_it_over_rdma():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=4, dram_experts_per_node=8)
    view = failed(4, 0)  # node 0 = ranks 0, 1; its host DRAM still holds rank 0's experts
    config = PlannerConfig(routes=(Route.LOCAL_DRAM, Route.RDMA_DRAM))
    plan = plan_repair(setup.placement, view, FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES, config=config)
    for move in plan.moves:
        assert move.route is (Route.LOCAL_DRAM if FABRIC.node_of(move.dst_rank) == 0 else Route.RDMA_DRAM)
        assert move.sender_rank == (None if move.route is Route.LOCAL_DRAM else 1)
    assert {m.route for m in plan.moves} == {Route.LOCAL_DRAM}  # PCIe at 4 GB/s beats the 2 GB/s host NIC


def test_the_load_spreads_over_pcie_rdma_and_disk_to_the_optimal_mix():
    setup = deployment(num_layers=4, num_experts=8, num_ranks=4, slots_per_rank=4, dram_experts_per_node=8)
    plan = plan_repair(setup.placement, failed(4, 0), FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES)
    # 8 gaps; per expert: rank 1's PCIe 0.25 ms, node 0's host NIC 0.5 ms, node 1's disk 1 ms.
    # Best: 5 through rank 1's PCIe (1.25 ms), 2 over RDMA (1 ms), 1 from disk (1 ms); one link: 2 ms.
    assert plan.optimal and plan.makespan_s == pytest.approx(1.25e-3)
    assert {m.route for m in plan.moves} == {Route.LOCAL_DRAM, Route.RDMA_DRAM, Route.DISK}
    assert plan.makespan_s == pytest.approx(max(s for _, s in plan.link_busy_s))


def test_copies_on_a_failed_host_are_not_used():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=4, dram_experts_per_node=8)
    view = failed(4, 0, 1)  # the whole of node 0
    plan = plan_repair(setup.placement, view, FABRIC, Sources(setup.backups, failed_hosts=frozenset({0})),
                       expert_bytes=EXPERT_BYTES)
    assert plan.complete and {m.route for m in plan.moves} == {Route.DISK}


def test_a_gap_with_no_reachable_copy_is_reported_not_dropped():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=4, dram_experts_per_node=1)
    view = failed(4, 0)
    config = PlannerConfig(routes=(Route.LOCAL_DRAM,))
    plan = plan_repair(setup.placement, view, FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES,
                       expert_load=setup.load, config=config)
    assert len(plan.moves) == 1 and plan.moves[0].expert == 0  # the hottest: the only one in DRAM
    assert [(u.gap.expert, u.reason) for u in plan.unfilled] == [(1, UnfilledReason.NO_SOURCE)]
    assert not plan.complete


def test_a_gap_with_no_slot_left_is_reported():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=2)  # no spare slot at all
    plan = plan_repair(setup.placement, failed(4, 2), FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES)
    assert {u.reason for u in plan.unfilled} == {UnfilledReason.NO_SLOT} and len(plan.unfilled) == 2


def test_moves_are_ordered_hottest_expert_first():
    setup = deployment(num_layers=3, num_experts=8, num_ranks=4, slots_per_rank=4, dram_experts_per_node=8)
    plan = plan_repair(setup.placement, failed(4, 0), FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES,
                       expert_load=setup.load)
    heat = [setup.load[m.layer][m.expert] for m in plan.moves]
    assert heat == sorted(heat, reverse=True)


def test_the_partial_backup_keeps_the_hottest_served_experts_in_dram_then_cxl():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=2)
    backups = plan_backup(setup.placement, FABRIC, BackupPolicyConfig(dram_bytes_per_node=EXPERT_BYTES,
                          cxl_bytes_per_node=2 * EXPERT_BYTES, cxl_pool_bytes=EXPERT_BYTES),
                          expert_bytes=EXPERT_BYTES, expert_load=setup.load)
    node0 = [backups.holders(0, e) for e in range(4)]  # node 0 serves experts 0-3, hottest first
    pool = HostCopy(BackupTier.CXL_POOL, None)  # the pool takes the hottest expert no node backed up: 3, not 7
    assert node0 == [(HostCopy(BackupTier.DRAM, 0),), (HostCopy(BackupTier.CXL, 0),), (HostCopy(BackupTier.CXL, 0),),
                     (pool,)]
    assert backups.holders(0, 7) == () and backups.count(BackupTier.CXL_POOL) == 1
    assert backups.count(BackupTier.DRAM) == 2 and backups.count(BackupTier.CXL) == 4


def test_a_membership_of_another_size_is_refused():
    setup = deployment()
    with pytest.raises(RepairError, match="membership has 5 ranks but the placement 4"):
        plan_repair(setup.placement, Membership(5).view(), FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES)
