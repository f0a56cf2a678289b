"""The learned predictor: it learns structure, saves and loads exactly, and refuses misuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.contexts import anchor_batches
from tiermem.predict.eval import evaluate
from tiermem.predict.frequency import FrequencyPredictor
from tiermem.predict.learned import FORMAT_NAME, LearnedConfig, LearnedPredictor
from tiermem.predict.nextgate import NextGatePredictor
from tiermem.predict.synthetic import SyntheticConfig, gate_routed_trace, synthetic_trace
from tiermem.predict.trace import sequence_folds
from tiermem.predict.train import train

STRUCTURED = SyntheticConfig(num_sequences=16, prefill_tokens=4, decode_tokens=28, num_layers=4, num_experts=16,
                             top_k=2, layer_correlation=0.8, reuse_probability=0.2)
QUICK = LearnedConfig(hidden_dim=32, expert_dim=32, token_buckets=64, validation_fraction=0.0, max_steps=300,
                      learning_rate=5e-3)
GATED = SyntheticConfig(num_sequences=16, prefill_tokens=4, decode_tokens=28, num_layers=4, num_experts=16, top_k=2)
HIDDEN = 16
ROUTED = range(GATED.num_layers - 1)  # anchors with a hidden state (the synthetic trace has no embedding)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_trace, test_trace = sequence_folds(synthetic_trace(STRUCTURED), 2)[0]
    yield train_trace, test_trace, train(train_trace, QUICK)
    torch.set_num_threads(threads)


def test_the_learned_model_beats_frequency_on_a_structured_trace(trained):
    train_trace, test_trace, learned = trained
    report = evaluate({"learned": learned, "frequency": FrequencyPredictor.fit(train_trace)}, test_trace)
    for distance, margin in ((1, 0.15), (2, 0.05)):  # the correlation is between adjacent layers
        assert (report.tally("learned", "decode", distance).recall_k
                > report.tally("frequency", "decode", distance).recall_k + margin)


def test_the_model_records_exactly_its_training_sequences(trained):
    train_trace, test_trace, learned = trained
    assert learned.train_sequences == tuple(train_trace.sequence_ids.tolist())
    assert not set(learned.train_sequences) & set(test_trace.sequence_ids.tolist())


def test_save_and_load_give_identical_predictions(trained, tmp_path):
    _, test_trace, learned = trained
    learned.save(tmp_path / "model.pt")
    loaded = LearnedPredictor.load(tmp_path / "model.pt")
    assert loaded.config == learned.config and loaded.layer_ids == learned.layer_ids
    batch = next(iter(anchor_batches(test_trace, QUICK.max_distance, anchors=range(1, 2))))
    assert np.array_equal(loaded.predict(batch.context, 3), learned.predict(batch.context, 3))


def test_training_is_seeded_and_its_length_is_chosen_on_held_back_training_tokens(trained, caplog):
    train_trace, test_trace, _ = trained
    searched = LearnedConfig(hidden_dim=16, expert_dim=16, token_buckets=0, max_steps=60, eval_every=20, patience=2)
    with caplog.at_level("INFO", logger="tiermem.predict"):
        first, second = train(train_trace, searched), train(train_trace, searched)
    assert "validation recall@2" in caplog.text and "nan" not in caplog.text
    batch = next(iter(anchor_batches(test_trace, QUICK.max_distance, anchors=range(1))))
    assert np.array_equal(first.predict(batch.context, 2), second.predict(batch.context, 2))


def test_loading_a_foreign_file_raises_trace_error(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(TraceError, match="not a"):
        LearnedPredictor.load(tmp_path / "foreign.pt")
    with pytest.raises(TraceError, match="does not exist"):
        LearnedPredictor.load(tmp_path / "missing.pt")


def test_asking_beyond_the_trained_distance_raises(trained):
    _, _, learned = trained
    context = RouteContext(num_experts=16, layer=0, current=np.full((1, 4, 2), -1, np.int16))
    with pytest.raises(TraceError, match="max-distance"):
        learned.predict(context, QUICK.max_distance + 1)
    assert learned.predict(context, QUICK.max_distance).shape == (QUICK.max_distance, 1, 16)


@pytest.fixture(scope="module")
def gated():
    """A trace whose every layer routes by a linear gate on a drifting hidden state; models with and without it."""
    trace, gates = gate_routed_trace(GATED, hidden_size=HIDDEN, drift=0.1)
    train_trace, test_trace = sequence_folds(trace, 2)[0]
    plain = LearnedConfig(hidden_dim=32, expert_dim=32, token_buckets=0, validation_fraction=0.0, max_steps=300,
                          learning_rate=5e-3, hidden_state=False)
    with_hidden = LearnedConfig(**{**plain.__dict__, "hidden_state": True})
    models = {"plain": train(train_trace, plain), "hidden": train(train_trace, with_hidden),
              "hidden+gates": train(train_trace, with_hidden, gates=torch.stack(gates))}
    return test_trace, gates, models


def test_hidden_states_let_the_model_learn_routing_that_is_linear_in_them(gated):
    test_trace, gates, models = gated
    report = evaluate({**models, "next-gate": NextGatePredictor(gates)}, test_trace, anchors=ROUTED)
    recall = {name: report.tally(name, "decode", 1).recall_k for name in report.predictors}
    assert recall["hidden"] > 0.6 and recall["hidden"] > recall["plain"] + 0.3
    assert recall["hidden+gates"] > recall["hidden"]  # starting at the routers beats learning them from scratch
    # Here routing is the routers' function of the hidden state and nothing else, so the routers themselves
    # are the optimum; training on 256 tokens keeps most of what they knew (it wins where history adds to it).
    assert recall["hidden+gates"] > recall["next-gate"] - 0.1


def test_a_model_trained_with_hidden_states_refuses_a_context_without_them(gated):
    test_trace, _, models = gated
    batch = next(iter(anchor_batches(test_trace, 2, anchors=range(1))))
    bare = RouteContext(num_experts=GATED.num_experts, layer=0, current=batch.context.current)
    with pytest.raises(TraceError, match="hidden"):
        models["hidden"].predict(bare, 2)
    assert models["plain"].predict(bare, 2).shape == (2, batch.rows.size, GATED.num_experts)
    first = RouteContext(num_experts=GATED.num_experts, layer=-1, current=np.full_like(batch.context.current, -1))
    assert models["hidden"].predict(first, 2).shape[0] == 2  # anchor -1 was trained without one (no embedding)


def test_a_model_with_hidden_paths_saves_and_loads_exactly(gated, tmp_path):
    test_trace, _, models = gated
    models["hidden+gates"].save(tmp_path / "model.pt")
    loaded = LearnedPredictor.load(tmp_path / "model.pt")
    batch = next(iter(anchor_batches(test_trace, 3, anchors=range(1, 2))))
    assert np.array_equal(loaded.predict(batch.context, 3), models["hidden+gates"].predict(batch.context, 3))


def test_a_file_of_an_older_format_is_refused_with_a_retrain_hint(trained, tmp_path):
    _, _, learned = trained
    learned.save(tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    saved["format"] = f"{FORMAT_NAME}/1"
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(TraceError, match="retrain"):
        LearnedPredictor.load(tmp_path / "old.pt")
