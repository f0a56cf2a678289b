"""Small value types shared by every layer: object keys, tier kinds and link profiles.

Invariant: nothing here knows about models; an ``ObjectKey`` is opaque to the memory layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TierKind(str, enum.Enum):
    """What kind of memory a tier is, fastest first."""

    HBM = "hbm"
    DRAM = "dram"
    CXL = "cxl"
    RDMA = "rdma"
    DISK = "disk"
    SIM = "sim"

    @property
    def is_host(self) -> bool:
        """True for tiers whose bytes live in this host's memory (usable for DMA to a GPU)."""
        return self in (TierKind.DRAM, TierKind.CXL, TierKind.SIM)


@dataclass(frozen=True, order=True)
class ObjectKey:
    """Names one movable object: an expert of a layer, or one Engram table row group.

    ``kind`` says what it is (``"expert"``, ``"engram"``), ``table`` which table or weight set,
    ``layer`` and ``index`` where it sits. The memory layer never interprets these fields.
    """

    kind: str
    table: str
    layer: int
    index: int

    def __post_init__(self) -> None:
        # keys are hashed hundreds of times per layer by directories, planners and policies: hash once
        object.__setattr__(self, "_hash", hash((self.kind, self.table, self.layer, self.index)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ObjectKey], tuple[str, str, int, int]]:
        return ObjectKey, (self.kind, self.table, self.layer, self.index)  # string hashes differ per process

    def __str__(self) -> str:
        return f"{self.kind}:{self.table}:{self.layer}:{self.index}"


@dataclass(frozen=True)
class LinkProfile:
    """Bandwidth and latency of one path between two tiers, measured or declared."""

    bandwidth_gbps: float
    latency_us: float
    measured: bool = False
    emulated: bool = False

    def transfer_time_s(self, nbytes: int) -> float:
        """Modelled seconds to move ``nbytes`` over this path (latency plus size / bandwidth)."""
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)
