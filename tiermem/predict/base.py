"""The predictor protocol: from what is known at a point of a decode step, score the experts ahead.

Invariants:
- A predictor has one method, ``predict(context, distance)``; data (trained tables, models, router
  weights) arrives through its constructor.
- ``RouteContext`` holds only what a serving engine knows at that instant: the current step's routing
  up to and including ``layer``, the previous step's routing of the same sequences, each sequence's
  activation counts before this step, token ids, and optionally the input of the anchor layer's
  router (known once that layer is routed). Anything about the future is absent by construction (evaluation relies on this: no leakage).
- Layers ahead are counted past the end of the model into the next step: with ``L`` layers,
  distance ``d`` after ``layer`` means layer ``(layer + d) % L`` of step ``t + (layer + d) // L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class RouteContext:
    """What a serving engine knows right after ``layer`` has been routed in the current step.

    Shapes use B = tokens in the batch, L = MoE layers, K = top-k, E = experts per layer.
    """

    num_experts: int
    layer: int  # the last routed layer of this step; -1 before the first layer is routed
    current: np.ndarray  # int16 [B, L, K]; entries for layers > ``layer`` are -1
    previous: np.ndarray | None = None  # int16 [B, L, K] previous step of the same sequences, or None
    activation: np.ndarray | None = None  # float32 [B, L, E] per-sequence expert counts before this step
    token_ids: np.ndarray | None = None  # int64 [B] token ids of this step
    hidden: torch.Tensor | None = None  # [B, H] input of layer ``layer``'s router (-1: the first layer's input)

    @property
    def batch_size(self) -> int:
        return int(self.current.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.current.shape[1])


@runtime_checkable
class Predictor(Protocol):
    """Scores every expert of each of the next ``distance`` layers, per token.

    A predictor may also say, as a ``reads_hidden`` attribute, whether ``predict`` reads ``context.hidden``;
    a runtime then copies the router input to the host together with the routing (one wait for both)
    only for one that does. Without the attribute it is assumed to read it."""

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        """Return float32 scores ``[distance, B, E]``; higher means more likely to be routed to."""
        ...
