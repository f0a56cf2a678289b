"""Co-occurrence predictor: layer l -> l+d tables within a token and step t -> t+1 tables per layer.

Invariants:
- ``cross[a, d-1, i, j]`` is P(expert j at distance d | expert i at anchor layer a), counted on the
  same (token, target) pairs that evaluation scores (see ``contexts.targets_after``).
- ``step[l, i, j]`` is P(expert j at layer l of a token | expert i at layer l of the token before).
- A target's score averages the cross-table rows of the anchor layer's experts and the step-table
  rows of the same layer one token earlier, weighted ``1 - step_weight`` and ``step_weight``; when one
  source is unknown the other is used alone, and popularity when both are. All distances are scored
  in one vectorised pass (no Python loop over experts or tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiermem.config import option, require
from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, layer_popularity, layers_ahead
from tiermem.predict.contexts import targets_after
from tiermem.predict.registry import PREDICTORS
from tiermem.predict.trace import RouteTrace

_TIE_BREAK = 1e-3  # share of popularity added so that equal table scores fall back to popularity order


@dataclass(frozen=True)
class CoOccurrenceConfig:
    """Table sizes and how the cross-layer and cross-step evidence are mixed."""

    max_distance: int = option(4, help="largest prefetch distance (in layers) the tables cover")
    step_weight: float = option(0.5, help="weight of the step t -> t+1 table against the layer l -> l+d table")
    smoothing: float = option(1.0, help="additive count added to every table cell")

    def __post_init__(self) -> None:
        require(self.max_distance >= 1, self, "max_distance must be >= 1")
        require(0.0 <= self.step_weight <= 1.0, self, "step_weight must be in [0, 1]")
        require(self.smoothing > 0.0, self, "smoothing must be > 0")


class CoOccurrencePredictor:
    """Predicts a target layer from the experts of the anchor layer and of the previous step."""

    def __init__(self, cross: np.ndarray, step: np.ndarray, popularity: np.ndarray,
                 config: CoOccurrenceConfig = CoOccurrenceConfig()) -> None:
        self.cross = cross  # float32 [L, D, E, E]
        self.step = step  # float32 [L, E, E]
        self.popularity = popularity  # float32 [L, E]
        self.config = config

    @classmethod
    def fit(cls, trace: RouteTrace, config: CoOccurrenceConfig = CoOccurrenceConfig()) -> CoOccurrencePredictor:
        layers, experts, depth = trace.num_layers, trace.num_experts, config.max_distance
        rows = np.arange(trace.num_tokens)
        cross = np.zeros((layers, depth, experts, experts), dtype=np.float64)
        for anchor in range(layers):
            targets = targets_after(trace, rows, anchor, depth)
            for d in range(depth):
                _count_pairs(cross[anchor, d], trace.experts[:, anchor], targets[d])
        previous, has = trace.previous_rows()
        step = np.zeros((layers, experts, experts), dtype=np.float64)
        for layer in range(layers):
            _count_pairs(step[layer], trace.experts[previous[has], layer], trace.experts[has, layer])
        return cls(_conditional(cross, config.smoothing), _conditional(step, config.smoothing),
                   layer_popularity(trace.experts, experts), config)

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        num_layers, depth, num_experts, _ = self.cross.shape
        check_context(context, distance, num_layers=num_layers, num_experts=num_experts, who="co-occurrence")
        if distance > depth:
            raise TraceError(
                f"predict: co-occurrence tables cover distances up to {depth}, asked for {distance}; "
                f"fit with CoOccurrenceConfig(max_distance={distance})"
            )
        anchor, batch = context.layer, context.batch_size
        ahead = layers_ahead(anchor, distance, num_layers)
        targets = np.array([layer for _, layer in ahead])
        no_source = np.full((batch, context.current.shape[2]), -1, dtype=np.int16)
        step_sources = np.stack([_step_source(context, steps, layer, no_source) for steps, layer in ahead])
        step, step_known = _mean_rows(self.step[targets], step_sources)  # [D, B, E], [D, B, 1]
        if anchor >= 0:
            cross_sources = np.broadcast_to(context.current[:, anchor], (distance,) + no_source.shape)
            cross, cross_known = _mean_rows(self.cross[anchor, :distance], cross_sources)
        else:
            cross, cross_known = np.zeros_like(step), np.zeros_like(step_known)
        weight = np.float32(self.config.step_weight)
        total = (1 - weight) * cross + weight * step
        norm = (1 - weight) * cross_known + weight * step_known
        popularity = self.popularity[targets][:, None, :]  # [D, 1, E]
        mixed = np.where(norm > 0, total / np.maximum(norm, 1e-12), popularity)
        return (mixed + _TIE_BREAK * popularity).astype(np.float32)


def _step_source(context: RouteContext, steps: int, layer: int, none: np.ndarray) -> np.ndarray:
    """The experts of the target's layer one token earlier, where the context knows them."""
    if steps == 0 and context.previous is not None:
        return context.previous[:, layer]
    if steps == 1 and layer <= context.layer:
        return context.current[:, layer]
    return none


def _count_pairs(table: np.ndarray, sources: np.ndarray, targets: np.ndarray) -> None:
    experts = table.shape[0]
    pairs = (sources[:, :, None] >= 0) & (targets[:, None, :] >= 0)
    flat = sources[:, :, None].astype(np.int64) * experts + targets[:, None, :]
    np.add.at(table.reshape(-1), flat[pairs], 1.0)


def _conditional(counts: np.ndarray, smoothing: float) -> np.ndarray:
    smoothed = counts + smoothing
    return (smoothed / smoothed.sum(axis=-1, keepdims=True)).astype(np.float32)


def _mean_rows(tables: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distance, the mean table row of the known ids of each token, and whether any id was known.

    ``tables`` is ``[D, E, E]`` and ``ids`` ``[D, B, K]``; returns ``[D, B, E]`` and ``[D, B, 1]``.
    """
    known = ids >= 0
    rows = tables[np.arange(len(tables))[:, None, None], np.where(known, ids, 0)]  # [D, B, K, E]
    count = known.sum(axis=2, keepdims=True).astype(np.float32)
    total = (rows * known[..., None]).sum(axis=2)
    return total / np.maximum(count, 1.0), (count > 0).astype(np.float32)


PREDICTORS.register("cooccurrence", CoOccurrenceConfig, lambda config, trace: CoOccurrencePredictor.fit(trace, config))
