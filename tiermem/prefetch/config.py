"""``PrefetchConfig``: how far ahead and how much the prefetcher loads (distance, per-layer objects, link window)."""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.config import option, require


@dataclass(frozen=True)
class PrefetchConfig:
    """How far ahead and how much the prefetcher loads after each routed layer."""

    distance: int = option(1, help="MoE layers ahead to prefetch after each routed layer; 0 disables prefetch.")
    objects_per_layer: int = option(4, help="Most objects one prefetch may load into one target layer.")
    min_score: float = option(0.0, help="Load only objects whose summed predicted score (expected uses in the "
                                        "batch) is above this.")
    link_fill: float | None = option(1.0, help="Share of the link time left before the next layer's demand that "
                                               "prefetch may count on (objects overhanging it are admitted by "
                                               "their measured precision); None: no link cap (objects_per_layer "
                                               "alone).")
    link_gbps: float | None = option(None, help="Host-to-HBM bandwidth for the link cap; None: the source tier's "
                                                "link profile.", unit="GB/s")

    def __post_init__(self) -> None:
        require(self.distance >= 0, self, f"distance must be >= 0, got {self.distance}")
        require(self.objects_per_layer >= 0, self, f"objects_per_layer must be >= 0, got {self.objects_per_layer}")
        require(self.link_fill is None or 0.0 < self.link_fill <= 1.0, self,
                f"link_fill must be in (0, 1] or None, got {self.link_fill}")
        require(self.link_gbps is None or self.link_gbps > 0, self, f"link_gbps must be > 0, got {self.link_gbps}")
