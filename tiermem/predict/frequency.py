"""Frequency predictor: per-layer expert popularity, optionally mixed with the sequence's own counts.

Invariant: scores of a target layer are ``(1 - w) * popularity + w * sequence_share`` where the
sequence share comes from ``context.activation`` (experts the same sequence used before this step);
rows without any history use popularity alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiermem.config import option, require
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, layer_popularity, layers_ahead
from tiermem.predict.registry import PREDICTORS
from tiermem.predict.trace import RouteTrace


@dataclass(frozen=True)
class FrequencyConfig:
    """How the frequency predictor mixes global and per-sequence counts."""

    sequence_weight: float = option(
        0.5, help="share of the sequence's own expert counts (context.activation); 0 = global popularity only")

    def __post_init__(self) -> None:
        require(0.0 <= self.sequence_weight <= 1.0, self, "sequence_weight must be in [0, 1]")


class FrequencyPredictor:
    """Scores each expert of a target layer by how often it was used (globally and by this sequence)."""

    reads_hidden = False  # routing history only: no copy of the router input (Predictor)

    def __init__(self, popularity: np.ndarray, config: FrequencyConfig = FrequencyConfig()) -> None:
        self.popularity = np.asarray(popularity, dtype=np.float32)  # [L, E]
        self.config = config

    @classmethod
    def fit(cls, trace: RouteTrace, config: FrequencyConfig = FrequencyConfig()) -> FrequencyPredictor:
        return cls(layer_popularity(trace.experts, trace.num_experts), config)

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        num_layers, num_experts = self.popularity.shape
        check_context(context, distance, num_layers=num_layers, num_experts=num_experts, who="frequency")
        weight = self.config.sequence_weight
        scores = np.empty((distance, context.batch_size, num_experts), dtype=np.float32)
        for index, (_, layer) in enumerate(layers_ahead(context.layer, distance, num_layers)):
            scores[index] = self.popularity[layer]
            if context.activation is not None and weight > 0.0:
                counts = context.activation[:, layer]
                total = counts.sum(axis=1, keepdims=True)
                share = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
                scores[index] = np.where(total > 0, (1.0 - weight) * scores[index] + weight * share, scores[index])
        return scores


PREDICTORS.register("frequency", FrequencyConfig, lambda config, trace: FrequencyPredictor.fit(trace, config))
