"""On a GPU: the executor restores experts from pinned DRAM and (emulated) CXL tiers into HBM slots, exactly."""

from __future__ import annotations

import pytest
import torch

from tiermem.manager import TierManager
from tiermem.repair.backup import BackupMap, BackupTier, HostCopy
from tiermem.repair.executor import RepairExecutor
from tiermem.repair.fabric import FabricConfig, Route
from tiermem.repair.membership import Membership
from tiermem.repair.placement import EpPlacement
from tiermem.repair.planner import Sources, plan_repair
from tiermem.repair.routing import RoutingTable
from tiermem.repair.sources import TensorSlots, TieredReader

EXPERT_BYTES = 4 << 20
NUM_LAYERS, NUM_EXPERTS, SLOTS_PER_RANK = 3, 4, 4


@pytest.mark.gpu
def test_lost_experts_land_in_hbm_from_dram_and_cxl_byte_exact():
    placement = EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS, num_ranks=2,
                                       slots_per_rank=SLOTS_PER_RANK)
    lost = [(layer, e) for layer in range(NUM_LAYERS) for e in (2, 3)]
    tiers = {key: ("dram" if i % 2 else "cxl") for i, key in enumerate(lost)}
    copies = [[() for _ in range(NUM_EXPERTS)] for _ in range(NUM_LAYERS)]
    for (layer, expert), tier in tiers.items():
        copies[layer][expert] = (HostCopy(BackupTier.DRAM if tier == "dram" else BackupTier.CXL, 0),)
    backups = BackupMap(tuple(tuple(row) for row in copies), checkpoint_on_disk=False)
    membership = Membership(2)
    membership.mark_failed(1)
    view = membership.view()
    plan = plan_repair(placement, view, FabricConfig(gpus_per_node=2), Sources(backups), expert_bytes=EXPERT_BYTES)
    assert {m.route for m in plan.moves} == {Route.LOCAL_DRAM, Route.LOCAL_CXL}
    config = {"tiers": [{"kind": "dram", "capacity_bytes": "32MiB"},
                        {"kind": "cxl", "backing": "emulated", "capacity_bytes": "32MiB"}]}
    with TierManager.from_config(config) as manager:
        host = {}
        for key, tier in tiers.items():
            host[key] = manager.empty(EXPERT_BYTES, tier=tier)
            host[key].copy_(torch.randint(0, 256, (EXPERT_BYTES,), dtype=torch.uint8))
        slots = TensorSlots(torch.zeros(NUM_LAYERS, SLOTS_PER_RANK, EXPERT_BYTES, dtype=torch.uint8, device="cuda"),
                            rank=0, slots_per_rank=SLOTS_PER_RANK)
        routing = RoutingTable(placement, view.live_ranks, view.epoch)
        report = RepairExecutor(manager, 0, slots, TieredReader(host=host), routing).run(plan, timeout_s=30)
        assert report.landed == len(lost) and report.nbytes == len(lost) * EXPERT_BYTES
        for move in plan.moves:
            assert torch.equal(slots.slot(move.layer, move.dst_physical).cpu(), host[(move.layer, move.expert)])
        assert all(routing.snapshot().gaps(layer) == () for layer in range(NUM_LAYERS))
