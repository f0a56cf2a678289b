"""What a lookup hands back: one handle per Engram layer and submit, and per-layer row counts.

A handle resolves to the CUDA event recorded after its layer's rows (or None on a host without
CUDA); ``wait()`` makes the current stream wait for that event only, so a layer never waits for
another layer's rows.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerLookupStats:
    """Rows one layer asked for, distinct rows among them, and rows read from its table.

    ``distinct_rows`` is None for layers that do not de-duplicate (fused and resident gathers);
    ``fetched_rows`` leaves out rows served by a hot-row cache (for a host table: the rows that
    crossed the link).
    """

    requested_rows: int
    distinct_rows: int | None
    fetched_rows: int


class LookupHandle:
    """Rows ``[B, P, heads, row_dim]`` of one Engram layer for one submit."""

    def __init__(self, layer_id: int, rows: torch.Tensor, ready: Future, keepalive: object) -> None:
        self.layer_id = layer_id
        self._rows = rows
        self._ready = ready  # resolves to the CUDA event after the rows, or None on a host without CUDA
        self._keepalive = keepalive  # inputs the side stream may still read

    def done(self) -> bool:
        """True when the rows are complete (never blocks)."""
        if not self._ready.done():
            return False
        event = self._ready.result()
        return event is None or event.query()

    def wait(self) -> torch.Tensor:
        """Make the current stream wait for this layer's rows (only) and return them."""
        event = self._ready.result()
        if event is not None:
            torch.cuda.current_stream(self._rows.device).wait_event(event)
        self._keepalive = None
        return self._rows


def resolved(value: object) -> Future:
    """A future that is already done with ``value`` (for handles whose rows were ready at submit)."""
    future: Future = Future()
    future.set_result(value)
    return future
