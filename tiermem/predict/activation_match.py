"""MoE-Infinity-style predictor: match the sequence's expert activation matrix to recorded ones.

MoE-Infinity (Xue et al., 2024) keeps a collection of per-request expert activation matrices (EAMs:
``[layers, experts]`` counts over a whole request), finds the recorded EAM closest in cosine
similarity to the running request's partial EAM, and prefetches the experts that matched EAM used at
the layers ahead.

Invariants:
- The collection holds one EAM per training sequence, each layer row normalised to sum to 1.
- The query EAM is ``context.activation`` (this sequence's counts before this step) plus this step's
  routing so far; with no history at all the predictor falls back to the collection's mean.
- A target layer's scores are the mean of the ``neighbors`` nearest EAMs' rows for that layer, plus a
  small share of that mean for ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiermem.config import option, require
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, layers_ahead, multi_hot
from tiermem.predict.registry import PREDICTORS
from tiermem.predict.trace import RouteTrace

_TIE_BREAK = 1e-3


@dataclass(frozen=True)
class ActivationMatchConfig:
    """How many recorded activation matrices vote for a prediction."""

    neighbors: int = option(1, help="nearest recorded activation matrices averaged (MoE-Infinity uses 1)")

    def __post_init__(self) -> None:
        require(self.neighbors >= 1, self, "neighbors must be >= 1")


class ActivationMatchPredictor:
    """Nearest-neighbour matching of expert activation matrices (MoE-Infinity)."""

    reads_hidden = False  # routing history only: no copy of the router input (Predictor)

    def __init__(self, collection: np.ndarray, config: ActivationMatchConfig = ActivationMatchConfig()) -> None:
        self.collection = _normalise_rows(np.asarray(collection, dtype=np.float32))  # [S, L, E]
        flat = self.collection.reshape(len(self.collection), -1)
        self._keys = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        self._mean = self.collection.mean(axis=0)
        self.config = config

    @classmethod
    def fit(cls, trace: RouteTrace, config: ActivationMatchConfig = ActivationMatchConfig()) -> ActivationMatchPredictor:
        matrices = [multi_hot(trace.experts[rows], trace.num_experts).sum(axis=0) for _, rows in trace.sequence_rows()]
        return cls(np.stack(matrices), config)

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        _, num_layers, num_experts = self.collection.shape
        check_context(context, distance, num_layers=num_layers, num_experts=num_experts, who="activation-match")
        query = multi_hot(context.current, num_experts)
        if context.activation is not None:
            query = query + context.activation
        flat = query.reshape(context.batch_size, -1)
        norms = np.linalg.norm(flat, axis=1, keepdims=True)
        similarity = (flat / np.maximum(norms, 1e-12)) @ self._keys.T  # [B, S]
        count = min(self.config.neighbors, len(self.collection))
        nearest = np.argpartition(-similarity, count - 1, axis=1)[:, :count]  # [B, n]
        matched = self.collection[nearest].mean(axis=1)  # [B, L, E]
        matched = np.where(norms[:, :, None] > 0, matched, self._mean)
        targets = [layer for _, layer in layers_ahead(context.layer, distance, num_layers)]
        scores = matched[:, targets].transpose(1, 0, 2) + _TIE_BREAK * self._mean[targets][:, None]
        return scores.astype(np.float32)


def _normalise_rows(matrices: np.ndarray) -> np.ndarray:
    total = matrices.sum(axis=-1, keepdims=True)
    return np.divide(matrices, total, out=np.zeros_like(matrices), where=total > 0)


PREDICTORS.register("activation-match", ActivationMatchConfig,
                    lambda config, trace: ActivationMatchPredictor.fit(trace, config))
