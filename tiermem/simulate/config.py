"""The configuration of one simulated replay (policy, cache size, batch, prediction, conventions)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tiermem.config import option, require
from tiermem.residency.policies import EVICTION_POLICIES


class CacheLifetime(str, enum.Enum):
    """When the simulated cache starts cold."""

    PER_BATCH = "per_batch"  # each batch of sequences starts with an empty cache (batch 1: each request)
    WHOLE_TRACE = "whole_trace"  # one cache serves every batch in turn, as in a long-running server


@dataclass(frozen=True)
class SimConfig:
    """One simulated configuration."""

    policy: str = option("lru", help="Eviction policy: lru, lfu, predicted or belady (the oracle).")
    resident_fraction: float = option(0.25, help="Fraction of each layer's experts that fit in HBM (floor).")
    batch_size: int = option(1, help="Sequences decoded together, step-aligned.")
    prefetch_distance: int = option(0, help="Traced layers ahead to predict after each layer; 0 = no predictor.")
    prefetch_experts_per_layer: int = option(0, help="Most experts one prefetch may load into one layer; 0 = "
                                                     "predictions only rank evictions ('predicted' policy).")
    warm_with_prefill: bool = option(False, help="Feed prompt tokens through the cache (uncounted) first.")
    lifetime: CacheLifetime = option(CacheLifetime.PER_BATCH, help="When the cache starts cold.")
    only_complete_layers: bool = option(False, help="Drop (sequence, layer) pairs the trace marks incomplete.")
    lfu_half_life_steps: float | None = option(None, help="Half-life of LFU activation counts in steps; none.")

    def __post_init__(self) -> None:
        require(self.policy in EVICTION_POLICIES, self,
                f"unknown policy {self.policy!r}; registered: {EVICTION_POLICIES.names()}")
        require(0.0 < self.resident_fraction <= 1.0, self, f"resident_fraction must be in (0, 1], got "
                f"{self.resident_fraction}")
        require(self.batch_size >= 1, self, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.prefetch_distance >= 0 and self.prefetch_experts_per_layer >= 0, self,
                "prefetch_distance and prefetch_experts_per_layer must be >= 0")
        require(self.prefetch_distance > 0 or self.prefetch_experts_per_layer == 0, self,
                "prefetch_experts_per_layer needs prefetch_distance > 0 (the layers to predict)")
        require(self.policy != "predicted" or self.prefetch_distance > 0, self,
                "policy 'predicted' ranks by the prefetcher's scores; set prefetch_distance > 0")
