"""EP coverage repair: when a rank of a wide expert-parallel deployment fails, restore every expert from
the tier hierarchy in the time the links need, while serving continues without the missing experts.

| module        | what                                                                                |
|---------------|-------------------------------------------------------------------------------------|
| membership    | ``Membership``: ranks, health (alive/failed/rejoining), the epoch; thread-safe      |
| placement     | ``EpPlacement``: logical experts -> physical slots per rank; SGLang map round trip  |
| coverage      | ``find_gaps``: experts with no live replica (pure)                                  |
| fabric        | ``FabricConfig``: link profiles per kind; ``Route``: how a copy reaches a GPU       |
| backup        | ``BackupMap``, ``plan_backup``: which host tier holds which expert (partial backup) |
| search        | exact (branch and bound) and greedy min-makespan assignment over link queues       |
| planner       | ``plan_repair`` -> frozen ``RepairPlan`` (pure)                                     |
| reintegration | ``plan_reintegration``, ``rebalance_targets``: refill a returning rank (pure)       |
| routing       | ``RoutingTable``: degraded-mode dispatch, atomic per-expert swaps                   |
| executor      | ``RepairExecutor``: runs a plan with the TierManager and a ``PeerTransport``        |
| sources       | ``TensorSlots``, ``TieredReader``: slots and source bytes of one rank               |
| transport     | ``GroupTransport``: ``PeerTransport`` over a torch.distributed group                |
| heartbeat     | ``Heartbeat``, ``FailureDetector``, ``agree_on_failures`` over a store              |
| scenario      | DeepSeek-V3-sized deployments for ``tiermem simulate repair``                       |

The loop: a ``FailureDetector`` suspects a rank, ``agree_on_failures`` fixes the failed set, the
``Membership`` moves to a new epoch, ``RoutingTable.rebuild`` drops the gaps, ``plan_repair`` decides
the moves and every live rank's ``RepairExecutor`` runs its part, restoring experts one by one.
A new source of bytes is a ``Route`` (fabric), a ``BackupTier`` (backup) and a branch of
``RouteFinder.routes`` (planner); a new way to move them between ranks is a ``PeerTransport``.
"""

from tiermem.repair.backup import BackupMap, BackupPolicyConfig, BackupScope, BackupTier, HostCopy, plan_backup
from tiermem.repair.coverage import Gap, find_gaps, gaps_by_layer, live_replicas
from tiermem.repair.executor import PeerTransport, RepairEvent, RepairExecutor, RepairReport, SlotStore, SourceReader
from tiermem.repair.fabric import FabricConfig, Link, LinkKind, Route
from tiermem.repair.heartbeat import FailureDetector, Heartbeat, agree_on_failures
from tiermem.repair.membership import Health, Membership, MembershipView
from tiermem.repair.placement import EpPlacement, replicate_hottest
from tiermem.repair.planner import (
    Move,
    PlannerConfig,
    RepairPlan,
    SourceRoute,
    Sources,
    Unfilled,
    UnfilledReason,
    plan_repair,
)
from tiermem.repair.reintegration import plan_reintegration, rebalance_targets
from tiermem.repair.routing import NOT_DISPATCHED, GapPolicy, RoutingSnapshot, RoutingTable
from tiermem.repair.sources import TensorSlots, TieredReader
from tiermem.repair.transport import GroupTransport

__all__ = [
    "NOT_DISPATCHED", "BackupMap", "BackupPolicyConfig", "BackupScope", "BackupTier", "EpPlacement", "FabricConfig",
    "FailureDetector", "Gap", "GapPolicy", "GroupTransport", "Health", "Heartbeat", "HostCopy", "Link", "LinkKind",
    "Membership", "MembershipView", "Move", "PeerTransport", "PlannerConfig", "RepairEvent", "RepairExecutor",
    "RepairPlan", "RepairReport", "Route", "RoutingSnapshot", "RoutingTable", "SlotStore", "SourceReader",
    "SourceRoute", "Sources", "TensorSlots", "TieredReader", "Unfilled", "UnfilledReason", "agree_on_failures",
    "find_gaps", "gaps_by_layer", "live_replicas", "plan_backup", "plan_reintegration", "plan_repair",
    "rebalance_targets", "replicate_hottest",
]
