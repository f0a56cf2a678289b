"""The slot groups' arrays (``GroupState``) against the directory and the key-based planners they stand in for.

Random demands and prefetches drive a real cache and prefetcher (CPU stand-in, ``sim`` tier); after
every step the arrays must say what the directory says, the array-ranked eviction order must equal
the policy's own order, and each prefetch must load and evict exactly what ``plan_prefetch`` plans
from the same state.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.experts.cache import ExpertCache
from tiermem.experts.sources import ModuleExperts
from tiermem.experts.store import ExpertStore
from tiermem.manager import TierManager
from tiermem.predict.base import RouteContext
from tiermem.prefetch.planner import PrefetchBudget, plan_prefetch
from tiermem.prefetch.prefetcher import PrefetchConfig, Prefetcher
from tiermem.residency.groups import IN_FLIGHT, RESIDENT
from tiermem.residency.policies import PolicySignals, eviction_order
from tiermem.residency.signals import ActivationCounts, PredictionScores
from tiermem.residency.slots import SlotLayout
from tiermem.types import ObjectKey

from .conftest import NUM_EXPERTS, TOP_K, FusedExperts

LAYERS = (0, 1)


class SetScores:
    """A predictor whose scores the test sets before each prefetch."""

    def __init__(self) -> None:
        self.values = np.zeros(NUM_EXPERTS)

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        return np.broadcast_to(self.values, (distance, 1, NUM_EXPERTS)).astype(np.float64)


def _build(policy: str, slots: int, slot_layout: SlotLayout, objects: int):
    manager = TierManager.from_config({"tiers": [{"kind": "sim", "capacity_bytes": "4MiB", "arena_bytes": "1MiB"}]})
    store = ExpertStore.from_source(manager, ModuleExperts(dict.fromkeys(LAYERS, FusedExperts())), tier="sim")
    counts, predictions, predictor = ActivationCounts(half_life_ticks=2.0), PredictionScores(), SetScores()
    keys = [tuple(store.key(layer, e) for e in range(NUM_EXPERTS)) for layer in LAYERS]
    cache = ExpertCache(layout=store.layout, layers=LAYERS, keys=keys, slots_per_group=slots, slot_layout=slot_layout,
                        device=torch.device("cpu"), policy=policy,
                        signals=PolicySignals(counts=counts, predictions=predictions))
    prefetcher = Prefetcher(cache, store, manager, predictor=predictor, predictions=predictions,
                            config=PrefetchConfig(distance=1, objects_per_layer=objects, link_fill=None))
    return manager, store, cache, prefetcher, predictor, predictions, counts


def _check_mirror(cache: ExpertCache) -> None:
    for group, state in enumerate(cache.groups):
        for place, key in enumerate(state.keys):
            resident, in_flight = cache.directory.is_resident(key), cache.directory.is_in_flight(key)
            assert state.state[place] == (RESIDENT if resident else IN_FLIGHT if in_flight else 0)
            assert state.pins[place] == cache.directory.pin_count(key)
        policy_order = eviction_order((cache.entries[k] for k in cache.resident(group)), cache.policy)
        assert cache.order(group) == policy_order


def _reference(cache, store, predictions, values, objects, needed):
    first = store.key(1, 0)
    predictions.publish(first, values)  # what the prefetcher publishes before it plans
    group = cache.group_of(first)
    order = eviction_order((cache.entries[k] for k in cache.resident(group)), cache.policy)
    block = store.layout.block_bytes
    return plan_prefetch({store.key(1, e): float(values[e]) for e in range(NUM_EXPERTS)}, order,
                         cache.in_flight(group), cache.pinned(), cache.free_slots(group),
                         PrefetchBudget(max_bytes=objects * block, object_bytes=block), needed,
                         resident_score=lambda key: float(values[key.index]) if key.layer == 1 else float("-inf"))


def _prefetch_and_compare(cache, store, prefetcher, predictions, predictor, values, objects, tick, needed):
    plan = _reference(cache, store, predictions, values, objects, needed)
    before = set(cache.entries)
    predictor.values = values
    current = np.full((1, len(LAYERS), TOP_K), -1, dtype=np.int16)
    issued = prefetcher.prefetch(RouteContext(num_experts=NUM_EXPERTS, layer=0, current=current), tick,
                                 needed_now=needed)
    after = set(cache.entries)
    assert issued == len(plan.loads)
    assert after - before == set(plan.loads) and before - after == set(plan.evictions)


steps = st.lists(st.tuples(st.sampled_from(["serve0", "serve1", "prefetch", "prefetch_in_wave0", "prefetch_in_wave1",
                                            "land", "forget0", "forget1"]),
                           st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=1, max_size=TOP_K * 2, unique=True),
                           st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=NUM_EXPERTS,
                                    max_size=NUM_EXPERTS)),
                 min_size=1, max_size=14)


@given(st.sampled_from(["lru", "predicted", "lfu"]), st.sampled_from([SlotLayout.PER_LAYER, SlotLayout.SHARED]),
       st.integers(1, 3), steps)
@settings(max_examples=60, deadline=None)
def test_group_arrays_mirror_the_directory_and_plan_as_the_key_based_planners(policy, slot_layout, objects, ops):
    slots = TOP_K * 2 if slot_layout is SlotLayout.PER_LAYER else TOP_K * 4
    manager, store, cache, prefetcher, predictor, predictions, counts = _build(policy, slots, slot_layout, objects)
    try:
        for tick, (op, experts, scores) in enumerate(ops):
            values = np.array(scores)
            if op in ("serve0", "serve1"):
                counts.record_many([(store.key(int(op[-1]), e), scores[e] * 10) for e in experts], tick)  # routed uses
                for wave in prefetcher.demand([store.key(int(op[-1]), e) for e in sorted(experts)], tick):
                    prefetcher.ready_all(wave)  # lands them, as the runtime's compute does
                    _check_mirror(cache)
            elif op == "prefetch":
                _prefetch_and_compare(cache, store, prefetcher, predictions, predictor, values, objects, tick,
                                      frozenset())
            elif op.startswith("prefetch_in_wave"):  # a layer's wave is pinned while layer 1 is prefetched
                layer = int(op[-1])
                wanted = [store.key(layer, e) for e in sorted(experts)]
                for wave in prefetcher.demand(wanted, tick):
                    prefetcher.ready_all(wave)
                    # layer 1's own wave is also needed now; layer 0's (a shared group) protected by its pins only
                    needed = frozenset(wanted) if layer == 1 else frozenset()
                    _prefetch_and_compare(cache, store, prefetcher, predictions, predictor, values, objects, tick,
                                          needed)
                    _check_mirror(cache)
            elif op.startswith("forget"):  # a skipped prediction: the layer ranks by recency again
                predictions.forget(store.key(int(op[-1]), 0))
            else:
                prefetcher.drain()
            _check_mirror(cache)
    finally:
        manager.close()


def test_published_scores_are_read_per_key_and_a_later_update_of_one_key_wins():
    scores = PredictionScores()
    first = ObjectKey("expert", "w", 3, 0)
    scores.update({ObjectKey("expert", "w", 3, 1): 7.0, ObjectKey("expert", "w", 4, 1): 2.0})
    scores.publish(first, np.array([0.5, 0.25, 0.0]))
    assert scores.score(ObjectKey("expert", "w", 3, 1)) == 0.25  # the publication replaced the older update
    assert scores.score(ObjectKey("expert", "w", 4, 1)) == 2.0  # another layer keeps its own
    scores.update({ObjectKey("expert", "w", 3, 2): 0.75})
    assert scores.layer(first).tolist() == [0.5, 0.25, 0.75]
    assert scores.score(ObjectKey("expert", "w", 3, 9)) == 0.0  # never predicted
    assert not scores.layer(first).flags.writeable
