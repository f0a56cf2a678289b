"""Reintegration: a returning rank is refilled; healthy ranks' resident experts never move."""

from __future__ import annotations

import pytest
from repair_helpers import EXPERT_BYTES, FABRIC, deployment

from tiermem.errors import RepairError
from tiermem.repair.coverage import find_gaps
from tiermem.repair.fabric import Route
from tiermem.repair.membership import Membership
from tiermem.repair.planner import Sources, plan_repair
from tiermem.repair.reintegration import plan_reintegration, rebalance_targets

FAILED_RANK = 1


def repaired_then_rejoining(setup):
    """Rank 1 fails, a repair fills its gaps elsewhere, then it comes back with empty HBM."""
    membership = Membership(setup.placement.num_ranks)
    membership.mark_failed(FAILED_RANK)
    repair = plan_repair(setup.placement, membership.view(), FABRIC, Sources(setup.backups), expert_bytes=EXPERT_BYTES,
                         expert_load=setup.load)
    membership.begin_rejoin(FAILED_RANK)
    return repair.apply(setup.placement), membership


def test_reintegration_only_moves_into_the_returning_rank():
    setup = deployment(num_layers=2, num_experts=8, num_ranks=4, slots_per_rank=3, replicate=True,
                       dram_experts_per_node=4)
    current, membership = repaired_then_rejoining(setup)
    plan = plan_reintegration(current, membership.view(), {FAILED_RANK}, FABRIC, Sources(setup.backups),
                              expert_bytes=EXPERT_BYTES, home=setup.placement)
    assert plan.complete and plan.moves
    assert all(m.dst_rank == FAILED_RANK and m.evicts is None for m in plan.moves)
    after = plan.apply(current)
    for layer in range(after.num_layers):
        for rank in set(range(4)) - {FAILED_RANK}:
            assert after.experts_on(layer, rank) == current.experts_on(layer, rank)
        assert after.experts_on(layer, FAILED_RANK) == setup.placement.experts_on(layer, FAILED_RANK)
    assert find_gaps(after, range(4)) == ()


def test_reintegration_copies_from_a_peer_gpu_when_that_is_the_fastest_source():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=3)  # no host copies, disk only
    current, membership = repaired_then_rejoining(setup)
    plan = plan_reintegration(current, membership.view(), {FAILED_RANK}, FABRIC, Sources(setup.backups),
                              expert_bytes=EXPERT_BYTES)
    # The repair put rank 1's experts on healthy GPUs: NVLink (rank 0, same node) or GPUDirect RDMA beat the disk.
    assert {m.route for m in plan.moves} <= {Route.NVLINK, Route.GPU_RDMA}
    for move in plan.moves:
        assert current.slots[move.layer][move.src_physical] == move.expert
        assert move.sender_rank == current.rank_of(move.src_physical) != FAILED_RANK


def test_releasable_slots_are_the_emergency_replicas_the_returning_rank_covers_again():
    setup = deployment(num_layers=2, num_experts=8, num_ranks=4, slots_per_rank=3, dram_experts_per_node=4)
    current, membership = repaired_then_rejoining(setup)
    plan = plan_reintegration(current, membership.view(), {FAILED_RANK}, FABRIC, Sources(setup.backups),
                              expert_bytes=EXPERT_BYTES, home=setup.placement)
    emergency = {(layer, p) for layer in range(2) for p in range(12)
                 if current.slots[layer][p] != setup.placement.slots[layer][p]}
    assert emergency and set(plan.releasable) == emergency


def test_rebalance_targets_favour_the_most_load_per_live_replica():
    setup = deployment(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=3)
    load = [[1.0, 1, 1, 1, 1, 1, 1, 80.0]]
    targets = rebalance_targets(setup.placement, frozenset({0, 2, 3}), FAILED_RANK, load)
    # Expert 7 (80 over 1 replica) first; then 2 and 3, whose only replicas were on the returning rank.
    assert targets == ((7, 2, 3),)


def test_only_a_rejoining_rank_can_be_reintegrated():
    setup = deployment()
    with pytest.raises(RepairError, match="rank 1 is alive at epoch 0; only a rejoining rank is refilled"):
        plan_reintegration(setup.placement, Membership(4).view(), {FAILED_RANK}, FABRIC, Sources(setup.backups),
                           expert_bytes=EXPERT_BYTES)


def test_targets_with_a_duplicate_expert_are_refused():
    setup = deployment(num_layers=1)
    _, membership = repaired_then_rejoining(setup)
    with pytest.raises(RepairError, match="must be distinct experts"):
        plan_reintegration(setup.placement, membership.view(), {FAILED_RANK}, FABRIC, Sources(setup.backups),
                           expert_bytes=EXPERT_BYTES, targets={FAILED_RANK: [(5, 5, None)]})
