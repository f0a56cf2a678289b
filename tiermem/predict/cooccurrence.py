"""Co-occurrence predictor: layer l -> l+d tables within a token and step t -> t+1 tables per layer.

Invariants:
- ``cross[a, d-1, i, j]`` is P(expert j at distance d | expert i at anchor layer a), counted on the
  same (token, target) pairs that evaluation scores (see ``contexts.targets_after``).
- ``step[l, i, j]`` is P(expert j at layer l of a token | expert i at layer l of the token before).
- A target's score averages the cross-table rows of the anchor layer's experts and the step-table
  rows of the same layer one token earlier, weighted ``1 - step_weight`` and ``step_weight``; when one
  source is unknown the other is used alone, and popularity when both are. All distances are scored
  in one compiled (numba) pass: it runs once per routed layer, on the decode critical path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
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

    reads_hidden = False  # routing history only: no copy of the router input (Predictor)

    def __init__(self, cross: np.ndarray, step: np.ndarray, popularity: np.ndarray,
                 config: CoOccurrenceConfig = CoOccurrenceConfig()) -> None:
        self.cross = cross  # float32 [L, D, E, E]
        self.step = step  # float32 [L, E, E]
        self.popularity = popularity  # float32 [L, E]
        self.config = config
        self._weight, self._tie_break = np.float32(config.step_weight), np.float32(_TIE_BREAK)
        self.predict(RouteContext(num_experts=popularity.shape[1], layer=-1,  # compile (or load) now, not mid-decode
                                  current=np.full((1, popularity.shape[0], 1), -1, dtype=np.int16)), 1)

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
        anchor, batch, top_k = context.layer, context.batch_size, context.current.shape[2]
        # one buffer of source expert ids, -1 where unknown: [0] the anchor's, [d] the step source of distance d
        # (few numpy calls: this runs once per routed layer, and each call costs microseconds there)
        sources = np.full((distance + 1, batch, top_k), -1, dtype=np.int64)
        if anchor >= 0:
            sources[0] = context.current[:, anchor]
        ahead = layers_ahead(anchor, distance, num_layers)
        for d, (steps, layer) in enumerate(ahead, start=1):
            source = _step_source(context, steps, layer)
            if source is not None:
                sources[d] = source
        cross_tables = self.cross[max(anchor, 0)]  # [depth, E, E]; unused when anchor < 0 (no known source)
        return _scores(cross_tables, self.step, self.popularity, np.array([layer for _, layer in ahead]),
                       sources, self._weight, self._tie_break)


@numba.njit(cache=True, nogil=True)
def _scores(cross: np.ndarray, step: np.ndarray, popularity: np.ndarray, targets: np.ndarray,
            sources: np.ndarray, weight: np.float32,
            tie_break: np.float32) -> np.ndarray:  # pragma: no cover - compiled; tested against numpy
    """Scores ``[D, B, E]``: per target, the weighted means of the known sources' table rows.

    ``cross`` is the anchor's ``[depth, E, E]`` tables, ``step`` ``[L, E, E]``, ``popularity``
    ``[L, E]``; ``sources`` ``[1 + D, B, K]`` holds expert ids, -1 where unknown: ``[0]`` the anchor
    layer's (cross-layer source), ``[d]`` the target's layer one token earlier (step source). One
    compiled pass: a per-layer call costs microseconds, not a dozen numpy calls.
    """
    distance, batch, top_k = sources.shape[0] - 1, sources.shape[1], sources.shape[2]
    num_experts = popularity.shape[1]
    out = np.empty((distance, batch, num_experts), dtype=np.float32)
    cross_sum = np.empty(num_experts, dtype=np.float32)
    step_sum = np.empty(num_experts, dtype=np.float32)
    for d in range(distance):
        target = targets[d]
        for b in range(batch):
            cross_sum[:] = 0.0
            step_sum[:] = 0.0
            cross_known = 0
            step_known = 0
            for k in range(top_k):
                source = sources[0, b, k]
                if source >= 0:
                    cross_known += 1
                    cross_sum += cross[d, source]
                source = sources[d + 1, b, k]
                if source >= 0:
                    step_known += 1
                    step_sum += step[target, source]
            norm = np.float32(0.0)
            if cross_known > 0:
                norm += np.float32(1.0) - weight
            if step_known > 0:
                norm += weight
            for e in range(num_experts):
                pop = popularity[target, e]
                if norm > 0:
                    total = (np.float32(1.0) - weight) * (cross_sum[e] / np.float32(max(cross_known, 1)))
                    total += weight * (step_sum[e] / np.float32(max(step_known, 1)))
                    out[d, b, e] = total / norm + tie_break * pop
                else:
                    out[d, b, e] = pop + tie_break * pop
    return out


def _step_source(context: RouteContext, steps: int, layer: int) -> np.ndarray | None:
    """The experts of the target's layer one token earlier, where the context knows them (else None)."""
    if steps == 0 and context.previous is not None:
        return context.previous[:, layer]
    if steps == 1 and layer <= context.layer:
        return context.current[:, layer]
    return None


def _count_pairs(table: np.ndarray, sources: np.ndarray, targets: np.ndarray) -> None:
    experts = table.shape[0]
    pairs = (sources[:, :, None] >= 0) & (targets[:, None, :] >= 0)
    flat = sources[:, :, None].astype(np.int64) * experts + targets[:, None, :]
    np.add.at(table.reshape(-1), flat[pairs], 1.0)


def _conditional(counts: np.ndarray, smoothing: float) -> np.ndarray:
    smoothed = counts + smoothing
    return (smoothed / smoothed.sum(axis=-1, keepdims=True)).astype(np.float32)


PREDICTORS.register("cooccurrence", CoOccurrenceConfig, lambda config, trace: CoOccurrencePredictor.fit(trace, config))
