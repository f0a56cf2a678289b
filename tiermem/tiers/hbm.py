"""``hbm``: GPU memory, reserved as arenas of ``torch.empty`` on one CUDA device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.config import option, require
from tiermem.errors import TopologyError
from tiermem.tiers.base import TIERS, ArenaTier, BuildContext
from tiermem.types import LinkProfile, TierKind

# Declared until measured: device-to-device on the lent H100 (FACTS.md).
HBM_LINK = LinkProfile(bandwidth_gbps=3000.0, latency_us=5.0)


@dataclass(frozen=True)
class HbmTierConfig:
    """GPU memory on one device."""

    capacity_bytes: int = option(help="Most bytes of GPU memory this tier may reserve.", unit="bytes")
    name: str = option("hbm", help="Name used to address this tier.")
    device_index: int = option(0, help="CUDA device index.")
    arena_bytes: int = option(256 << 20, help="Size of each reservation.", unit="bytes")
    alignment_bytes: int = option(512, help="Alignment of every allocation (power of two, >= 64).", unit="bytes")

    def __post_init__(self) -> None:
        require(self.capacity_bytes > 0, self, f"capacity_bytes must be > 0, got {self.capacity_bytes}")
        require(self.device_index >= 0, self, f"device_index must be >= 0, got {self.device_index}")
        require(self.alignment_bytes >= 64 and self.alignment_bytes & (self.alignment_bytes - 1) == 0, self,
                f"alignment_bytes must be a power of two >= 64, got {self.alignment_bytes}")


class _DeviceMapping:
    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def close(self) -> None:
        del self.tensor


class HbmTier(ArenaTier):
    """Arenas of GPU memory."""

    def __init__(self, config: HbmTierConfig) -> None:
        if not torch.cuda.is_available():
            raise TopologyError(
                f"tier {config.name!r}: an hbm tier needs CUDA, which is not available here "
                f"(torch {torch.__version__}); remove the hbm tier or run on a GPU host"
            )
        count = torch.cuda.device_count()
        if config.device_index >= count:
            raise TopologyError(
                f"tier {config.name!r}: CUDA device {config.device_index} does not exist; this host has {count}"
            )
        super().__init__(
            name=config.name, kind=TierKind.HBM, capacity_bytes=config.capacity_bytes,
            arena_bytes=config.arena_bytes, alignment_bytes=config.alignment_bytes, link=HBM_LINK,
            device=torch.device("cuda", config.device_index),
        )

    def _map(self, nbytes: int) -> _DeviceMapping:
        return _DeviceMapping(nbytes, self.device)


def _build(config: HbmTierConfig, context: BuildContext) -> HbmTier:
    return HbmTier(config)


TIERS.register(TierKind.HBM.value, HbmTierConfig, _build)
