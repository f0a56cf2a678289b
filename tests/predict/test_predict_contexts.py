"""Replayed contexts hold only the past, and their targets are the routing that actually followed."""

from __future__ import annotations

import numpy as np

from tiermem.predict.contexts import anchor_batches
from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace

CONFIG = SyntheticConfig(num_sequences=4, prefill_tokens=4, decode_tokens=6, num_layers=3, num_experts=8,
                         layer_correlation=0.5, reuse_probability=0.3)
DISTANCE = 4


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
    compared = 0
    for anchor in before:
        for old, new in zip(before[anchor], after[anchor]):
            for index, row in enumerate(old.rows):
                if row > cut_row or (row == cut_row and anchor > cut_layer):
                    continue
                for name in ("current", "previous", "activation", "token_ids"):
                    assert np.array_equal(getattr(old.context, name)[index], getattr(new.context, name)[index]), name
                compared += 1
    anchors = trace.num_layers + 1
    assert compared == cut_row * anchors + (cut_layer + 2)  # every row before the cut, and the cut row up to it


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
