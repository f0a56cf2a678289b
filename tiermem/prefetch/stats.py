"""Counters of a prefetcher: demands, hits, misses, prefetch use and bytes moved; rates are derived."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PrefetchStats:
    """Counts since the prefetcher started; rates are derived."""

    demands: int = 0  # (layer, object) needs of the steps served
    hits: int = 0  # needed and resident or in flight when demanded
    late: int = 0  # hits that were still in flight (the compute stream may have waited)
    misses: int = 0  # fetched on demand
    extra_waves: int = 0  # layers that needed more objects than their slot group holds, beyond the first wave
    prefetch_loads: int = 0
    prefetch_used: int = 0  # prefetched objects demanded before being evicted
    prefetch_evicted_unused: int = 0
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    prefetch_capped: int = 0  # prefetch plans cut short by the link window
    bytes_by_tier: Counter = field(default_factory=Counter)  # source tier -> bytes copied to HBM
    stall_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.demands if self.demands else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched objects that were used."""
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Share of the objects that had to be copied for a demand that prefetch had already brought."""
        fetched = self.prefetch_used + self.misses
        return self.prefetch_used / fetched if fetched else 0.0

    def as_dict(self) -> dict:
        counts = {k: v for k, v in self.__dict__.items() if k != "bytes_by_tier"}
        return {**counts, "bytes_by_tier": dict(self.bytes_by_tier), "hit_rate": self.hit_rate,
                "prefetch_precision": self.prefetch_precision, "prefetch_recall": self.prefetch_recall}
