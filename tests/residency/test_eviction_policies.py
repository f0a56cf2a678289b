"""Eviction policies: each one's ordering, the shared tie-break, the signals they read, the registry."""

from __future__ import annotations

import math

import pytest

from tiermem.errors import ConfigError, RegistryError
from tiermem.residency import (
    EVICTION_POLICIES,
    ActivationCounts,
    CacheEntry,
    FutureUses,
    PolicySignals,
    PredictionScores,
    eviction_order,
    make_policy,
)
from tiermem.types import ObjectKey

K0, K1, K2, K3 = (ObjectKey("expert", "w", 0, i) for i in range(4))


def entry(key: ObjectKey, last_use_tick: int) -> CacheEntry:
    return CacheEntry(key=key, slot=key.index, loaded_tick=0, last_use_tick=last_use_tick)


def test_registry_lists_the_four_policies():
    assert EVICTION_POLICIES.names() == ["belady", "lfu", "lru", "predicted"]


def test_lru_evicts_the_least_recently_used_first():
    entries = [entry(K0, 5), entry(K1, 2), entry(K2, 9)]
    assert eviction_order(entries, make_policy("lru", PolicySignals())) == [K1, K0, K2]


def test_lfu_evicts_the_least_activated_first_and_breaks_ties_by_recency():
    counts = ActivationCounts()
    for key, uses in ((K0, 3), (K1, 1), (K2, 1)):
        counts.record(key, tick=1, uses=uses)
    entries = [entry(K0, 1), entry(K1, 8), entry(K2, 4)]
    assert eviction_order(entries, make_policy("lfu", PolicySignals(counts=counts))) == [K2, K1, K0]


def test_lfu_counts_survive_eviction_and_decay_halves_them_per_half_life():
    counts = ActivationCounts(half_life_ticks=10)
    counts.record(K0, tick=0, uses=8)
    counts.record(K1, tick=20, uses=3)
    assert counts.count(K0) == pytest.approx(2.0)  # two half-lives later
    assert counts.count(K1) == 3.0
    order = eviction_order([entry(K0, 0), entry(K1, 20)], make_policy("lfu", PolicySignals(counts=counts)))
    assert order == [K0, K1]


def test_recording_a_layers_counts_at_once_equals_recording_them_one_by_one():
    one_by_one, at_once = ActivationCounts(half_life_ticks=10), ActivationCounts(half_life_ticks=10)
    for tick, uses in ((0, ((K0, 8), (K1, 2))), (10, ((K0, 1), (K2, 4))), (30, ((K1, 5),))):
        for key, count in uses:
            one_by_one.record(key, tick, count)
        at_once.record_many(uses, tick)
    assert [at_once.count(k) for k in (K0, K1, K2, K3)] == [one_by_one.count(k) for k in (K0, K1, K2, K3)]
    assert at_once.count(K0) == pytest.approx((8 * 0.5 + 1) * 0.25)


def test_predicted_policy_evicts_the_lowest_predicted_score_first():
    scores = PredictionScores()
    scores.update({K0: 0.9, K1: 0.1, K2: 0.5})  # K3 never predicted: score 0
    entries = [entry(K0, 1), entry(K1, 2), entry(K2, 3), entry(K3, 4)]
    assert eviction_order(entries, make_policy("predicted", PolicySignals(predictions=scores))) == [K3, K1, K2, K0]


def test_a_forgotten_layer_is_unpredicted_again_and_ranks_by_recency():
    scores = PredictionScores()
    scores.publish(K0, [0.9, 0.1, 0.5, 0.2])  # K0..K3 are one layer's objects 0..3
    scores.update({K1: 0.7})
    policy = make_policy("predicted", PolicySignals(predictions=scores))
    entries = [entry(K0, 4), entry(K1, 1), entry(K2, 3), entry(K3, 2)]
    assert eviction_order(entries, policy) == [K3, K2, K1, K0]
    scores.forget(K2)  # any key of the layer names it
    assert scores.layer(K0) is None and all(scores.score(k) == 0.0 for k in (K0, K1, K2, K3))
    assert eviction_order(entries, policy) == [K1, K3, K2, K0]  # least recently used first


def test_belady_evicts_the_object_used_furthest_in_the_future_first():
    future = FutureUses({K0: [3, 20], K1: [7], K2: [15]})
    future.advance(5)
    assert future.next_use(K0) == 20 and future.next_use(K3) == math.inf
    entries = [entry(K0, 3), entry(K1, 0), entry(K2, 0), entry(K3, 0)]
    assert eviction_order(entries, make_policy("belady", PolicySignals(future=future))) == [K3, K0, K2, K1]


def test_equal_priorities_fall_back_to_recency_then_key():
    entries = [entry(K2, 1), entry(K0, 1), entry(K1, 0)]
    assert eviction_order(entries, make_policy("predicted", PolicySignals(predictions=PredictionScores()))) == [
        K1, K0, K2,
    ]


def test_a_policy_without_its_signal_says_what_is_missing():
    with pytest.raises(ConfigError, match="'belady' reads the future uses"):
        make_policy("belady", PolicySignals())
    with pytest.raises(ConfigError, match="'lfu' reads activation counts"):
        make_policy("lfu", PolicySignals())


def test_unknown_policy_and_unknown_option_raise():
    with pytest.raises(RegistryError, match="registered: \\['belady', 'lfu', 'lru', 'predicted'\\]"):
        make_policy("fifo", PolicySignals())
    with pytest.raises(ConfigError, match="unknown key"):
        make_policy("lru", PolicySignals(), {"size": 3})


def test_future_clock_cannot_go_backwards():
    future = FutureUses({})
    future.advance(4)
    with pytest.raises(ConfigError, match="cannot go back"):
        future.advance(3)
