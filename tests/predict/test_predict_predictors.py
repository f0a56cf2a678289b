"""Baseline predictors on synthetic traces whose structure says which predictor must win."""

from __future__ import annotations

import numpy as np
import pytest

from tiermem.errors import TraceError
from tiermem.predict import PREDICTORS
from tiermem.predict.activation_match import ActivationMatchPredictor
from tiermem.predict.base import RouteContext
from tiermem.predict.cooccurrence import CoOccurrencePredictor
from tiermem.predict.eval import evaluate
from tiermem.predict.frequency import FrequencyConfig, FrequencyPredictor
from tiermem.predict.nextgate import NextGatePredictor
from tiermem.predict.oracle import OracleRoutes
from tiermem.predict.synthetic import SyntheticConfig, gate_routed_trace, synthetic_trace
from tiermem.predict.trace import RouteTrace, sequence_folds

LAYERS, EXPERTS, TOP_K = 4, 16, 2
BASE = {"num_sequences": 8, "prefill_tokens": 4, "decode_tokens": 24, "num_layers": LAYERS, "num_experts": EXPERTS,
        "top_k": TOP_K}
RANDOM_RECALL = TOP_K / EXPERTS


def split(config: SyntheticConfig) -> tuple[RouteTrace, RouteTrace]:
    return sequence_folds(synthetic_trace(config), 2)[0]


def baselines(train: RouteTrace) -> dict:
    return {
        "popularity": FrequencyPredictor.fit(train, FrequencyConfig(sequence_weight=0.0)),
        "frequency": FrequencyPredictor.fit(train),
        "cooccurrence": CoOccurrencePredictor.fit(train),
        "activation-match": ActivationMatchPredictor.fit(train),
    }


def test_a_deterministic_layer_transition_gives_co_occurrence_perfect_recall():
    train, test = split(SyntheticConfig(**BASE, layer_correlation=1.0))
    report = evaluate(baselines(train), test, anchors=range(LAYERS - 1))
    for phase in ("prefill", "decode"):
        assert report.tally("cooccurrence", phase, 1).recall_k > 0.99
        assert report.tally("popularity", phase, 1).recall_k < 0.5


def test_on_pure_popularity_the_frequency_predictor_wins():
    train, test = split(SyntheticConfig(**BASE, zipf_exponent=1.2, seed=2))
    report = evaluate(baselines(train), test)
    for distance in (1, 2):
        frequency = report.tally("popularity", "decode", distance).recall_k
        others = [report.tally(name, "decode", distance).recall_k for name in report.predictors]
        assert frequency >= max(others) - 0.01
        assert frequency > RANDOM_RECALL + 0.15


def test_temporal_reuse_is_caught_by_the_step_table():
    train, test = split(SyntheticConfig(**{**BASE, "num_sequences": 16}, reuse_probability=0.9, seed=3))
    report = evaluate(baselines(train), test, anchors=range(-1, 0))  # layer 0 from the previous step only
    reuse = report.tally("cooccurrence", "decode", 1).recall_k
    assert reuse > 0.65  # sets repeat with ~0.88 overlap; the averaged step-table rows catch most of it
    assert reuse > report.tally("popularity", "decode", 1).recall_k + 0.4


def test_activation_matching_recognises_the_kind_of_sequence():
    rng = np.random.default_rng(4)
    tokens, sequences = 20, 8
    halves = np.arange(sequences) % 2  # even sequences use experts 0-7, odd ones 8-15
    experts = np.stack([[[rng.permutation(8)[:TOP_K] + 8 * halves[s] for _ in range(LAYERS)]
                         for _ in range(tokens)] for s in range(sequences)]).reshape(-1, LAYERS, TOP_K)
    trace = RouteTrace(experts=experts, seq_id=np.repeat(np.arange(sequences), tokens),
                       pos=np.tile(np.arange(tokens), sequences), phase=np.ones(sequences * tokens, dtype=np.uint8), num_experts=16)
    train = trace.select_sequences([0, 1, 2, 3, 4, 5])
    test = trace.select_sequences([6, 7])
    report = evaluate(baselines(train), test)
    matched = report.tally("activation-match", "decode", 2).recall_2k
    assert matched > report.tally("popularity", "decode", 2).recall_2k + 0.2
    assert matched > 0.45  # 2k = 4 guesses among the 8 experts of the right half: 0.5


