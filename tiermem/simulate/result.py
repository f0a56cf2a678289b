"""What a replay measured: counts per layer and overall, every rate derived from them.

Invariant: a ``SimResult`` holds counts only; results of disjoint sequence sets under one
configuration add up (``combine``), so cross-fitted folds report as one replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tiermem.errors import ConfigError
from tiermem.simulate.config import SimConfig
from tiermem.simulate.cost import Timing, sum_timings


@dataclass(frozen=True)
class LayerStats:
    """Demands and hits of one traced layer."""

    layer: int
    demands: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.demands if self.demands else 0.0


@dataclass(frozen=True)
class SimResult:
    """Counts of one replay; every rate is derived from them."""

    trace: str
    config: SimConfig
    slots_per_layer: int
    per_layer: tuple[LayerStats, ...]
    steps: int
    tokens: int
    demand_loads: int
    prefetch_loads: int
    prefetch_used: int  # prefetched experts used before being evicted
    prefetch_cancelled: int  # prefetches dropped unfinished when their layer was routed (cost model only)
    late_hits: int  # hits still in flight when their layer was routed: the layer waited (cost model only)
    timing: Timing | None

    @property
    def demands(self) -> int:
        return sum(s.demands for s in self.per_layer)

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.per_layer)

    @property
    def hit_rate(self) -> float:
        """Hits over all (step, layer, expert) demands."""
        return self.hits / self.demands if self.demands else 0.0

    @property
    def on_time_hit_rate(self) -> float:
        """Hits already landed when their layer was routed (equals ``hit_rate`` without a cost model)."""
        return (self.hits - self.late_hits) / self.demands if self.demands else 0.0

    @property
    def mean_layer_hit_rate(self) -> float:
        """Unweighted mean of the per-layer hit rates."""
        rates = [s.hit_rate for s in self.per_layer if s.demands]
        return float(np.mean(rates)) if rates else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0



def combine(results: Sequence[SimResult]) -> SimResult:
    """One result from replays of disjoint sequence sets under the same config (e.g. cross-fitted folds)."""
    first = results[0]
    if any(r.config != first.config or r.slots_per_layer != first.slots_per_layer for r in results):
        raise ConfigError("simulate: only results of one configuration can be combined")
    per_layer = tuple(
        LayerStats(stats[0].layer, sum(s.demands for s in stats), sum(s.hits for s in stats))
        for stats in zip(*(r.per_layer for r in results))
    )
    timings = [r.timing for r in results if r.timing is not None]
    return SimResult(
        trace=first.trace, config=first.config, slots_per_layer=first.slots_per_layer, per_layer=per_layer,
        steps=sum(r.steps for r in results), tokens=sum(r.tokens for r in results),
        demand_loads=sum(r.demand_loads for r in results), prefetch_loads=sum(r.prefetch_loads for r in results),
        prefetch_used=sum(r.prefetch_used for r in results),
        prefetch_cancelled=sum(r.prefetch_cancelled for r in results), late_hits=sum(r.late_hits for r in results),
        timing=sum_timings(timings) if len(timings) == len(results) else None,
    )
