"""Degraded-mode routing: gaps dropped with renormalisation, atomic per-expert swaps, stale epochs refused."""

from __future__ import annotations

import threading

import pytest
import torch

from tiermem.errors import RepairError
from tiermem.repair.placement import EpPlacement
from tiermem.repair.routing import NOT_DISPATCHED, GapPolicy, RoutingTable

# 4 experts on 2 ranks of 3 slots: rank 0 holds 0, 1 and a replica of 2; rank 1 holds 2, 3, one free slot.
PLACEMENT = EpPlacement(2, 3, 4, ((0, 1, 2, 2, 3, None),))
LIVE_WITHOUT_RANK_1 = {0}


def test_gaps_are_not_dispatched_and_covered_experts_go_to_their_first_live_replica():
    snapshot = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=1).snapshot()
    assert snapshot.dispatch[0].tolist() == [0, 1, 2, NOT_DISPATCHED]
    assert snapshot.gaps(0) == (3,)


def test_a_gap_entry_is_dropped_and_the_other_weights_keep_their_sum():
    snapshot = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=1).snapshot()
    topk_ids = torch.tensor([[0, 3], [1, 2]])
    topk_weights = torch.tensor([[0.6, 0.4], [0.5, 0.25]])
    physical, weights = snapshot.route(0, topk_ids, topk_weights)
    assert physical.tolist() == [[0, NOT_DISPATCHED], [1, 2]]
    assert torch.allclose(weights, torch.tensor([[1.0, 0.0], [0.5, 0.25]]))


def test_the_drop_policy_leaves_the_remaining_weights_alone():
    snapshot = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=1, policy=GapPolicy.DROP).snapshot()
    _, weights = snapshot.route(0, torch.tensor([[0, 3]]), torch.tensor([[0.6, 0.4]]))
    assert torch.allclose(weights, torch.tensor([[0.6, 0.0]]))


def test_a_token_whose_every_expert_is_a_gap_gets_zero_weights():
    snapshot = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=1).snapshot()
    _, weights = snapshot.route(0, torch.tensor([[3, 3]]), torch.tensor([[0.7, 0.3]]))
    assert torch.equal(weights, torch.zeros(1, 2))


def test_restore_swaps_one_expert_and_leaves_older_snapshots_untouched():
    table = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=1)
    before = table.snapshot()
    after = table.restore(0, 3, physical=2, epoch=1)  # hypothetically landed in slot 2 of rank 0
    assert before.dispatch[0].tolist() == [0, 1, 2, NOT_DISPATCHED] and before.version == 0
    assert after.dispatch[0].tolist() == [0, 1, 2, 2] and after.version == 1
    assert table.snapshot() is after


def test_a_landing_from_a_stale_epoch_is_refused():
    table = RoutingTable(PLACEMENT, LIVE_WITHOUT_RANK_1, epoch=2)
    with pytest.raises(RepairError, match="repair for epoch 1 .* the table is at epoch 2"):
        table.restore(0, 3, physical=2, epoch=1)


def test_retiring_a_dispatched_replica_moves_its_tokens_to_another_and_refuses_the_last():
    table = RoutingTable(PLACEMENT, {0, 1}, epoch=0)
    assert table.snapshot().dispatch[0][2] == 2
    assert table.retire(0, 2).dispatch[0][2] == 3  # expert 2 also lives in slot 3 (rank 1)
    with pytest.raises(RepairError, match="last live replica of expert 1"):
        table.retire(0, 1)


def test_an_expert_that_is_still_served_keeps_its_replica_when_a_copy_lands_elsewhere():
    table = RoutingTable(PLACEMENT, {0, 1}, epoch=0)
    assert table.restore(0, 3, physical=5, epoch=0).dispatch[0][3] == 4  # a reintegration copy: no switch


def test_readers_never_see_a_half_applied_change():
    experts = 64
    # rank 0's slots are empty, rank 1 (failed) held every expert: all 64 are gaps, refilled one by one.
    table = RoutingTable(EpPlacement(2, experts, experts, ((None,) * experts + tuple(range(experts)),)), {0}, epoch=0)
    stop = threading.Event()
    torn: list[int] = []

    def read():
        while not stop.is_set():
            snapshot = table.snapshot()
            served = int((snapshot.dispatch[0] != NOT_DISPATCHED).sum())
            if served != snapshot.version:  # version counts the experts restored so far
                torn.append(snapshot.version)

    reader = threading.Thread(target=read)
    reader.start()
    for expert in range(experts):
        table.restore(0, expert, physical=expert, epoch=0)
    stop.set()
    reader.join()
    assert not torn and table.snapshot().version == experts and table.snapshot().gaps(0) == ()
