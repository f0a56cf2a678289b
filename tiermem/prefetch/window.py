"""How many prefetch bytes the link can move unseen: the idle link time of a layer, measured.

A decode layer runs: routing reaches the host (one sync), its misses are copied (demand, on the
critical path), its experts compute; meanwhile the host prepares the next layer. Prefetch copies
queue behind the layer's demand copies, so what they may use without delaying the next layer's
demand is the rest of the layer: ``layer interval - demand bytes / link bandwidth``. The window
measures that per layer on the host clock (the interval between successive demands) and keeps an
exponential average; the prefetch budget is ``fill x bandwidth x average idle time``.

Invariants: the budget is 0 until one full layer has been measured (no blind prefetch); it never
goes negative; a layer whose demand alone filled the link leaves no room.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class LinkWindow:
    """Exponential average of the link time each layer leaves idle, and the bytes that fit in it."""

    bandwidth_gbps: float
    fill: float  # share of the idle time prefetch may fill (headroom for the measurement's noise)
    smoothing: float = 0.2  # weight of the newest layer in the average
    idle_s: float | None = None  # the average, None until measured
    _layer_start_s: float | None = None
    _layer_demand_bytes: int = 0

    def layer_started(self, now_s: float | None = None) -> None:
        """A new layer's demand arrived: close the previous layer's measurement."""
        now_s = time.perf_counter() if now_s is None else now_s
        if self._layer_start_s is not None:
            busy_s = self._layer_demand_bytes / (self.bandwidth_gbps * 1e9)
            idle_s = max(0.0, now_s - self._layer_start_s - busy_s)
            self.idle_s = idle_s if self.idle_s is None else (1 - self.smoothing) * self.idle_s + self.smoothing * idle_s
        self._layer_start_s = now_s
        self._layer_demand_bytes = 0

    def demanded(self, nbytes: int) -> None:
        """The current layer issued ``nbytes`` of demand copies."""
        self._layer_demand_bytes += nbytes

    def budget_bytes(self) -> int:
        """Prefetch bytes the link can move during one layer without delaying the next demand."""
        if self.idle_s is None:
            return 0
        return int(self.fill * self.idle_s * self.bandwidth_gbps * 1e9)
