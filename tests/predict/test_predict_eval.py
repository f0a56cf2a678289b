"""The evaluation: metrics by hand, and no leakage between training and held-out sequences."""

from __future__ import annotations

import numpy as np

from tiermem.predict.base import RouteContext
from tiermem.predict.eval import cross_validate, evaluate
from tiermem.predict.frequency import FrequencyPredictor
from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace
from tiermem.predict.trace import RouteTrace

EXPERTS = 4


class FixedRanking:
    """Always ranks expert 0 first, then 1, 2, 3."""

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        return np.broadcast_to(np.array([4.0, 3.0, 2.0, 1.0], np.float32), (distance, context.batch_size, EXPERTS))


class Spy:
    """Records the token ids of every context it is asked about."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        self.seen.update(context.token_ids.tolist())
        return np.zeros((distance, context.batch_size, EXPERTS), np.float32)


def test_recall_and_precision_match_a_hand_count():
    experts = np.array([[[0], [1]], [[2], [0]], [[1], [3]], [[0], [0]]])  # top-1, two layers, one sequence
    trace = RouteTrace(experts=experts, seq_id=[0] * 4, pos=[0, 1, 2, 3], phase=[1] * 4, num_experts=EXPERTS)
    report = evaluate({"fixed": FixedRanking()}, trace, max_distance=1)
    # distance 1 targets: anchor -1 -> layer 0 of the same token: 0, 2, 1, 0; anchor 0 -> layer 1: 1, 0, 3, 0
    targets = [0, 2, 1, 0, 1, 0, 3, 0]
    tally = report.tally("fixed", "decode", 1)
    assert tally.targets == len(targets)
    assert tally.recall_k == np.mean([t == 0 for t in targets])  # k = 1: only expert 0 is guessed
    assert tally.recall_2k == np.mean([t in (0, 1) for t in targets])
    assert tally.precision_2k == tally.recall_2k / 2


def test_cross_validation_never_scores_a_sequence_it_trained_on():
    config = SyntheticConfig(num_sequences=6, prefill_tokens=2, decode_tokens=6, num_layers=3, num_experts=EXPERTS)
    base = synthetic_trace(config)
    trace = RouteTrace(experts=base.experts, seq_id=base.seq_id, pos=base.pos, phase=base.phase,
                       num_experts=EXPERTS, token_ids=np.arange(base.num_tokens))  # token id = row, to trace back
    folds = []

    def make(train: RouteTrace) -> dict:
        spy = Spy()
        folds.append((set(train.sequence_ids.tolist()), spy))
        return {"spy": spy, "frequency": FrequencyPredictor.fit(train)}

    cross_validate(trace, make, num_folds=2)
    scored_everything = set()
    for trained_on, spy in folds:
        scored = set(trace.seq_id[sorted(spy.seen)].tolist())
        assert scored and not scored & trained_on
        scored_everything |= scored
    assert scored_everything == set(range(config.num_sequences))


def test_folds_add_up_to_every_target_of_the_trace():
    trace = synthetic_trace(SyntheticConfig(num_sequences=4, num_layers=3, num_experts=EXPERTS))
    report = cross_validate(trace, lambda train: {"frequency": FrequencyPredictor.fit(train)}, num_folds=2)
    whole = evaluate({"frequency": FrequencyPredictor.fit(trace)}, trace)
    for phase in ("prefill", "decode"):
        for distance in range(1, 5):
            assert report.tally("frequency", phase, distance).targets == whole.tally("frequency", phase, distance).targets
    assert report.predict_us["frequency"] > 0
