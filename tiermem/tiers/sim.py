"""``sim``: host memory with a modelled link, for tests and simulation (distinct from emulated CXL).

Bytes really live in (unbound) host memory; when ``model_time`` is set, every transfer touching the
tier first waits for the modelled time ``latency + nbytes / bandwidth`` so that prefetch and overlap
logic can be tested on a CPU with realistic orders of magnitude.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tiermem.config import option, require
from tiermem.tiers.base import TIERS, ArenaTier, BuildContext
from tiermem.tiers.hostmem import CudaRegistration, HostMapping
from tiermem.types import LinkProfile, TierKind


@dataclass(frozen=True)
class SimTierConfig:
    """A bandwidth/latency-modelled tier."""

    capacity_bytes: int = option(help="Most bytes this tier may hold.", unit="bytes")
    name: str = option("sim", help="Name used to address this tier.")
    bandwidth_gbps: float = option(25.0, help="Modelled link bandwidth (GB/s).")
    latency_us: float = option(5.0, help="Modelled per-transfer latency (us).")
    model_time: bool = option(True, help="Wait for the modelled time before each transfer.")
    arena_bytes: int = option(64 << 20, help="Size of each mapping.", unit="bytes")
    alignment_bytes: int = option(512, help="Alignment of every allocation.", unit="bytes")
    register_cuda: CudaRegistration = option(CudaRegistration.AUTO, help="cudaHostRegister each arena.")

    def __post_init__(self) -> None:
        require(self.capacity_bytes > 0, self, f"capacity_bytes must be > 0, got {self.capacity_bytes}")
        require(self.bandwidth_gbps > 0, self, f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        require(self.latency_us >= 0, self, f"latency_us must be >= 0, got {self.latency_us}")
        require(self.alignment_bytes >= 64 and self.alignment_bytes & (self.alignment_bytes - 1) == 0, self,
                f"alignment_bytes must be a power of two >= 64, got {self.alignment_bytes}")


class SimTier(ArenaTier):
    """Host memory whose transfers take the modelled time."""

    def __init__(self, config: SimTierConfig) -> None:
        self._model_time = config.model_time
        self._register = config.register_cuda.wanted(config.name)
        super().__init__(
            name=config.name, kind=TierKind.SIM, capacity_bytes=config.capacity_bytes,
            arena_bytes=config.arena_bytes, alignment_bytes=config.alignment_bytes,
            link=LinkProfile(config.bandwidth_gbps, config.latency_us),
            device=torch.device("cpu"),
        )
        self.io_hooked = config.model_time

    def _map(self, nbytes: int) -> HostMapping:
        return HostMapping(nbytes, tier=self.name, numa_node=None, register_cuda=self._register, hugepages=False)

    def on_io(self, nbytes: int) -> None:
        if self._model_time:
            time.sleep(self.link.transfer_time_s(nbytes))


def _build(config: SimTierConfig, context: BuildContext) -> SimTier:
    return SimTier(config)


TIERS.register(TierKind.SIM.value, SimTierConfig, _build)
