"""ORACLE, not a predictor: reads the future from the trace itself, for upper bounds in simulation.

A real engine can never build this. It exists so that simulations and evaluations can show the
best any predictor could do (perfect knowledge of the experts ahead) next to real predictors, and
every output that includes it must label it as an oracle.

Invariant: ``OracleRoutes.bind(rows)`` returns a predictor for exactly the trace rows of a context
batch; its scores are 1 for the experts those rows actually meet at each distance (the same targets
the evaluation scores, ``contexts.targets_after``) and 0 elsewhere.
"""

from __future__ import annotations

import numpy as np

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, multi_hot
from tiermem.predict.contexts import targets_after
from tiermem.predict.trace import RouteTrace


class OracleRoutes:
    """Holds a trace and binds oracle predictors to row sets of it."""

    def __init__(self, trace: RouteTrace) -> None:
        self.trace = trace

    def bind(self, rows: np.ndarray) -> OraclePredictor:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.trace.num_tokens):
            raise TraceError(f"oracle: rows must lie in [0, {self.trace.num_tokens}) of its trace")
        return OraclePredictor(self.trace, rows)


class OraclePredictor:
    """Perfect scores for one batch of trace rows (see the module docstring: an oracle)."""

    reads_hidden = False  # the recorded future only (Predictor)

    def __init__(self, trace: RouteTrace, rows: np.ndarray) -> None:
        self.trace = trace
        self.rows = rows

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        check_context(context, distance, num_layers=self.trace.num_layers,
                      num_experts=self.trace.num_experts, who="oracle")
        if context.batch_size != self.rows.size:
            raise TraceError(f"oracle: bound to {self.rows.size} rows, got a context of {context.batch_size}")
        return multi_hot(targets_after(self.trace, self.rows, context.layer, distance), self.trace.num_experts)
