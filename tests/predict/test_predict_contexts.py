"""Replayed contexts hold only the past, and their targets are the routing that actually followed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiermem.errors import TraceError
from tiermem.predict.contexts import EMBEDDING, anchor_batches, with_row_extras
from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace, sequence_folds

CONFIG = SyntheticConfig(num_sequences=4, prefill_tokens=4, decode_tokens=6, num_layers=3, num_experts=8,
                         layer_correlation=0.5, reuse_probability=0.3)
DISTANCE = 4
HIDDEN = 6


def with_hidden_states(trace: RouteTrace, seed: int = 0) -> RouteTrace:
    """``trace`` with random router inputs per (token, layer) and an embedding per token."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((trace.num_tokens, trace.num_layers, HIDDEN)).astype(np.float16)
    embedding = rng.standard_normal((trace.num_tokens, HIDDEN)).astype(np.float16)
    return replace(trace, hidden=hidden, extras={EMBEDDING: embedding})


def contexts_by_anchor(trace: RouteTrace) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for batch in anchor_batches(trace, DISTANCE, anchors=range(-1, trace.num_layers), max_batch_tokens=16):
        grouped.setdefault(batch.anchor_layer, []).append(batch)
    return grouped


def test_a_context_never_contains_layers_after_its_anchor():
    trace = synthetic_trace(CONFIG)
    for anchor, batches in contexts_by_anchor(trace).items():
        for batch in batches:
            assert np.all(batch.context.current[:, anchor + 1:] == -1)
            assert np.array_equal(batch.context.current[:, :anchor + 1], trace.experts[batch.rows, :anchor + 1])
            same_pass = batch.phase == PREFILL
            assert np.all(batch.context.previous[same_pass][:, anchor + 1:] == -1)
            assert np.all(batch.context.activation[same_pass][:, anchor + 1:] == 0)


def test_changing_the_future_leaves_every_earlier_context_bit_identical():
    trace = synthetic_trace(CONFIG)
    rng = np.random.default_rng(1)
    cut_row, cut_layer = 17, 1  # a decode token of sequence 1, after layer 1 has been routed
    assert trace.phase[cut_row] == DECODE
    future = trace.experts.copy()
    future[cut_row, cut_layer + 1:] = rng.permutation(CONFIG.num_experts)[:CONFIG.top_k]
    future[cut_row + 1:] = np.argsort(rng.random(future[cut_row + 1:].shape[:2] + (CONFIG.num_experts,)),
                                      axis=2)[:, :, :CONFIG.top_k]
    changed = RouteTrace(experts=future, seq_id=trace.seq_id, pos=trace.pos, phase=trace.phase,
                         num_experts=CONFIG.num_experts, token_ids=trace.token_ids)
    before, after = contexts_by_anchor(trace), contexts_by_anchor(changed)
    compared = _compare_before_the_cut(before, after, cut_row, cut_layer, ("current", "previous", "activation",
                                                                         "token_ids"))
    anchors = trace.num_layers + 1
    assert compared == cut_row * anchors + (cut_layer + 2)  # every row before the cut, and the cut row up to it


def _compare_before_the_cut(before: dict, after: dict, cut_row: int, cut_layer: int, names: tuple[str, ...]) -> int:
    """Assert the contexts of every (row, anchor) up to the cut are bit-identical in ``names``; returns how many."""
    compared = 0
    for anchor in before:
        for old, new in zip(before[anchor], after[anchor]):
            for index, row in enumerate(old.rows):
                if row > cut_row or (row == cut_row and anchor > cut_layer):
                    continue
                for name in names:
                    old_value, new_value = getattr(old.context, name)[index], getattr(new.context, name)[index]
                    assert np.array_equal(np.asarray(old_value), np.asarray(new_value)), name
                compared += 1
    return compared