def test_next_gate_speculation_recovers_routing_from_hidden_states():
    config = SyntheticConfig(**BASE)
    trace, gates = gate_routed_trace(config, hidden_size=32, drift=0.05)
    train, test = sequence_folds(trace, 2)[0]
    report = evaluate({"next-gate": NextGatePredictor(gates), "popularity": FrequencyPredictor.fit(train)}, test,
                      anchors=range(LAYERS - 1))  # anchor -1 has no hidden state here (no embedding extra)
    assert report.tally("next-gate", "decode", 1).recall_k > 0.9
    assert report.tally("popularity", "decode", 1).recall_k < 0.3


def test_next_gate_without_hidden_states_says_where_they_come_from():
    _, gates = gate_routed_trace(SyntheticConfig(**BASE))
    context = RouteContext(num_experts=EXPERTS, layer=0, current=np.full((1, LAYERS, TOP_K), -1, np.int16))
    with pytest.raises(TraceError, match="hidden"):
        NextGatePredictor(gates).predict(context, 1)


def test_the_oracle_is_perfect_and_fills_half_of_a_2k_set():
    _, test = split(SyntheticConfig(**BASE))
    report = evaluate({"oracle": OracleRoutes(test)}, test)
    for phase in ("prefill", "decode"):
        tally = report.tally("oracle", phase, 1)
        assert tally.recall_k == 1.0 and tally.recall_2k == 1.0 and tally.precision_2k == 0.5


def test_every_registered_predictor_builds_from_its_default_config():
    train, test = split(SyntheticConfig(**BASE))
    assert set(PREDICTORS.names()) == {"frequency", "cooccurrence", "activation-match", "learned"}
    for name in ("frequency", "cooccurrence", "activation-match"):
        entry = PREDICTORS.get(name)
        predictor = entry.factory(entry.config_cls(), train)
        context = RouteContext(num_experts=EXPERTS, layer=1, current=test.experts[:3])
        scores = predictor.predict(context, 3)
        assert scores.shape == (3, 3, EXPERTS) and scores.dtype == np.float32


def test_a_context_of_another_model_shape_is_refused():
    train, _ = split(SyntheticConfig(**BASE))
    context = RouteContext(num_experts=EXPERTS * 2, layer=0, current=np.full((1, LAYERS, TOP_K), -1, np.int16))
    for predictor in baselines(train).values():
        with pytest.raises(TraceError, match="built for"):
            predictor.predict(context, 1)


def _co_occurrence_reference(model: CoOccurrencePredictor, context: RouteContext, distance: int) -> np.ndarray:
    """The co-occurrence score in plain numpy, written from its definition (module docstring)."""
    num_layers, weight = model.cross.shape[0], model.config.step_weight
    out = np.zeros((distance, context.batch_size, context.num_experts), dtype=np.float64)
    for d in range(1, distance + 1):
        target = (context.layer + d) % num_layers
        for b in range(context.batch_size):
            cross = [e for e in context.current[b, context.layer] if e >= 0] if context.layer >= 0 else []
            if target > context.layer:  # same token's previous step, else this step's earlier layer
                step = [] if context.previous is None else [e for e in context.previous[b, target] if e >= 0]
            else:
                step = [e for e in context.current[b, target] if e >= 0]
            parts = [(1 - weight, model.cross[context.layer, d - 1, cross].mean(axis=0)) if cross else None,
                     (weight, model.step[target, step].mean(axis=0)) if step else None]
            parts = [p for p in parts if p is not None and p[0] > 0]
            popularity = model.popularity[target]
            mixed = sum(w * row for w, row in parts) / sum(w for w, _ in parts) if parts else popularity
            out[d - 1, b] = mixed + 1e-3 * popularity
    return out


@pytest.mark.parametrize("layer, with_previous", [(0, True), (2, True), (3, False), (-1, True)])
def test_compiled_co_occurrence_scores_equal_the_definition(layer, with_previous):
    train, _ = split(SyntheticConfig(**BASE, layer_correlation=0.6, reuse_probability=0.4))
    model = CoOccurrencePredictor.fit(train)
    rng = np.random.default_rng(layer + 5)
    batch = 5
    current = rng.integers(0, EXPERTS, (batch, LAYERS, TOP_K)).astype(np.int16)
    current[:, layer + 1:] = -1
    current[1, max(layer, 0), 1] = -1  # a dropped slot
    previous = rng.integers(0, EXPERTS, (batch, LAYERS, TOP_K)).astype(np.int16) if with_previous else None
    context = RouteContext(num_experts=EXPERTS, layer=layer, current=current, previous=previous, activation=None)
    got = model.predict(context, 3)
    np.testing.assert_allclose(got, _co_occurrence_reference(model, context, 3), rtol=1e-5, atol=1e-7)
