"""``dram``: host DRAM on one NUMA node, bound with mbind and registered for GPU DMA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem import numa
from tiermem.config import option, require
from tiermem.tiers.base import TIERS, ArenaTier, BuildContext
from tiermem.tiers.hostmem import CudaRegistration, HostMapping
from tiermem.types import LinkProfile, TierKind

# Declared until measured: pinned H2D on the lent H100 (PCIe Gen5 x16), FACTS.md.
DRAM_LINK = LinkProfile(bandwidth_gbps=55.0, latency_us=10.0)


@dataclass(frozen=True)
class DramTierConfig:
    """Host DRAM on a NUMA node."""

    capacity_bytes: int = option(help="Most bytes this tier may hold (arenas are mapped on demand up to it).",
                                 unit="bytes")
    name: str = option("dram", help="Name used to address this tier, e.g. tm.empty(..., tier='dram').")
    numa_node: int | None = option(None, help="NUMA node to bind pages to; None leaves placement to the kernel.")
    arena_bytes: int = option(256 << 20, help="Size of each mapping; bigger objects get an arena of their own.",
                              unit="bytes")
    alignment_bytes: int = option(512, help="Alignment of every allocation (power of two, >= 64).", unit="bytes")
    register_cuda: CudaRegistration = option(
        CudaRegistration.AUTO, help="cudaHostRegister each arena: auto (when a GPU is present), always, never.")
    hugepages: bool = option(True, help="Advise transparent huge pages for arenas (fewer TLB misses).")

    def __post_init__(self) -> None:
        check_host_config(self)


def check_host_config(config: object) -> None:
    """Validation shared by host tier configs."""
    alignment = config.alignment_bytes
    require(config.capacity_bytes > 0, config, f"capacity_bytes must be > 0, got {config.capacity_bytes}")
    require(config.arena_bytes > 0, config, f"arena_bytes must be > 0, got {config.arena_bytes}")
    require(alignment >= 64 and alignment & (alignment - 1) == 0, config,
            f"alignment_bytes must be a power of two >= 64, got {alignment}")
    if getattr(config, "numa_node", None) is not None:
        require(config.numa_node >= 0, config, f"numa_node must be >= 0 or None, got {config.numa_node}")


class DramTier(ArenaTier):
    """Arenas of host DRAM bound to ``numa_node`` and registered for DMA."""

    def __init__(self, config: DramTierConfig) -> None:
        if config.numa_node is not None:
            numa.check_node(config.numa_node)
        self._register = config.register_cuda.wanted(config.name)
        self._hugepages = config.hugepages
        super().__init__(
            name=config.name, kind=TierKind.DRAM, capacity_bytes=config.capacity_bytes,
            arena_bytes=config.arena_bytes, alignment_bytes=config.alignment_bytes, link=DRAM_LINK,
            device=torch.device("cpu"), numa_node=config.numa_node,
        )

    def _map(self, nbytes: int) -> HostMapping:
        return HostMapping(nbytes, tier=self.name, numa_node=self.numa_node, register_cuda=self._register,
                           hugepages=self._hugepages)


def _build(config: DramTierConfig, context: BuildContext) -> DramTier:
    return DramTier(config)


TIERS.register(TierKind.DRAM.value, DramTierConfig, _build)
