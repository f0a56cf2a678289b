"""The trace format: round trips, validation, splits by sequence and the shared real traces."""

from __future__ import annotations

import numpy as np
import pytest

from tiermem.errors import TraceError
from tiermem.predict.synthetic import SyntheticConfig, gate_routed_trace, synthetic_trace
from tiermem.predict.trace import (
    DECODE,
    RouteTrace,
    load_trace,
    save_trace,
    sequence_folds,
    split_by_sequence,
)

SEQUENCES = 6
SMALL = SyntheticConfig(num_sequences=SEQUENCES, prefill_tokens=3, decode_tokens=5, num_layers=4, num_experts=8)


def tiny_trace(**overrides) -> RouteTrace:
    fields = {
        "experts": np.array([[[0, 1], [2, 3]], [[1, 2], [-1, -1]], [[3, 0], [1, 2]]]),
        "seq_id": [0, 0, 1], "pos": [0, 1, 0], "phase": [0, 1, 0], "num_experts": 4,
    }
    fields.update(overrides)
    return RouteTrace(**fields)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    trace, _ = gate_routed_trace(SMALL, hidden_size=4)
    trace = RouteTrace(
        experts=trace.experts, seq_id=trace.seq_id, pos=trace.pos, phase=trace.phase, num_experts=8,
        model="m", weights=np.full(trace.experts.shape, 0.5), token_ids=trace.token_ids, hidden=trace.hidden,
        layer_ids=[1, 3, 5, 7], source="test", extras={"prompt_len": np.arange(SEQUENCES)},
    )
    save_trace(trace, tmp_path / "t.npz")
    loaded = load_trace(tmp_path / "t.npz")
    for name in ("experts", "seq_id", "pos", "phase", "weights", "token_ids", "hidden", "layer_ids"):
        original, again = getattr(trace, name), getattr(loaded, name)
        assert original.dtype == again.dtype and np.array_equal(original, again), name
    assert (loaded.num_experts, loaded.top_k, loaded.model, loaded.source) == (8, 2, "m", "test")
    assert np.array_equal(loaded.extras["prompt_len"], np.arange(SEQUENCES))


