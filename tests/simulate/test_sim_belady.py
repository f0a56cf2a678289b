"""Belady's oracle in the simulator is optimal: it matches an exhaustive search on tiny traces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from simtraces import optimal_misses, trace_of

from tiermem.simulate import SimConfig, simulate

MAX_EXPERTS = 6
MAX_STEPS = 9


@st.composite
def tiny_traces(draw):
    experts = draw(st.integers(3, MAX_EXPERTS))
    top_k = draw(st.integers(1, 2))
    slots = draw(st.integers(top_k, experts - 1))
    steps = draw(st.lists(st.permutations(range(experts)).map(lambda p: sorted(p[:top_k])),
                          min_size=1, max_size=MAX_STEPS))
    return experts, slots, steps


@given(tiny_traces())
@settings(max_examples=150, deadline=None)
def test_belady_misses_equal_the_exhaustive_optimum(case):
    experts, slots, steps = case
    trace = trace_of([[ids] for ids in steps], experts)
    result = simulate(trace, SimConfig(policy="belady", resident_fraction=slots / experts))
    assert result.demands - result.hits == optimal_misses([frozenset(ids) for ids in steps], slots)


@given(tiny_traces())
@settings(max_examples=60, deadline=None)
def test_no_online_policy_beats_belady(case):
    experts, slots, steps = case
    trace = trace_of([[ids] for ids in steps], experts)
    hits = {p: simulate(trace, SimConfig(policy=p, resident_fraction=slots / experts)).hits
            for p in ("lru", "lfu", "belady")}
    assert hits["lru"] <= hits["belady"] and hits["lfu"] <= hits["belady"]
