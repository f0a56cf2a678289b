"""Eviction policies: each one's ordering, the shared tie-break, the signals they read, the registry."""

from __future__ import annotations

import math

import numpy as np
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
from tiermem.residency.policies import priority_array
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


@pytest.mark.parametrize("half_life", [None, 1.0, 2.5, 7.0])
@pytest.mark.parametrize("seed", range(4))
def test_lfu_priority_array_equals_each_entrys_priority_and_tracking_keeps_the_counts(half_life, seed):
    rng = np.random.default_rng(seed)
    sizes = {2: 6, 5: 4}  # layer -> objects; a group holds layer 2 from place 0, layer 5 from place 6
    keys = [ObjectKey("expert", "w", layer, i) for layer, size in sizes.items() for i in range(size)]
    first, last_use = {2: 0, 5: 6}, rng.integers(0, 50, len(keys))
    elsewhere = [ObjectKey("expert", "v", 2, 1), ObjectKey("expert", "w", 2, 9)]  # another table; past the layer
    counts, untracked = ActivationCounts(half_life), ActivationCounts(half_life)  # the same uses, as a dict
    policy = make_policy("lfu", PolicySignals(counts=counts))

    def record(tick: int) -> None:
        picked = [keys[i] for i in rng.choice(len(keys), 4, replace=False)] + elsewhere[:rng.integers(0, 3)]
        uses = [(key, float(rng.integers(1, 5))) for key in picked]
        counts.record_many(uses, tick)
        untracked.record_many(uses, tick)

    def priorities(group_keys, group_first):
        return [policy.priority(entry(key, 0)) for key in group_keys], priority_array(
            policy, group_keys, group_first, last_use[:len(group_keys)])

    for tick in (0, 2, 4, 6, 8):
        record(tick)
    before = [counts.count(k) for k in keys + elsewhere]
    counts.track(keys[0], sizes[2])
    assert [counts.count(k) for k in keys + elsewhere] == before
    assert priorities(keys, first)[1] is None  # layer 5 is not tracked: the caller asks per entry
    counts.track(keys[6], 2)
    assert priorities(keys, first)[1] is None  # nor is all of it
    counts.track(keys[6], sizes[5])
    assert [counts.count(k) for k in keys + elsewhere] == before
    for tick in range(9, 21):
        if rng.random() < 0.7:
            record(tick)
        for group_keys, group_first in ((keys, first), (keys[:6], {2: 0})):  # a shared group; one layer's group
            expected, priority = priorities(group_keys, group_first)
            assert priority.dtype == np.float64 and priority.flags.writeable
            assert np.array_equal(priority, expected)
        assert np.allclose(priorities(keys, first)[1], [untracked.count(k) for k in keys], rtol=1e-12, atol=0)
    counts.reset()
    assert np.array_equal(priorities(keys, first)[1], np.zeros(len(keys)))


def test_a_large_tracked_layer_reads_bit_for_bit_as_its_keys_before_and_after_tracking():
    rng = np.random.default_rng(0)  # 256 objects of many ages: a last-ulp difference of two exp2s would show
    counts = ActivationCounts(half_life_ticks=7.3)
    policy = make_policy("lfu", PolicySignals(counts=counts))
    keys = [ObjectKey("expert", "w", 4, i) for i in range(256)]

    def record(ticks: range) -> None:
        for tick in ticks:
            counts.record_many([(keys[i], 1.0 + tick % 3) for i in rng.choice(256, 16, replace=False)], tick)

    record(range(60))
    before = [counts.count(k) for k in keys]
    counts.track(keys[0], 256)
    assert [counts.count(k) for k in keys] == before
    record(range(60, 90))
    priority = priority_array(policy, keys, {4: 0}, np.zeros(256, np.int64))
    assert priority.tolist() == [policy.priority(entry(k, 0)) for k in keys]


def test_a_tracked_count_recorded_at_the_latest_tick_is_not_decayed():
    counts = ActivationCounts(half_life_ticks=3)
    counts.track(K0, 4)
    counts.record(K0, tick=0, uses=8)
    counts.record_many([(K1, 3), (K2, 1.5)], tick=5)
    assert counts.layer_counts(K0).tolist() == [counts.count(K0), 3.0, 1.5, 0.0]
    assert counts.count(K0) == pytest.approx(8 * 0.5 ** (5 / 3))
    assert counts.layer_counts(ObjectKey("expert", "w", 1, 0)) is None


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
