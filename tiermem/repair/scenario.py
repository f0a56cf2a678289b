"""DeepSeek-V3-sized EP deployments and their modelled repair and reintegration times, per source mix.

The model: DeepSeek-V3 (58 MoE layers, 256 routed experts of 3 x 7168 x 2048 weights: 44,040,192
bytes in fp8 without its 128x128 block scales, which add 10,752 bytes; 88,080,384 in bf16), spread
over N ranks with ``256 / N`` home experts plus ``redundant_slots_per_rank`` replicas of the hottest
experts per rank and layer (EPLB-style). Expert load is synthetic and Zipf-distributed (exponent
``load_skew``, a seeded permutation per layer): it only decides which experts are hot.

A scenario fails one GPU (its host memory survives) or a whole node (its GPUs and host memory), plans
the repair with ``plan_repair`` and, once the failed ranks return, the reintegration with
``plan_reintegration``. Times are the planner's fluid link model (``tiermem.repair.fabric``): data
movement only. Detection and communicator re-formation are inputs (``detect_s``, ``reform_s``),
stated wherever results are shown, never measured here.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from dataclasses import dataclass

from tiermem.config import option, require
from tiermem.repair.backup import BackupPolicyConfig, BackupScope, plan_backup
from tiermem.repair.fabric import FabricConfig, Route
from tiermem.repair.membership import Membership
from tiermem.repair.placement import EpPlacement, replicate_hottest
from tiermem.repair.planner import PlannerConfig, RepairPlan, Sources, plan_repair
from tiermem.repair.reintegration import plan_reintegration

DEEPSEEK_V3_MOE_LAYERS = 58
DEEPSEEK_V3_ROUTED_EXPERTS = 256
DEEPSEEK_V3_EXPERT_PARAMS = 3 * 7168 * 2048

# Published reference points (the EEP paper, as cited in tiermem issue 7), seconds.
EEP_RECOVERY_PAUSE_S = 11.0
EEP_REINTEGRATION_S = 8.0
FULL_RESTART_UNAVAILABLE_S = 348.0


class ExpertDtype(str, enum.Enum):
    FP8 = "fp8"
    BF16 = "bf16"

    @property
    def bytes_per_param(self) -> int:
        return 1 if self is ExpertDtype.FP8 else 2


class Failure(str, enum.Enum):
    GPU = "gpu"  # rank 0's GPU or process dies; its node's host memory (and backups) survive
    NODE = "node"  # every GPU of node 0 and its host memory are lost


@dataclass(frozen=True)
class SourceMix:
    """Which host copies exist (fractions of experts) and which routes the repair may use."""

    name: str
    description: str
    dram_fraction: float  # of the experts a node serves, hottest first, backed up in its DRAM
    cxl_fraction: float  # the next ones, on its CXL expander
    pool_fraction: float  # of all experts, hottest unbacked first, in the shared CXL pool
    routes: tuple[Route, ...]
    scope: BackupScope = BackupScope.OWN_NODE


_ALL_ROUTES = tuple(Route)
SOURCE_MIXES = (
    SourceMix("disk", "checkpoint reload of the lost experts only", 0, 0, 0, (Route.DISK,)),
    SourceMix("cxl-pool", "every expert in a shared CXL pool", 0, 0, 1, (Route.CXL_POOL,)),
    SourceMix("node-cxl", "each node's experts on its CXL expander", 0, 1, 0, (Route.LOCAL_CXL, Route.RDMA_CXL)),
    SourceMix("node-dram", "each node's experts in its DRAM", 1, 0, 0, (Route.LOCAL_DRAM, Route.RDMA_DRAM)),
    SourceMix("ring-dram", "each node's experts in the next node's DRAM", 1, 0, 0, (Route.LOCAL_DRAM, Route.RDMA_DRAM),
              BackupScope.NEXT_NODE),
    SourceMix("moc-partial", "hottest 25% in node DRAM, rest on disk", 0.25, 0, 0,
              (Route.LOCAL_DRAM, Route.RDMA_DRAM, Route.DISK)),
    SourceMix("tiered", "hottest 25% DRAM, next 50% CXL, rest in the pool, any route", 0.25, 0.5, 1, _ALL_ROUTES),
)


@dataclass(frozen=True)
class ScenarioConfig:
    """One deployment and one failure."""

    num_ranks: int = option(help="EP ranks (GPUs); 256 must divide evenly over them.")
    num_moe_layers: int = option(DEEPSEEK_V3_MOE_LAYERS, help="MoE layers modelled (DeepSeek-V3 has 58).")
    gpus_per_node: int = option(8, help="GPUs per node.")
    redundant_slots_per_rank: int = option(1, help="Slots per rank and layer beyond the home experts.")
    dtype: ExpertDtype = option(ExpertDtype.FP8, help="Expert weight dtype: fp8 (44 MB) or bf16 (88 MB).")
    failure: Failure = option(Failure.GPU, help="What fails: one GPU, or a whole node with its host memory.")
    load_skew: float = option(1.0, help="Zipf exponent of the synthetic expert load.")
    seed: int = option(0, help="Seed of the synthetic load.")
    detect_s: float = option(1.0, help="Assumed failure detection time (heartbeat timeout), seconds.")
    reform_s: float = option(0.0, help="Assumed communicator re-formation time, seconds.")

    def __post_init__(self) -> None:
        require(self.num_ranks >= 2 and DEEPSEEK_V3_ROUTED_EXPERTS % self.num_ranks == 0, self,
                f"num_ranks must be >= 2 and divide {DEEPSEEK_V3_ROUTED_EXPERTS}, got {self.num_ranks}")
        require(self.num_ranks % self.gpus_per_node == 0 and self.num_ranks > self.gpus_per_node, self,
                f"num_ranks ({self.num_ranks}) must be a multiple of gpus_per_node ({self.gpus_per_node}) and span "
                "at least two nodes")
        require(self.redundant_slots_per_rank >= 0, self, "redundant_slots_per_rank must be >= 0")
        require(self.num_moe_layers >= 1, self, f"num_moe_layers must be >= 1, got {self.num_moe_layers}")
        require(self.detect_s >= 0 and self.reform_s >= 0, self, "detect_s and reform_s must be >= 0")

    @property
    def expert_bytes(self) -> int:
        return DEEPSEEK_V3_EXPERT_PARAMS * self.dtype.bytes_per_param


@dataclass(frozen=True)
class ScenarioResult:
    """The modelled repair and reintegration of one scenario under one source mix."""

    config: ScenarioConfig
    mix: SourceMix
    gaps: int
    repair: RepairPlan
    reintegration: RepairPlan
    plan_wall_s: float  # how long the planner itself took, on this machine

    @property
    def degraded_s(self) -> float:
        """From the failure until every gap is filled: detection + re-formation + repair transfers."""
        return self.config.detect_s + self.config.reform_s + self.repair.makespan_s


def synthetic_load(config: ScenarioConfig) -> list[list[float]]:
    rng = random.Random(config.seed)
    rows = []
    for _ in range(config.num_moe_layers):
        order = rng.sample(range(DEEPSEEK_V3_ROUTED_EXPERTS), DEEPSEEK_V3_ROUTED_EXPERTS)
        row = [0.0] * DEEPSEEK_V3_ROUTED_EXPERTS
        for rank, expert in enumerate(order):
            row[expert] = 1.0 / (rank + 1) ** config.load_skew
        rows.append(row)
    return rows


def home_placement(config: ScenarioConfig, load: list[list[float]]) -> EpPlacement:
    placement = EpPlacement.contiguous(
        num_layers=config.num_moe_layers, num_logical_experts=DEEPSEEK_V3_ROUTED_EXPERTS, num_ranks=config.num_ranks,
        slots_per_rank=DEEPSEEK_V3_ROUTED_EXPERTS // config.num_ranks + config.redundant_slots_per_rank,
    )
    return replicate_hottest(placement, load)


def run_scenario(config: ScenarioConfig, mix: SourceMix, fabric: FabricConfig, *, load: list[list[float]] | None = None,
                 home: EpPlacement | None = None) -> ScenarioResult:
    """Plan the repair of ``config.failure`` and the reintegration of the failed ranks under ``mix``."""
    load = load if load is not None else synthetic_load(config)
    home = home if home is not None else home_placement(config, load)
    fabric = dataclasses.replace(fabric, gpus_per_node=config.gpus_per_node)
    served = home.slots_per_rank * config.gpus_per_node * config.num_moe_layers  # every slot of a node
    all_experts = DEEPSEEK_V3_ROUTED_EXPERTS * config.num_moe_layers
    policy = BackupPolicyConfig(
        dram_bytes_per_node=round(mix.dram_fraction * served) * config.expert_bytes,
        cxl_bytes_per_node=round(mix.cxl_fraction * served) * config.expert_bytes,
        cxl_pool_bytes=round(mix.pool_fraction * all_experts) * config.expert_bytes, scope=mix.scope,
    )
    backups = plan_backup(home, fabric, policy, expert_bytes=config.expert_bytes, expert_load=load)
    failed = {0} if config.failure is Failure.GPU else set(range(config.gpus_per_node))
    lost_hosts = frozenset() if config.failure is Failure.GPU else frozenset({0})
    membership = Membership(config.num_ranks)
    membership.mark_failed_many(failed)
    planner = PlannerConfig(routes=mix.routes)
    started = time.perf_counter()
    view = membership.view()
    repair = plan_repair(home, view, fabric, Sources(backups, lost_hosts), expert_bytes=config.expert_bytes,
                         expert_load=load, config=planner)
    gaps = len(repair.moves) + len(repair.unfilled)
    for rank in sorted(failed):
        membership.begin_rejoin(rank)
    # Returning ranks may also copy from peers' HBM and reload from disk. A returning node's host memory
    # comes back empty: its copies stay lost.
    reintegration = plan_reintegration(
        repair.apply(home), membership.view(), failed, fabric, Sources(backups, lost_hosts),
        expert_bytes=config.expert_bytes, home=home, expert_load=load,
        config=PlannerConfig(routes=tuple(sorted(set(mix.routes) | {Route.NVLINK, Route.GPU_RDMA, Route.DISK}))),
    )
    return ScenarioResult(config, mix, gaps, repair, reintegration, time.perf_counter() - started)
