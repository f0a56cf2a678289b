"""Small traces and predictors with known answers, shared by the simulator tests."""

from __future__ import annotations

import numpy as np

from tiermem.predict.base import RouteContext
from tiermem.simulate.trace import SimTrace


def trace_of(steps: list[list[list[int]]], num_experts: int, *, seq_id: list[int] | None = None,
             phase: list[int] | None = None) -> SimTrace:
    """A trace from ``steps[token][layer] = [expert ids]`` (all decode, one sequence unless told)."""
    experts = np.array(steps, dtype=np.int16)
    tokens = experts.shape[0]
    return SimTrace(
        experts=experts,
        seq_id=np.array(seq_id if seq_id is not None else [0] * tokens, dtype=np.int32),
        phase=np.array(phase if phase is not None else [1] * tokens, dtype=np.uint8),
        num_experts=num_experts,
        top_k=experts.shape[2],
        layers=tuple(range(experts.shape[1])),
        model="test",
    )


class ShiftPredictor:
    """Perfect within a step for traces where layer ``l + 1`` routes to ``(expert at l) + 1 mod E``."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.calls = 0

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        self.calls += 1
        assert (context.current[:, context.layer + 1 :] == -1).all(), "the context shows the future"
        scores = np.zeros((distance, context.batch_size, self.num_experts), dtype=np.float32)
        for d in range(1, distance + 1):
            for b, expert in enumerate(context.current[:, context.layer, 0]):
                scores[d - 1, b, (int(expert) + d) % self.num_experts] = 1.0
        return scores


class WrongShapePredictor:
    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        return np.zeros((distance, context.batch_size, 3), dtype=np.float32)


def optimal_misses(steps: list[frozenset[int]], slots: int) -> int:
    """The fewest demand misses any policy can get (exhaustive search over which objects to keep)."""
    best: dict[frozenset[int], int] = {frozenset(): 0}
    for needed in steps:
        following: dict[frozenset[int], int] = {}
        for cache, misses in best.items():
            cost = misses + len(needed - cache)
            keepable = sorted(cache - needed)
            room = slots - len(needed)
            for mask in range(1 << len(keepable)):
                kept = {e for i, e in enumerate(keepable) if mask >> i & 1}
                if len(kept) <= room:
                    state = frozenset(needed | kept)
                    following[state] = min(following.get(state, cost), cost)
        best = following
    return min(best.values())
