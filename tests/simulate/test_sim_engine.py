"""Trace replay on synthetic traces whose hit rates are known, prefetch through any predictor, batching."""

from __future__ import annotations

import numpy as np
import pytest
from simtraces import ShiftPredictor, WrongShapePredictor, optimal_misses, trace_of

from tiermem.errors import ConfigError, TraceError
from tiermem.simulate import CacheLifetime, SimConfig, simulate, synthetic_trace

EXPERTS = 8
STEPS = 40


def test_repeating_the_same_experts_misses_only_once():
    trace = trace_of([[[1, 2]]] * STEPS, EXPERTS)
    for policy in ("lru", "lfu", "belady"):
        result = simulate(trace, SimConfig(policy=policy, resident_fraction=0.25))
        assert result.hits == 2 * (STEPS - 1) and result.demands == 2 * STEPS


def test_cyclic_access_over_one_more_expert_than_slots_defeats_lru_but_not_belady():
    slots = 3
    trace = trace_of([[[t % (slots + 1)]] for t in range(STEPS)], EXPERTS)
    lru = simulate(trace, SimConfig(policy="lru", resident_fraction=slots / EXPERTS))
    belady = simulate(trace, SimConfig(policy="belady", resident_fraction=slots / EXPERTS))
    assert lru.hits == 0
    assert belady.demands - belady.hits == optimal_misses([frozenset({t % (slots + 1)}) for t in range(STEPS)], slots)
    assert belady.hits > 0


def test_a_cache_holding_every_expert_misses_each_expert_once():
    trace = synthetic_trace(num_layers=3, num_experts=EXPERTS, top_k=2, num_sequences=2, decode_steps=STEPS)
    result = simulate(trace, SimConfig(policy="lru", resident_fraction=1.0, lifetime=CacheLifetime.WHOLE_TRACE))
    distinct = sum(len(np.unique(trace.experts[:, layer])) for layer in range(3))
    assert result.demands - result.hits == distinct


def test_flat_random_routing_gives_lru_about_the_resident_fraction():
    trace = synthetic_trace(num_layers=2, num_experts=32, top_k=1, num_sequences=1, decode_steps=3000, seed=3)
    result = simulate(trace, SimConfig(policy="lru", resident_fraction=0.25))
    assert result.hit_rate == pytest.approx(0.25, abs=0.03)


def test_prefill_tokens_are_never_counted_but_can_warm_the_cache():
    steps = [[[3]], [[3]], [[3]]]
    trace = trace_of(steps, EXPERTS, phase=[0, 1, 1])
    cold = simulate(trace, SimConfig(resident_fraction=0.25))
    warm = simulate(trace, SimConfig(resident_fraction=0.25, warm_with_prefill=True))
    assert (cold.demands, cold.hits) == (2, 1)
    assert (warm.demands, warm.hits) == (2, 2)


def test_per_batch_lifetime_starts_each_sequence_cold():
    trace = trace_of([[[5]], [[5]], [[5]], [[5]]], EXPERTS, seq_id=[0, 0, 1, 1])
    per_batch = simulate(trace, SimConfig(resident_fraction=0.25))
    whole = simulate(trace, SimConfig(resident_fraction=0.25, lifetime=CacheLifetime.WHOLE_TRACE))
    assert per_batch.hits == 2 and whole.hits == 3


def test_batching_interleaves_sequences_step_aligned_and_counts_distinct_experts():
    trace = trace_of([[[1]], [[2]], [[1]], [[3]], [[1]]], EXPERTS, seq_id=[0, 0, 1, 1, 1])
    result = simulate(trace, SimConfig(resident_fraction=0.5, batch_size=2))
    # steps: {1,1} -> 1 demand; {2,3} -> 2; {1} -> 1 (resident)
    assert (result.steps, result.tokens, result.demands, result.hits) == (3, 5, 4, 1)


def test_perfect_cross_layer_prefetch_makes_every_later_layer_hit():
    rng = np.random.default_rng(0)
    firsts = rng.integers(0, EXPERTS, STEPS)
    trace = trace_of([[[int(e)], [int(e + 1) % EXPERTS], [int(e + 2) % EXPERTS]] for e in firsts], EXPERTS)
    config = SimConfig(policy="predicted", resident_fraction=1 / EXPERTS, prefetch_distance=1,
                       prefetch_experts_per_layer=1)
    result = simulate(trace, config, predictor=ShiftPredictor(EXPERTS))
    lru = simulate(trace, SimConfig(policy="lru", resident_fraction=1 / EXPERTS))
    assert [s.hit_rate for s in result.per_layer[1:]] == [1.0, 1.0]
    assert result.hit_rate > lru.hit_rate
    assert 0 < result.prefetch_used <= result.prefetch_loads <= 3 * STEPS  # 1 expert per layer per step


def test_prefetch_never_exceeds_its_per_layer_budget():
    trace = synthetic_trace(num_layers=3, num_experts=EXPERTS, top_k=2, num_sequences=2, decode_steps=STEPS)
    config = SimConfig(policy="lru", resident_fraction=0.5, prefetch_distance=2, prefetch_experts_per_layer=1)
    result = simulate(trace, config, predictor=ShiftPredictor(EXPERTS))
    # each routed layer prefetches into at most 2 later layers, 1 expert each
    assert result.prefetch_loads <= 2 * 3 * result.steps


def test_prefetch_needs_a_predictor_and_a_valid_distance():
    trace = trace_of([[[1], [2]]] * 3, EXPERTS)
    with pytest.raises(ConfigError, match="a prefetch distance needs a predictor"):
        simulate(trace, SimConfig(prefetch_distance=1, prefetch_experts_per_layer=1))
    with pytest.raises(ConfigError, match="must be below the 2 traced layers"):
        simulate(trace, SimConfig(prefetch_distance=2, prefetch_experts_per_layer=1), predictor=ShiftPredictor(EXPERTS))
    with pytest.raises(ConfigError, match="'predicted' ranks by the prefetcher's scores"):
        SimConfig(policy="predicted")


def test_a_predictor_returning_the_wrong_shape_is_named():
    trace = trace_of([[[1], [2]]] * 3, EXPERTS)
    config = SimConfig(prefetch_distance=1, prefetch_experts_per_layer=1)
    with pytest.raises(TraceError, match="WrongShapePredictor returned scores of shape"):
        simulate(trace, config, predictor=WrongShapePredictor())


def test_a_layer_needing_more_experts_than_slots_runs_in_waves():
    trace = synthetic_trace(num_layers=1, num_experts=EXPERTS, top_k=4, num_sequences=4, decode_steps=10)
    result = simulate(trace, SimConfig(policy="belady", resident_fraction=0.25, batch_size=4))
    assert result.demands > 0 and 0.0 <= result.hit_rate < 1.0


def test_cost_model_timing_is_attached_when_a_cost_model_is_given(cost_model):
    trace = synthetic_trace(num_layers=2, num_experts=EXPERTS, top_k=2, num_sequences=1, decode_steps=STEPS)
    result = simulate(trace, SimConfig(resident_fraction=0.5), cost=cost_model)
    assert result.timing is not None
    assert result.timing.bytes_moved == result.demand_loads * cost_model.expert_bytes
    assert result.timing.tokens == STEPS


def test_malformed_trace_is_rejected_with_the_expected_shape():
    with pytest.raises(TraceError, match="expert ids must lie in -1..7"):
        trace_of([[[9]]], EXPERTS)
