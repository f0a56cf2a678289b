"""Evaluation of predictors on held-out sequences: recall and precision of the prediction sets.

Invariants:
- Every context is replayed from the trace by ``contexts.anchor_batches``, so no prediction can see
  the routing it is scored against.
- For each target (a token's layer at distance d from the anchor) the predictor's ``k`` and ``2k``
  highest-scoring experts (``k`` = the trace's top-k) are compared with the experts actually used:
  recall = hits / used, precision = hits / set size; both are averaged over targets.
- Results are kept per predictor, phase of the anchor token and distance, as sums, so folds add up.
- Training and test sequences are disjoint in ``cross_validate`` (``trace.sequence_folds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.base import Predictor, RouteContext
from tiermem.predict.contexts import AnchorBatch, anchor_batches, with_row_extras
from tiermem.predict.oracle import OracleRoutes
from tiermem.predict.trace import DECODE, RouteTrace, sequence_folds

PHASES = {0: "prefill", DECODE: "decode"}


@dataclass(frozen=True)
class Tally:
    """Summed per-target scores; ``recall_k`` etc. are the means."""

    targets: int = 0
    recall_k_sum: float = 0.0
    recall_2k_sum: float = 0.0
    precision_k_sum: float = 0.0
    precision_2k_sum: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple:
        return (self.targets, self.recall_k_sum, self.recall_2k_sum, self.precision_k_sum, self.precision_2k_sum)

    def _mean(self, total: float) -> float:
        return total / self.targets if self.targets else float("nan")

    @property
    def recall_k(self) -> float:
        return self._mean(self.recall_k_sum)

    @property
    def recall_2k(self) -> float:
        return self._mean(self.recall_2k_sum)

    @property
    def precision_k(self) -> float:
        return self._mean(self.precision_k_sum)

    @property
    def precision_2k(self) -> float:
        return self._mean(self.precision_2k_sum)


Key = tuple[str, str, int]  # (predictor, phase, distance)


@dataclass(frozen=True)
class EvalReport:
    """Scores of several predictors on the same targets, plus per-call CPU cost."""

    predictors: tuple[str, ...]
    top_k: int
    num_experts: int
    max_distance: int
    tallies: Mapping[Key, Tally]
    predict_us: Mapping[str, float] = field(default_factory=dict)  # mean CPU us per predict call, B=1
    notes: tuple[str, ...] = ()

    def tally(self, predictor: str, phase: str, distance: int) -> Tally:
        return self.tallies.get((predictor, phase, distance), Tally())

    def merged(self, other: EvalReport) -> EvalReport:
        keys = set(self.tallies) | set(other.tallies)
        tallies = {k: self.tallies.get(k, Tally()) + other.tallies.get(k, Tally()) for k in keys}
        return EvalReport(self.predictors, self.top_k, self.num_experts, self.max_distance, tallies,
                          self.predict_us or other.predict_us, self.notes)


Candidate = Predictor | OracleRoutes


def evaluate(predictors: Mapping[str, Candidate], trace: RouteTrace, *, max_distance: int = 4,
             anchors: range | None = None, notes: tuple[str, ...] = ()) -> EvalReport:
    """Score every predictor on every (token, anchor layer) of ``trace`` (the held-out sequences).

    ``anchors`` limits the anchor layers (default -1 .. L-2, see ``contexts.anchor_batches``).
    """
    k = trace.top_k
    set_size = min(2 * k, trace.num_experts)
    sums: dict[Key, np.ndarray] = {}
    for batch in anchor_batches(trace, max_distance, anchors=anchors):
        for name, candidate in predictors.items():
            predictor = candidate.bind(batch.rows) if isinstance(candidate, OracleRoutes) else candidate
            scores = predictor.predict(batch.context, max_distance)
            expected = (max_distance, batch.rows.size, trace.num_experts)
            if scores.shape != expected:
                raise TraceError(f"evaluate: {name} returned scores of shape {scores.shape}, expected {expected}")
            _accumulate(sums, name, batch, scores, k, set_size)
    tallies = {key: Tally(int(v[0]), *map(float, v[1:])) for key, v in sums.items()}
    return EvalReport(tuple(predictors), k, trace.num_experts, max_distance, tallies, notes=notes)


def _accumulate(sums: dict[Key, np.ndarray], name: str, batch: AnchorBatch, scores: np.ndarray,
                k: int, set_size: int) -> None:
    targets = batch.targets  # [D, B, K]
    top = np.argpartition(-scores, set_size - 1, axis=2)[:, :, :set_size]
    order = np.argsort(-np.take_along_axis(scores, top, axis=2), axis=2, kind="stable")
    top = np.take_along_axis(top, order, axis=2)
    num_experts = scores.shape[2]
    chosen_2k = np.zeros(scores.shape[:2] + (num_experts + 1,), dtype=bool)
    np.put_along_axis(chosen_2k, top, True, axis=2)
    chosen_k = np.zeros_like(chosen_2k)
    np.put_along_axis(chosen_k, top[:, :, :k], True, axis=2)
    lookup = np.where(targets >= 0, targets, num_experts).astype(np.int64)
    hits_k = np.take_along_axis(chosen_k, lookup, axis=2).sum(axis=2)
    hits_2k = np.take_along_axis(chosen_2k, lookup, axis=2).sum(axis=2)
    used = (targets >= 0).sum(axis=2)  # [D, B]
    valid = used > 0
    safe = np.maximum(used, 1)
    for phase, phase_name in PHASES.items():
        in_phase = valid & (batch.phase == phase)[None, :]
        for index in range(targets.shape[0]):
            mask = in_phase[index]
            if not mask.any():
                continue
            row = np.array([
                mask.sum(),
                (hits_k[index] / safe[index])[mask].sum(),
                (hits_2k[index] / safe[index])[mask].sum(),
                hits_k[index][mask].sum() / k,
                hits_2k[index][mask].sum() / set_size,
            ], dtype=np.float64)
            key = (name, phase_name, index + 1)
            sums[key] = sums.get(key, 0.0) + row


def predict_cost_us(predictor: Predictor, trace: RouteTrace, *, distance: int = 4, repeats: int = 30,
                    device: str | torch.device = "cpu") -> float:
    """Mean wall microseconds of one ``predict`` call for a single decode token (batch of 1).

    Times a call after each routed layer 0 .. L-1 of the same token, as an engine makes them (so the
    cost per decode token is ``num_layers`` times this). The context's hidden state is moved to
    ``device`` first, where an engine has it.
    """
    contexts = []
    for batch in anchor_batches(trace, distance, anchors=range(trace.num_layers)):
        decode = np.flatnonzero(batch.phase == DECODE)
        row = int(decode[len(decode) // 2]) if decode.size else 0
        contexts.append(_single_row(batch, row, torch.device(device)))
        if len(contexts) == trace.num_layers:
            break
    if not contexts:
        raise TraceError("evaluate: cannot time predict on an empty trace")
    for context in contexts:
        predictor.predict(context, distance)
    start = time.perf_counter()
    for _ in range(repeats):
        for context in contexts:
            predictor.predict(context, distance)
    return (time.perf_counter() - start) / (repeats * len(contexts)) * 1e6


def _single_row(batch: AnchorBatch, row: int, device: torch.device) -> RouteContext:
    context = batch.context
    pick = (lambda a: None if a is None else a[row:row + 1])
    return RouteContext(
        num_experts=context.num_experts, layer=context.layer, current=pick(context.current),
        previous=pick(context.previous), activation=pick(context.activation), token_ids=pick(context.token_ids),
        hidden=None if context.hidden is None else context.hidden[row:row + 1].to(device),
    )


def cross_validate(
    trace: RouteTrace,
    make_predictors: Callable[[RouteTrace], Mapping[str, Predictor]],
    *,
    num_folds: int = 2,
    max_distance: int = 4,
    include_oracle: bool = False,
    notes: tuple[str, ...] = (),
) -> EvalReport:
    """Fit on the training sequences of each fold (seq_id % num_folds), score on its test sequences, sum.

    The per-call cost is timed on the first fold's predictors. With ``include_oracle`` an ``oracle``
    column built from each test fold is added (an upper bound, not a predictor).
    """
    report: EvalReport | None = None
    for train, test in sequence_folds(trace, num_folds):
        train, test = with_row_extras(train, trace), with_row_extras(test, trace)
        overlap = np.intersect1d(train.sequence_ids, test.sequence_ids)
        assert overlap.size == 0, f"train and test share sequences {overlap}"
        predictors: dict[str, Candidate] = dict(make_predictors(train))
        timings = {name: predict_cost_us(p, test, distance=max_distance) for name, p in predictors.items()}
        if include_oracle:
            predictors["oracle"] = OracleRoutes(test)
        fold = evaluate(predictors, test, max_distance=max_distance, notes=notes)
        fold = EvalReport(fold.predictors, fold.top_k, fold.num_experts, max_distance, fold.tallies, timings, notes)
        report = fold if report is None else report.merged(fold)
    assert report is not None
    return report
