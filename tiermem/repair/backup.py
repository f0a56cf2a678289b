"""Backups: which host tiers hold a copy of each expert, and the partial-backup policy that decides it.

The checkpoint on disk holds every expert; host copies (node DRAM, node CXL, a shared CXL pool) are
faster sources that cost memory. With less host memory than experts, a partial backup keeps the
hottest experts in the fastest tier, MoC-System style (expert load as the priority), so that the
experts that carry the most tokens are restored first and fastest.

Policy (``plan_backup``, pure): each node backs up the experts its own GPUs serve (or, with scope
``next_node``, those of the next node in a ring), hottest first, into its DRAM budget and then its CXL
budget; the CXL pool then takes, hottest first, the experts that no node backed up; everything else
is on disk only. A node-local copy makes a GPU failure a PCIe copy on the same node; a next-node copy
survives the loss of a whole node, at RDMA speed.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tiermem.config import option, require
from tiermem.errors import RepairError
from tiermem.repair.fabric import FabricConfig
from tiermem.repair.placement import EpPlacement


class BackupScope(str, enum.Enum):
    """Whose experts a node's DRAM and CXL back up."""

    OWN_NODE = "own_node"  # its own GPUs': a GPU failure is repaired over PCIe on the same node
    NEXT_NODE = "next_node"  # node n + 1's (a ring): a whole-node failure leaves the copies alive


class BackupTier(str, enum.Enum):
    """A host tier that may hold a copy of an expert."""

    DRAM = "dram"
    CXL = "cxl"
    CXL_POOL = "cxl_pool"


@dataclass(frozen=True, order=True)
class HostCopy:
    """One host copy: its tier and node (``None`` for the pool, which every node reaches)."""

    tier: BackupTier
    node: int | None


@dataclass(frozen=True)
class BackupMap:
    """Host copies per ``[layer][logical expert]``; ``checkpoint_on_disk`` says the disk holds all."""

    copies: tuple[tuple[tuple[HostCopy, ...], ...], ...]
    checkpoint_on_disk: bool = True

    def holders(self, layer: int, expert: int) -> tuple[HostCopy, ...]:
        return self.copies[layer][expert]

    def count(self, tier: BackupTier) -> int:
        """How many host copies are in ``tier`` (an expert backed up on two nodes counts twice)."""
        return sum(c.tier is tier for row in self.copies for held in row for c in held)

    @classmethod
    def disk_only(cls, num_layers: int, num_logical_experts: int) -> BackupMap:
        return cls(tuple(((),) * num_logical_experts for _ in range(num_layers)))


@dataclass(frozen=True)
class BackupPolicyConfig:
    """Host memory set aside for expert backups (0 disables a tier)."""

    dram_bytes_per_node: int = option(0, help="DRAM per node for copies of the experts its GPUs serve.",
                                      unit="bytes")
    cxl_bytes_per_node: int = option(0, help="CXL expander memory per node, filled after its DRAM.", unit="bytes")
    cxl_pool_bytes: int = option(0, help="Shared CXL pool for experts no node backed up.", unit="bytes")
    scope: BackupScope = option(BackupScope.OWN_NODE, help="Whose experts a node backs up: own_node or next_node.")
    checkpoint_on_disk: bool = option(True, help="The checkpoint is readable on every node (the last resort).")

    def __post_init__(self) -> None:
        for name in ("dram_bytes_per_node", "cxl_bytes_per_node", "cxl_pool_bytes"):
            require(getattr(self, name) >= 0, self, f"{name} must be >= 0, got {getattr(self, name)}")


def plan_backup(
    placement: EpPlacement, fabric: FabricConfig, policy: BackupPolicyConfig, *, expert_bytes: int,
    expert_load: Sequence[Sequence[float]] | None = None,
) -> BackupMap:
    """Decide the host copies of every expert (see the module docstring); ``expert_load`` is
    ``[num_layers][num_logical_experts]``, uniform when omitted (ties go to lower layer, then expert)."""
    if expert_bytes <= 0:
        raise RepairError(f"backup: expert_bytes must be > 0, got {expert_bytes}")
    layers, experts = placement.num_layers, placement.num_logical_experts
    load = expert_load if expert_load is not None else [[1.0] * experts for _ in range(layers)]
    if len(load) != layers or any(len(row) != experts for row in load):
        raise RepairError(f"backup: expert_load must be [num_layers={layers}][num_logical_experts={experts}]")

    def hottest_first(keys: set[tuple[int, int]]) -> list[tuple[int, int]]:
        return sorted(keys, key=lambda k: (-load[k[0]][k[1]], k))

    copies: dict[tuple[int, int], list[HostCopy]] = {}
    num_nodes = fabric.node_of(placement.num_ranks - 1) + 1
    for node in range(num_nodes):
        backed = node if policy.scope is BackupScope.OWN_NODE else (node + 1) % num_nodes
        ranks = range(backed * fabric.gpus_per_node, min((backed + 1) * fabric.gpus_per_node, placement.num_ranks))
        served = {
            (layer, expert)
            for layer in range(layers) for rank in ranks
            for expert in placement.experts_on(layer, rank) if expert is not None
        }
        budgets = [(BackupTier.DRAM, policy.dram_bytes_per_node // expert_bytes),
                   (BackupTier.CXL, policy.cxl_bytes_per_node // expert_bytes)]
        ranked = hottest_first(served)
        start = 0
        for tier, capacity in budgets:
            for key in ranked[start:start + capacity]:
                copies.setdefault(key, []).append(HostCopy(tier, node))
            start += capacity
    unbacked = {(layer, expert) for layer in range(layers) for expert in range(experts)} - set(copies)
    for key in hottest_first(unbacked)[: policy.cxl_pool_bytes // expert_bytes]:
        copies.setdefault(key, []).append(HostCopy(BackupTier.CXL_POOL, None))
    table = tuple(tuple(tuple(sorted(copies.get((layer, e), ()))) for e in range(experts)) for layer in range(layers))
    return BackupMap(table, policy.checkpoint_on_disk)
