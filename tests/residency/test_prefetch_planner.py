"""Prefetch and demand planners: pure functions whose plans respect budget, pins, in-flight copies and room."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import CapacityError
from tiermem.prefetch import PrefetchBudget, plan_demand, plan_prefetch
from tiermem.types import ObjectKey

EXPERTS = 12
OBJECT_BYTES = 1000
KEYS = [ObjectKey("expert", "w", 0, i) for i in range(EXPERTS)]


@st.composite
def planner_states(draw):
    """A random group state: disjoint resident / in-flight sets, pins and needs among residents, scores."""
    roles = draw(st.lists(st.sampled_from(["absent", "resident", "in_flight"]), min_size=EXPERTS, max_size=EXPERTS))
    resident = [k for k, r in zip(KEYS, roles) if r == "resident"]
    resident = draw(st.permutations(resident))  # any eviction order
    in_flight = frozenset(k for k, r in zip(KEYS, roles) if r == "in_flight")
    pinned = frozenset(draw(st.lists(st.sampled_from(resident), unique=True))) if resident else frozenset()
    needed = frozenset(draw(st.lists(st.sampled_from(resident), unique=True))) if resident else frozenset()
    scored = draw(st.lists(st.sampled_from(KEYS), unique=True))
    scores = {k: draw(st.floats(0.0, 1.0)) for k in scored}
    free = draw(st.integers(0, 4))
    budget = PrefetchBudget(max_bytes=draw(st.integers(0, 6 * OBJECT_BYTES)), object_bytes=OBJECT_BYTES)
    return scores, resident, in_flight, pinned, needed, free, budget


@given(planner_states())
@settings(max_examples=200, deadline=None)
def test_prefetch_plan_respects_budget_room_pins_and_in_flight(state):
    scores, resident, in_flight, pinned, needed, free, budget = state
    plan = plan_prefetch(scores, resident, in_flight, pinned, free, budget, needed_now=needed)
    assert plan.load_bytes == len(plan.loads) * OBJECT_BYTES <= budget.max_bytes
    assert len(plan.loads) <= free + len(plan.evictions)
    assert len(set(plan.loads)) == len(plan.loads)
    assert not set(plan.loads) & (set(resident) | in_flight), "loads something already resident or in flight"
    assert not set(plan.evictions) & (pinned | needed | in_flight), "evicts a pinned, needed or in-flight object"
    assert set(plan.evictions) <= set(resident)
    assert all(scores[k] > budget.min_score for k in plan.loads)
    for load, victim in zip(plan.loads[free:], plan.evictions):
        assert scores.get(victim, float("-inf")) < scores[load], "displaces something predicted at least as likely"


@given(planner_states())
@settings(max_examples=200, deadline=None)
def test_resident_scores_from_a_callable_plan_exactly_as_a_dict_of_every_score(state):
    scores, resident, in_flight, pinned, needed, free, budget = state
    candidates = {k: v for k, v in scores.items() if k not in set(resident)}
    lazy = plan_prefetch(candidates, resident, in_flight, pinned, free, budget, needed_now=needed,
                         resident_score=lambda key: scores.get(key, float("-inf")))
    assert lazy == plan_prefetch(scores, resident, in_flight, pinned, free, budget, needed_now=needed)


def test_prefetch_loads_the_best_scored_first_and_evicts_in_policy_order_around_pins():
    scores = {KEYS[5]: 0.9, KEYS[6]: 0.8, KEYS[7]: 0.1, KEYS[0]: 0.05}
    plan = plan_prefetch(scores, [KEYS[0], KEYS[1], KEYS[2]], frozenset(), frozenset({KEYS[1]}), 0,
                         PrefetchBudget(max_bytes=10 * OBJECT_BYTES, object_bytes=OBJECT_BYTES))
    assert plan.loads == (KEYS[5], KEYS[6])  # no room left for KEYS[7]: the pinned KEYS[1] stays
    assert plan.evictions == (KEYS[0], KEYS[2])


def test_prefetch_never_swaps_equally_likely_objects():
    scores = {KEYS[4]: 0.5, KEYS[5]: 0.5, KEYS[6]: 0.25, KEYS[0]: 0.5, KEYS[1]: 0.25}
    plan = plan_prefetch(scores, [KEYS[0], KEYS[1]], frozenset(), frozenset(), 0,
                         PrefetchBudget(max_bytes=3 * OBJECT_BYTES, object_bytes=OBJECT_BYTES))
    # KEYS[0] is as likely as either 0.5 candidate: skipped for good; KEYS[1] (0.25) goes for the first one only
    assert plan.loads == (KEYS[4],) and plan.evictions == (KEYS[1],)


def test_prefetch_counts_wanted_objects_already_in_flight_and_skips_them():
    scores = {KEYS[3]: 0.9, KEYS[4]: 0.5}
    plan = plan_prefetch(scores, [], frozenset({KEYS[3]}), frozenset(), 2,
                         PrefetchBudget(max_bytes=2 * OBJECT_BYTES, object_bytes=OBJECT_BYTES))
    assert plan.loads == (KEYS[4],) and plan.skipped_in_flight == 1


def test_prefetch_stops_at_the_budget():
    scores = {k: 1.0 - i / EXPERTS for i, k in enumerate(KEYS)}
    plan = plan_prefetch(scores, [], frozenset(), frozenset(), EXPERTS,
                         PrefetchBudget(max_bytes=3 * OBJECT_BYTES + 999, object_bytes=OBJECT_BYTES))
    assert plan.loads == tuple(KEYS[:3])


def test_demand_plan_fetches_misses_and_evicts_only_unneeded_unpinned_objects():
    plan = plan_demand([KEYS[0], KEYS[4], KEYS[5]], [KEYS[0], KEYS[1], KEYS[2], KEYS[3]], frozenset(),
                       frozenset({KEYS[1]}), free_slots=1)
    assert plan.loads == (KEYS[4], KEYS[5])
    assert plan.evictions == (KEYS[2],)


def test_demand_plan_that_cannot_fit_names_the_numbers():
    with pytest.raises(CapacityError, match="needs 3 object\\(s\\).*only 0 slot\\(s\\) are free and 1 can be evicted"):
        plan_demand(KEYS[4:7], [KEYS[0], KEYS[1]], frozenset(), frozenset({KEYS[0]}), free_slots=0)