def test_the_hidden_state_is_the_anchor_layers_router_input_and_the_embedding_before_layer_zero():
    trace = with_hidden_states(synthetic_trace(CONFIG))
    for anchor, batches in contexts_by_anchor(trace).items():
        source = trace.extras[EMBEDDING] if anchor < 0 else trace.hidden[:, anchor]
        for batch in batches:
            assert np.array_equal(batch.context.hidden.numpy(), source[batch.rows].astype(np.float32))
    without_embedding = replace(trace, extras={})
    assert all(b.context.hidden is None for b in contexts_by_anchor(without_embedding)[-1])


def test_changing_future_routing_and_hidden_states_leaves_every_earlier_context_bit_identical():
    trace = with_hidden_states(synthetic_trace(CONFIG))
    rng = np.random.default_rng(2)
    cut_row, cut_layer = 17, 1
    experts, hidden, embedding = trace.experts.copy(), trace.hidden.copy(), trace.extras[EMBEDDING].copy()
    experts[cut_row + 1:] = np.argsort(rng.random(experts[cut_row + 1:].shape[:2] + (CONFIG.num_experts,)),
                                       axis=2)[:, :, :CONFIG.top_k]
    hidden[cut_row, cut_layer + 1:] = rng.standard_normal(hidden[cut_row, cut_layer + 1:].shape)  # layers > anchor
    hidden[cut_row + 1:] = rng.standard_normal(hidden[cut_row + 1:].shape)
    embedding[cut_row + 1:] = rng.standard_normal(embedding[cut_row + 1:].shape)
    changed = replace(trace, experts=experts, hidden=hidden, extras={EMBEDDING: embedding})
    before, after = contexts_by_anchor(trace), contexts_by_anchor(changed)
    compared = _compare_before_the_cut(before, after, cut_row, cut_layer, ("current", "previous", "activation",
                                                                         "token_ids", "hidden"))
    assert compared == cut_row * (trace.num_layers + 1) + (cut_layer + 2)
    old, new = (next(b for b in batches[cut_layer + 1] if cut_row in b.rows) for batches in (before, after))
    row = int(np.flatnonzero(old.rows == cut_row)[0])  # the first anchor past the cut sees the change
    assert not np.array_equal(old.context.hidden[row].numpy(), new.context.hidden[row].numpy())


def test_folds_carry_each_rows_embedding_and_a_misshapen_embedding_raises():
    trace = with_hidden_states(synthetic_trace(CONFIG))
    for part in sequence_folds(trace, 2)[0]:
        carried = with_row_extras(part, trace)
        rows = np.flatnonzero(np.isin(trace.seq_id, part.sequence_ids))
        assert np.array_equal(carried.extras[EMBEDDING], trace.extras[EMBEDDING][rows])
    broken = replace(trace, extras={EMBEDDING: trace.extras[EMBEDDING][:, :2]})
    with pytest.raises(TraceError, match="embedding"):
        list(anchor_batches(broken, 1, anchors=range(-1, 0)))


def test_targets_are_the_experts_the_token_met_at_each_distance():
    trace = synthetic_trace(CONFIG)
    layers = trace.num_layers
    for anchor, batches in contexts_by_anchor(trace).items():
        for batch in batches:
            for distance in range(1, DISTANCE + 1):
                steps, layer = divmod(anchor + distance, layers)
                for index, row in enumerate(batch.rows):
                    later = row + steps
                    same = later < trace.num_tokens and trace.seq_id[later] == trace.seq_id[row]
                    allowed = steps == 0 or (same and trace.phase[later] == DECODE)
                    expected = trace.experts[later, layer] if same and allowed else np.full(CONFIG.top_k, -1)
                    assert np.array_equal(batch.targets[distance - 1, index], expected)


def test_prefill_targets_never_wrap_into_another_prompt_token():
    trace = synthetic_trace(CONFIG)
    last = trace.num_layers - 1
    for batch in contexts_by_anchor(trace)[last]:
        next_is_prompt = np.isin(batch.rows + 1, np.flatnonzero(trace.phase == PREFILL))
        assert np.all(batch.targets[0][next_is_prompt] == -1)
