"""The executor on one CPU rank: bytes land exact from every tier, progress, degraded serving, timeouts."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from repair_helpers import write_checkpoint

from tiermem.errors import RepairError, TransferError
from tiermem.experts.checkpoint import CheckpointExperts
from tiermem.manager import TierManager
from tiermem.repair.backup import BackupMap, BackupTier, HostCopy
from tiermem.repair.executor import RepairExecutor
from tiermem.repair.fabric import FabricConfig, Route
from tiermem.repair.membership import Membership
from tiermem.repair.placement import EpPlacement
from tiermem.repair.planner import PlannerConfig, Sources, plan_repair
from tiermem.repair.routing import RoutingTable
from tiermem.repair.sources import TensorSlots, TieredReader

NUM_LAYERS, NUM_EXPERTS, HIDDEN, INTERMEDIATE = 2, 4, 16, 8
SLOTS_PER_RANK = 4  # rank 0: experts 0, 1 and two free slots; rank 1: experts 2, 3 and two free slots
DEAD_RANK = 1
TIER_BYTES = 1 << 20
DRAM = HostCopy(BackupTier.DRAM, 0)
CXL = HostCopy(BackupTier.CXL, 0)
POOL = HostCopy(BackupTier.CXL_POOL, None)
# The gaps (experts 2 and 3 of both layers) come from four different places: DRAM, CXL, the pool, the disk.
BACKUPS = BackupMap((((), (), (DRAM,), (CXL,)), ((), (), (POOL,), ())))


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "experts.safetensors"
    write_checkpoint(path, num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, hidden=HIDDEN, intermediate=INTERMEDIATE,
                     seed=3)
    with CheckpointExperts(path) as experts:
        yield experts


@pytest.fixture
def tiers():
    config = {"tiers": [
        {"kind": "dram", "capacity_bytes": TIER_BYTES, "arena_bytes": "256KiB"},
        {"kind": "cxl", "backing": "emulated", "capacity_bytes": TIER_BYTES, "arena_bytes": "256KiB"},
        {"kind": "sim", "name": "slow", "capacity_bytes": TIER_BYTES, "bandwidth_gbps": 0.0002, "latency_us": 0.0,
         "arena_bytes": "256KiB"},
    ]}
    with TierManager.from_config(config) as manager:
        yield manager


def packed(checkpoint, layer: int, expert: int) -> torch.Tensor:
    block = torch.zeros(checkpoint.layout.block_bytes, dtype=torch.uint8)
    checkpoint.layout.pack_into(checkpoint.tensors(layer, expert), block)
    return block


def host_copy(manager: TierManager, tier: str, block: torch.Tensor) -> torch.Tensor:
    copy = manager.empty(block.numel(), tier=tier)
    copy.copy_(block)
    return copy


def setup_rank0(checkpoint, manager, *, copies_tier: str | None = None):
    """Plan the repair of rank 1's experts and build rank 0's executor with its host copies."""
    placement = EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_ranks=2,
                                       slots_per_rank=SLOTS_PER_RANK)
    membership = Membership(2)
    membership.mark_failed(DEAD_RANK)
    view = membership.view()
    block_bytes = checkpoint.layout.block_bytes
    plan = plan_repair(placement, view, FabricConfig(gpus_per_node=2), Sources(BACKUPS), expert_bytes=block_bytes)
    host = {(0, 2): host_copy(manager, copies_tier or "dram", packed(checkpoint, 0, 2)),
            (0, 3): host_copy(manager, copies_tier or "cxl", packed(checkpoint, 0, 3))}
    pool = {(1, 2): host_copy(manager, copies_tier or "cxl", packed(checkpoint, 1, 2))}
    slots = TensorSlots(torch.zeros(NUM_LAYERS, SLOTS_PER_RANK, block_bytes, dtype=torch.uint8), rank=0,
                        slots_per_rank=SLOTS_PER_RANK)
    reader = TieredReader(host=host, pool=pool, checkpoint=checkpoint, manager=manager, staging_tier="dram")
    routing = RoutingTable(placement, view.live_ranks, view.epoch)
    return plan, RepairExecutor(manager, 0, slots, reader, routing), slots, routing, reader


def test_every_gap_lands_bit_exact_from_dram_cxl_the_pool_and_the_checkpoint(checkpoint, tiers):
    plan, executor, slots, routing, reader = setup_rank0(checkpoint, tiers)
    assert {m.route for m in plan.moves} == {Route.LOCAL_DRAM, Route.LOCAL_CXL, Route.CXL_POOL, Route.DISK}
    assert routing.snapshot().gaps(0) == (2, 3)
    report = executor.run(plan, timeout_s=10)
    reader.close()
    assert report.landed == 4 and report.nbytes == plan.nbytes and report.sent == 0
    for move in plan.moves:
        assert torch.equal(slots.slot(move.layer, move.dst_physical), packed(checkpoint, move.layer, move.expert))
    snapshot = routing.snapshot()
    assert snapshot.gaps(0) == () and snapshot.gaps(1) == ()
    assert {int(snapshot.dispatch[m.layer][m.expert]) for m in plan.moves} == {m.dst_physical for m in plan.moves}


def test_progress_events_arrive_one_per_move_with_running_totals(checkpoint, tiers):
    plan, executor, _, _, reader = setup_rank0(checkpoint, tiers)
    events = []
    executor.run(plan, on_event=events.append, timeout_s=10)
    reader.close()
    assert [e.moves_done for e in events] == [1, 2, 3, 4]
    assert [e.bytes_done for e in events] == [k * plan.moves[0].nbytes for k in (1, 2, 3, 4)]
    assert sorted((e.move.layer, e.move.expert) for e in events) == sorted((m.layer, m.expert) for m in plan.moves)
    assert all(a.landed_s <= b.landed_s for a, b in itertools.pairwise(events))


def test_serving_sees_gaps_close_one_by_one_while_copies_land(checkpoint, tiers):
    plan, executor, _, routing, reader = setup_rank0(checkpoint, tiers, copies_tier="slow")  # 20 ms per expert
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            snapshot = routing.snapshot()
            seen.append((snapshot.version, len(snapshot.gaps(0)) + len(snapshot.gaps(1))))
            time.sleep(1e-4)

    server = threading.Thread(target=serve)
    server.start()
    executor.run(plan, timeout_s=10)
    stop.set()
    server.join()
    reader.close()
    final = routing.snapshot()
    seen.append((final.version, len(final.gaps(0)) + len(final.gaps(1))))
    gap_counts = [gaps for _, gaps in sorted(set(seen))]
    assert gap_counts[0] == 4 and gap_counts[-1] == 0
    assert gap_counts == sorted(gap_counts, reverse=True) and len(set(gap_counts)) > 2


def test_a_plan_for_another_epoch_is_refused(checkpoint, tiers):
    plan, executor, _, routing, reader = setup_rank0(checkpoint, tiers)
    routing.rebuild(EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_ranks=2,
                                           slots_per_rank=SLOTS_PER_RANK), {0}, epoch=plan.epoch + 1)
    with pytest.raises(RepairError, match="plan for epoch 1 but routes at epoch 2"):
        executor.run(plan)
    reader.close()


class SilentPeer:
    """A PeerTransport whose peer never answers: every call waits out its timeout, then fails."""

    def send(self, tensor, dst_rank, *, timeout_s):
        raise AssertionError("rank 0 only receives in this plan")

    def recv(self, tensor, src_rank, *, timeout_s):
        time.sleep(timeout_s)
        raise TransferError(f"receive from EP rank {src_rank} timed out after {timeout_s} s")


def test_a_silent_peer_fails_the_repair_within_its_timeout_instead_of_hanging(checkpoint, tiers):
    # Three ranks on three nodes; rank 2 failed; rank 1's host DRAM holds the backups: an RDMA read.
    placement = EpPlacement.contiguous(num_layers=1, num_logical_experts=3, num_ranks=3, slots_per_rank=2)
    membership = Membership(3)
    membership.mark_failed(2)
    backups = BackupMap((((), (), (HostCopy(BackupTier.DRAM, 1),)),))
    plan = plan_repair(placement, membership.view(), FabricConfig(gpus_per_node=1), Sources(backups),
                       expert_bytes=4096, config=PlannerConfig(routes=(Route.RDMA_DRAM,)))
    assert [(m.route, m.sender_rank, m.dst_rank) for m in plan.moves] == [(Route.RDMA_DRAM, 1, 0)]
    slots = TensorSlots(torch.zeros(1, 2, 4096, dtype=torch.uint8), rank=0, slots_per_rank=2)
    routing = RoutingTable(placement, membership.view().live_ranks, membership.epoch)
    executor = RepairExecutor(tiers, 0, slots, TieredReader(), routing, transport=SilentPeer())
    started = time.perf_counter()
    with pytest.raises(TransferError, match="rank 0 .* 1 from peers|timed out"):
        executor.run(plan, timeout_s=0.3)
    assert time.perf_counter() - started < 2.0


def test_moves_between_ranks_need_a_transport(checkpoint, tiers):
    placement = EpPlacement.contiguous(num_layers=1, num_logical_experts=3, num_ranks=3, slots_per_rank=2)
    membership = Membership(3)
    membership.mark_failed(2)
    backups = BackupMap((((), (), (HostCopy(BackupTier.DRAM, 1),)),))
    plan = plan_repair(placement, membership.view(), FabricConfig(gpus_per_node=1), Sources(backups),
                       expert_bytes=4096, config=PlannerConfig(routes=(Route.RDMA_DRAM,)))
    sender = plan.moves[0].sender_rank
    slots = TensorSlots(torch.zeros(1, 2, 4096, dtype=torch.uint8), rank=sender, slots_per_rank=2)
    executor = RepairExecutor(tiers, sender, slots, TieredReader(),
                              RoutingTable(placement, membership.view().live_ranks, membership.epoch))
    with pytest.raises(RepairError, match="has no PeerTransport"):
        executor.run(plan)