def test_saved_file_reads_with_plain_numpy_and_no_pickle(tmp_path):
    save_trace(tiny_trace(), tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as data:
        assert data["experts"].dtype == np.int16
        assert data["layers"].tolist() == [0, 1]
        assert int(data["top_k"]) == 2


def test_traces_are_immutable():
    trace = tiny_trace()
    with pytest.raises(ValueError):
        trace.experts[0, 0, 0] = 3


@pytest.mark.parametrize(("overrides", "message"), [
    ({"experts": np.array([[[0, 9], [2, 3]]] * 3)}, "outside"),
    ({"experts": np.array([[[1, 1], [2, 3]]] * 3)}, "repeat"),
    ({"pos": [1, 0, 0]}, "sorted"),
    ({"seq_id": [1, 1, 0]}, "sorted"),
    ({"phase": [0, 2, 0]}, "phase"),
    ({"seq_id": [0, 0]}, "one per token"),
    ({"experts": np.zeros((3, 2, 2)) + 0.5}, "integers"),
    ({"layer_ids": [3, 1]}, "ascending"),
    ({"extras": {"experts": np.zeros(1)}}, "reserved"),
])
def test_invalid_traces_raise_errors_that_name_the_problem(overrides, message):
    with pytest.raises(TraceError, match=message):
        tiny_trace(**overrides)


def test_loading_a_missing_or_foreign_file_raises_trace_error(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(TraceError, match="lacks the required"):
        load_trace(tmp_path / "other.npz")


def test_restricting_to_layers_with_data_keeps_the_real_layer_indices():
    experts = np.full((2, 6, 1), -1)
    experts[:, [0, 4], 0] = [[1, 2], [3, 0]]
    trace = RouteTrace(experts=experts, seq_id=[0, 0], pos=[0, 1], phase=[0, 1], num_experts=4)
    restricted = trace.restrict_to_layers_with_data()
    assert restricted.layer_ids.tolist() == [0, 4] == trace.layers.tolist()
    assert restricted.experts[:, :, 0].tolist() == [[1, 2], [3, 0]]


def test_sequence_folds_are_disjoint_cover_everything_and_never_split_a_sequence():
    trace = synthetic_trace(SMALL)
    folds = sequence_folds(trace, 2)
    tested = np.concatenate([test.sequence_ids for _, test in folds])
    assert sorted(tested.tolist()) == list(range(SEQUENCES))
    for train, test in folds:
        assert np.intersect1d(train.sequence_ids, test.sequence_ids).size == 0
        assert np.all(test.sequence_ids % 2 == test.sequence_ids[0] % 2)
        for part in (train, test):
            for seq in part.sequence_ids:
                assert (part.seq_id == seq).sum() == (trace.seq_id == seq).sum()


def test_split_by_sequence_is_seeded_and_disjoint():
    trace = synthetic_trace(SMALL)
    train, test = split_by_sequence(trace, 0.5, seed=3)
    again = split_by_sequence(trace, 0.5, seed=3)[1]
    assert np.array_equal(test.sequence_ids, again.sequence_ids)
    assert np.intersect1d(train.sequence_ids, test.sequence_ids).size == 0
    assert train.num_tokens + test.num_tokens == trace.num_tokens


def test_folds_of_a_single_sequence_raise():
    with pytest.raises(TraceError, match="folds"):
        sequence_folds(synthetic_trace(SyntheticConfig(num_sequences=1)), 2)


def test_decode_steps_yield_each_sequences_decode_rows_in_order():
    trace = synthetic_trace(SMALL)
    steps = list(trace.decode_steps())
    assert [seq for seq, _ in steps] == list(range(SEQUENCES))
    for seq, rows in steps:
        assert np.all(trace.phase[rows] == DECODE) and np.all(np.diff(trace.pos[rows]) == 1)
        assert rows.size == SMALL.decode_tokens


def test_masking_unaligned_layers_blanks_only_decode_rows_of_bad_pairs():
    trace = synthetic_trace(SMALL)
    layer_ok = np.ones((SEQUENCES, SMALL.num_layers), dtype=bool)
    layer_ok[2, 1] = False
    flagged = RouteTrace(experts=trace.experts, seq_id=trace.seq_id, pos=trace.pos, phase=trace.phase,
                         num_experts=8, extras={"layer_ok": layer_ok})
    masked = flagged.mask_unaligned_layers()
    blanked = (masked.experts < 0).all(axis=2)
    expected = np.zeros_like(blanked)
    expected[(trace.seq_id == 2) & (trace.phase == DECODE), 1] = True
    assert np.array_equal(blanked, expected)


def test_shared_traces_load_as_they_are(shared_traces, tmp_path):
    expected = {  # file: (tokens, sequences, layers with data, experts, top-k), from the traces' README
        "qwen1.5-moe-a2.7b-chat_vllm-moe-logger.npz": (3521, 25, [0, 8, 12, 18, 23], 60, 4),
        "mixtral-8x7b-instruct-fp8_speculative-moe.npz": (720, 4, list(range(32)), 8, 2),
        "qwen1.5-moe-a2.7b_fiddler-usage.npz": (26, 1, list(range(24)), 60, 4),
    }
    for name, (tokens, sequences, layers, experts, top_k) in expected.items():
        trace = load_trace(shared_traces / name)
        assert (trace.num_tokens, trace.sequence_ids.size, trace.num_experts, trace.top_k) == (
            tokens, sequences, experts, top_k)
        assert trace.layers.tolist() == layers
        save_trace(trace, tmp_path / name)
        assert np.array_equal(load_trace(tmp_path / name).experts, trace.experts)
