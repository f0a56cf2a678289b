"""Small value types shared by every layer: object keys, tier kinds and link profiles.

Invariant: nothing here knows about models; an ``ObjectKey`` is opaque to the memory layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


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


class ObjectKey(NamedTuple):
    """Names one movable object: an expert of a layer, or one Engram table row group.

    ``kind`` says what it is (``"expert"``, ``"engram"``), ``table`` which table or weight set,
    ``layer`` and ``index`` where it sits. The memory layer never interprets these fields.
    A named tuple, so hashing and comparing a key run in C: directories, planners and policies do
    it hundreds of times per layer, and a Python-level ``__hash__`` showed up in the H100 profile.
    """

    kind: str
    table: str
    layer: int
    index: int

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
