"""Live routing state: builds the ``RouteContext`` a predictor sees after each routed MoE layer.

A step is one forward pass; a new step starts when a layer position is routed that is not after the
last one. Shapes: B tokens in the pass, L MoE layers, K top-k, E experts.

Invariants (those of ``tiermem.predict.base.RouteContext``): ``current`` holds this step's routing at
positions up to the one just routed and -1 above; ``previous`` and ``activation`` describe earlier
steps of the same rows and exist only while consecutive passes have the same number of tokens (decode
of one batch); a pass with a different B (a prefill, a new batch) starts them afresh. The arrays are
the tracker's own and stay valid until the next ``record``; predictors must not keep or modify them.
"""

from __future__ import annotations

import numpy as np
import torch

from tiermem.predict.base import RouteContext


class RouteTracker:
    """Routing of the current and previous step, and per-row expert counts of the steps before."""

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.step = -1
        self._last_position: int | None = None
        self._current: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._activation: np.ndarray | None = None

    @property
    def current(self) -> np.ndarray | None:
        return self._current

    def record(self, position: int, top_k_index: np.ndarray,
               hidden: torch.Tensor | None = None) -> tuple[RouteContext, int]:
        """Record the routing ``[B, K]`` of layer ``position``; returns the context (with ``hidden``, that
        layer's router input, for predictors that read it) and the tick."""
        rows = int(top_k_index.shape[0])
        if self._last_position is None or position <= self._last_position or self._current.shape[0] != rows:
            self._start_step(rows)
        self._current[:, position] = top_k_index
        self._last_position = position
        context = RouteContext(
            num_experts=self.num_experts, layer=position, current=self._current,
            previous=self._previous, activation=self._activation, hidden=hidden,
        )
        return context, self.step * self.num_layers + position

    def _start_step(self, rows: int) -> None:
        self.step += 1
        finished = self._current
        if finished is not None and finished.shape[0] == rows:
            self._previous = finished
            token, layer, slot = np.nonzero(finished >= 0)
            np.add.at(self._activation, (token, layer, finished[token, layer, slot].astype(np.int64)), 1.0)
        else:
            self._previous = None
            self._activation = np.zeros((rows, self.num_layers, self.num_experts), dtype=np.float32)
        self._current = np.full((rows, self.num_layers, self.top_k), -1, dtype=np.int16)
