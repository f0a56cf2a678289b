"""EP placement: SGLang physical_to_logical_map round trip, rank-major numbering, validation, replication."""

from __future__ import annotations

import pytest
import torch

from tiermem.errors import RepairError
from tiermem.repair.coverage import Gap, find_gaps, gaps_by_layer
from tiermem.repair.placement import EpPlacement, replicate_hottest

NUM_LAYERS = 3
NUM_EXPERTS = 8
NUM_RANKS = 4
SLOTS_PER_RANK = 3  # 2 home experts + 1 redundant slot per rank


def test_sglang_trivial_map_round_trips_with_rank_major_slots():
    num_physical = NUM_RANKS * SLOTS_PER_RANK
    # SGLang's ExpertLocationMetadata.init_trivial: physical p holds logical p % num_logical, every layer.
    trivial = torch.arange(num_physical).repeat(NUM_LAYERS, 1) % NUM_EXPERTS
    placement = EpPlacement.from_physical_to_logical_map(trivial, num_ranks=NUM_RANKS, num_logical_experts=NUM_EXPERTS)
    assert placement.slots_per_rank == SLOTS_PER_RANK and placement.num_layers == NUM_LAYERS
    assert placement.experts_on(0, 1) == (3, 4, 5)  # rank 1 owns physical 3, 4, 5
    assert placement.replicas(2, 1) == (1, 9) and [placement.rank_of(p) for p in (1, 9)] == [0, 3]
    assert torch.equal(placement.to_physical_to_logical_map(), trivial)


def test_a_shuffled_full_map_round_trips_exactly():
    generator = torch.Generator().manual_seed(7)
    base = torch.arange(NUM_RANKS * SLOTS_PER_RANK) % NUM_EXPERTS
    rows = []
    for layer in range(NUM_LAYERS):  # rotate the experts, then shuffle whole ranks: no rank holds one twice
        ranks = torch.roll(base, shifts=layer).view(NUM_RANKS, SLOTS_PER_RANK)
        rows.append(ranks[torch.randperm(NUM_RANKS, generator=generator)].flatten())
    table = torch.stack(rows)
    placement = EpPlacement.from_physical_to_logical_map(table, num_ranks=NUM_RANKS, num_logical_experts=NUM_EXPERTS)
    exported = placement.to_physical_to_logical_map()
    assert exported.dtype == torch.int64 and torch.equal(exported, table)


def test_export_refuses_free_slots_because_sglang_has_no_empty_value():
    placement = EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_ranks=NUM_RANKS,
                                       slots_per_rank=SLOTS_PER_RANK)
    with pytest.raises(RepairError, match="12 slot\\(s\\) are free .*replicate_hottest"):
        placement.to_physical_to_logical_map()


def test_import_refuses_a_map_that_does_not_split_over_the_ranks():
    with pytest.raises(RepairError, match="10 physical experts do not split evenly over 4 ranks"):
        EpPlacement.from_physical_to_logical_map(torch.zeros(2, 10, dtype=torch.int64), num_ranks=4,
                                                 num_logical_experts=NUM_EXPERTS)


def test_two_replicas_of_one_expert_on_one_rank_are_refused():
    with pytest.raises(RepairError, match="rank 0 holds a logical expert twice in layer 0"):
        EpPlacement(2, 2, 4, ((1, 1, 2, 3),))


def test_an_expert_id_outside_the_model_is_refused():
    with pytest.raises(RepairError, match="holds expert 9, outside \\[0, 4\\)"):
        EpPlacement(2, 2, 4, ((0, 1, 2, 9),))


def test_contiguous_places_experts_in_order_and_leaves_the_rest_free():
    placement = EpPlacement.contiguous(num_layers=1, num_logical_experts=NUM_EXPERTS, num_ranks=NUM_RANKS,
                                       slots_per_rank=SLOTS_PER_RANK)
    assert placement.experts_on(0, 2) == (4, 5, None)
    assert placement.free_slots(0) == (2, 5, 8, 11)


def test_replicate_hottest_fills_every_slot_and_the_hottest_expert_gets_the_most_replicas():
    placement = EpPlacement.contiguous(num_layers=1, num_logical_experts=NUM_EXPERTS, num_ranks=NUM_RANKS,
                                       slots_per_rank=SLOTS_PER_RANK)
    load = [[100.0, 1, 1, 1, 1, 1, 1, 50.0]]
    filled = replicate_hottest(placement, load)
    assert filled.free_slots(0) == ()
    # rank 0 already holds expert 0, so its spare slot takes 7; every other spare slot takes 0
    assert filled.replicas(0, 0) == (0, 5, 8, 11) and filled.replicas(0, 7) == (2, 10)
    filled.to_physical_to_logical_map()  # every slot filled: exportable


def test_gaps_are_the_experts_whose_every_replica_is_on_a_dead_rank():
    placement = replicate_hottest(
        EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_ranks=NUM_RANKS,
                               slots_per_rank=SLOTS_PER_RANK),
        [[8.0, 7, 6, 5, 4, 3, 2, 1]] * NUM_LAYERS,
    )
    live = {0, 2, 3}  # rank 1 (experts 2 and 3 at home) failed; its redundant slot held a replica
    gaps = find_gaps(placement, live)
    replicated = {e for e in (2, 3) if any(placement.rank_of(p) in live for p in placement.replicas(0, e))}
    assert gaps == tuple(Gap(layer, e) for layer in range(NUM_LAYERS) for e in (2, 3) if e not in replicated)
    assert set(gaps_by_layer(gaps)) == ({0, 1, 2} if gaps else set())
    assert find_gaps(placement, range(NUM_RANKS)) == ()


def test_live_ranks_outside_the_placement_are_refused():
    placement = EpPlacement.contiguous(num_layers=1, num_logical_experts=4, num_ranks=2, slots_per_rank=2)
    with pytest.raises(RepairError, match="live ranks \\[5\\] are outside the placement's 2 ranks"):
        find_gaps(placement, {0, 5})
