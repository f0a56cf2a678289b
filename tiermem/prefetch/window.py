"""How many prefetch bytes can land before the next demand: a host-clock model of the link's queue.

A decode layer runs: routing reaches the host (one sync), its misses are copied (demand, on the
critical path), the prefetch of the next layers is queued behind them, the host launches compute;
then the next layer's routing arrives and its misses need the link. A prefetch byte still moving
then delays that demand (copies share the link), so prefetch may use only the link time between
the end of the copies already queued and the next demand:
``budget = fill x bandwidth x max(0, lead - backlog)``, where ``lead`` is the measured host time from
a prefetch decision to the next layer's demand (exponential average: in a host-bound step that is
most of the layer, and the link is idle in it), and ``backlog`` is the time the link still needs for
every byte queued so far (a virtual clock advanced by ``bytes / bandwidth`` per submit).

Invariants: the budget is 0 until one lead has been measured (no blind prefetch); it never goes
negative; bytes already queued (demand or prefetch, of this layer or earlier ones) count against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class LinkWindow:
    """Measured lead time to the next demand, the link's queued backlog, and the bytes that fit between."""

    bandwidth_gbps: float
    fill: float  # share of the free link time prefetch may fill (headroom for the measurement's noise)
    smoothing: float = 0.2  # weight of the newest lead in the average
    lead_s: float | None = None  # average host time from a prefetch decision to the next demand; None until measured
    _busy_until_s: float = 0.0  # when the link will have moved every byte queued so far
    _decided_s: float | None = None  # host time of the last prefetch decision, until the next demand measures it

    def layer_started(self, now_s: float | None = None) -> None:
        """A layer's routing is known and its demand comes now: close the last prefetch decision's lead."""
        now_s = time.perf_counter() if now_s is None else now_s
        if self._decided_s is not None:
            lead_s = now_s - self._decided_s
            previous = lead_s if self.lead_s is None else self.lead_s
            self.lead_s = (1 - self.smoothing) * previous + self.smoothing * lead_s
            self._decided_s = None

    def queued(self, nbytes: int, now_s: float | None = None) -> None:
        """``nbytes`` of copies were submitted (demand or prefetch): they occupy the link after the backlog."""
        now_s = time.perf_counter() if now_s is None else now_s
        self._busy_until_s = max(now_s, self._busy_until_s) + nbytes / (self.bandwidth_gbps * 1e9)

    def budget_bytes(self, now_s: float | None = None) -> int:
        """Prefetch bytes that can move now and finish before the next demand; marks a prefetch decision."""
        now_s = time.perf_counter() if now_s is None else now_s
        self._decided_s = now_s
        if self.lead_s is None:
            return 0
        backlog_s = max(0.0, self._busy_until_s - now_s)
        return int(self.fill * max(0.0, self.lead_s - backlog_s) * self.bandwidth_gbps * 1e9)
