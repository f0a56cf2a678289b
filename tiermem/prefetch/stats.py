"""Counters of a prefetcher (demands, hits, misses, prefetch use, bytes moved; rates derived) and host phase timing."""

from __future__ import annotations

import time
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
    predictions_skipped: int = 0  # prefetch decisions whose window admitted nothing, so nothing was predicted
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


class HostPhases:
    """Host time per phase of a layer (``perf_counter_ns`` laps), for finding what bounds a host-bound step.

    ``start()`` opens a lap at the layer's start; ``lap(phase)`` charges the time since the previous
    mark to ``phase``; ``layer_done()`` counts one layer. Disabled, every call returns at once.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.layers = 0
        self._ns: Counter = Counter()
        self._mark_ns = 0

    def start(self) -> None:
        if self.enabled:
            self._mark_ns = time.perf_counter_ns()

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = time.perf_counter_ns()
            self._ns[phase] += now - self._mark_ns
            self._mark_ns = now

    def layer_done(self) -> None:
        if self.enabled:
            self.layers += 1

    def us_per_layer(self) -> dict[str, float]:
        """Mean microseconds per layer of each phase, and their ``total``; empty while disabled."""
        if not self.layers:
            return {}
        out = {phase: ns / self.layers / 1e3 for phase, ns in self._ns.items()}
        return {**out, "total": sum(out.values())}

    def reset(self) -> None:
        self.layers = 0
        self._ns.clear()
