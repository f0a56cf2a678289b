"""``cxl``: memory on a CXL expander (a CPU-less NUMA node or a devdax device), or emulated.

Where the host has no CXL memory, ``backing = "emulated"`` gives a tier backed by DRAM with a
declared device profile (published: +140..410 ns load latency, 26-36 GB/s per x8/x16 device).
Such a tier reports ``emulated = True`` and every figure measured on it must be labelled emulated:
its bytes move at DRAM speed; only its *declared* link profile models CXL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from tiermem import numa
from tiermem.config import option, require
from tiermem.tiers.base import TIERS, ArenaTier, BuildContext
from tiermem.tiers.dram import check_host_config
from tiermem.tiers.hostmem import CudaRegistration, HostMapping
from tiermem.types import LinkProfile, TierKind


class CxlBacking(str, enum.Enum):
    """Where a cxl tier's bytes come from."""

    NUMA = "numa"  # a CPU-less NUMA node in system-RAM mode
    DEVDAX = "devdax"  # a /dev/daxX.Y character device
    EMULATED = "emulated"  # DRAM standing in for CXL, labelled emulated everywhere


@dataclass(frozen=True)
class CxlTierConfig:
    """CXL-attached memory, real or emulated."""

    capacity_bytes: int = option(help="Most bytes this tier may hold.", unit="bytes")
    backing: CxlBacking = option(help="numa (CPU-less node), devdax (/dev/daxX.Y) or emulated (DRAM-backed).")
    name: str = option("cxl", help="Name used to address this tier.")
    numa_node: int | None = option(
        None, help="numa: the CXL node; emulated: the DRAM node standing in (None: kernel's choice).")
    dax_path: str | None = option(None, help="devdax: path of the device, e.g. /dev/dax0.0.")
    bandwidth_gbps: float = option(26.0, help="Declared GPU<->CXL bandwidth (GB/s) until measured.")
    added_latency_ns: float = option(250.0, help="Declared load latency added over local DRAM (ns).")
    arena_bytes: int = option(256 << 20, help="Size of each mapping (devdax: a multiple of 2 MiB).", unit="bytes")
    alignment_bytes: int = option(512, help="Alignment of every allocation (power of two, >= 64).", unit="bytes")
    register_cuda: CudaRegistration = option(
        CudaRegistration.AUTO, help="cudaHostRegister each arena: auto, always, never.")
    hugepages: bool = option(True, help="Advise transparent huge pages for arenas.")

    def __post_init__(self) -> None:
        check_host_config(self)
        require(self.bandwidth_gbps > 0, self, f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        require(self.added_latency_ns >= 0, self, f"added_latency_ns must be >= 0, got {self.added_latency_ns}")
        if self.backing is CxlBacking.NUMA:
            require(self.numa_node is not None, self,
                    "backing='numa' needs numa_node (a CPU-less node; `tiermem topo` lists candidates)")
        if self.backing is CxlBacking.DEVDAX:
            require(self.dax_path is not None, self, "backing='devdax' needs dax_path, e.g. '/dev/dax0.0'")
        else:
            require(self.dax_path is None, self, f"dax_path is only for backing='devdax', not {self.backing.value!r}")


class CxlTier(ArenaTier):
    """Arenas on a CXL node or devdax device; or DRAM arenas labelled as emulated CXL."""

    def __init__(self, config: CxlTierConfig) -> None:
        if config.numa_node is not None:
            numa.check_node(config.numa_node)
        self._register = config.register_cuda.wanted(config.name)
        self._dax_path = config.dax_path
        self._hugepages = config.hugepages
        emulated = config.backing is CxlBacking.EMULATED
        link = LinkProfile(bandwidth_gbps=config.bandwidth_gbps, latency_us=10.0 + config.added_latency_ns / 1e3,
                           emulated=emulated)
        super().__init__(
            name=config.name, kind=TierKind.CXL, capacity_bytes=config.capacity_bytes,
            arena_bytes=config.arena_bytes, alignment_bytes=config.alignment_bytes, link=link,
            device=torch.device("cpu"), numa_node=config.numa_node, emulated=emulated,
        )
        self.backing = config.backing

    def _map(self, nbytes: int) -> HostMapping:
        return HostMapping(nbytes, tier=self.name, numa_node=self.numa_node, register_cuda=self._register,
                           dax_path=self._dax_path, hugepages=self._hugepages)


def _build(config: CxlTierConfig, context: BuildContext) -> CxlTier:
    return CxlTier(config)


TIERS.register(TierKind.CXL.value, CxlTierConfig, _build)
