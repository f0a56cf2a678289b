"""The cost model's timeline: stalls, overlap of prefetch with compute, bytes moved."""

from __future__ import annotations

import pytest
from simtraces import ShiftPredictor, trace_of

from tiermem.simulate import SimConfig, simulate
from tiermem.simulate.cost import Timeline
from tiermem.types import ObjectKey

COPY_S = 1e-3  # one expert over the fixture's link
EXPERTS = 8


def test_all_hits_cost_compute_only(cost_model):
    trace = trace_of([[[2]]] * 5, EXPERTS)
    timing = simulate(trace, SimConfig(resident_fraction=0.25), cost=cost_model).timing
    # only the first step misses: one copy, then five layers of compute (100 + 10 us each)
    assert timing.stall_s == pytest.approx(COPY_S)
    assert timing.compute_s == pytest.approx(5 * 110e-6)
    assert timing.elapsed_s == pytest.approx(COPY_S + 5 * 110e-6)
    assert timing.bytes_moved == cost_model.expert_bytes


def test_demand_copies_serialise_on_the_link(cost_model):
    timeline = Timeline(cost_model)
    landings = [timeline.demand_copy() for _ in range(3)]
    assert landings == pytest.approx([COPY_S, 2 * COPY_S, 3 * COPY_S])
    timeline.run_layer(max(landings), experts=3)
    assert timeline.stall_s == pytest.approx(3 * COPY_S)
    assert timeline.now_s == pytest.approx(3 * COPY_S + 130e-6)


def test_a_prefetch_issued_a_layer_early_hides_part_of_its_copy(cost_model):
    # layer 1's expert is always (layer 0's + 1): a perfect prefetch, issued when layer 0 is routed.
    trace = trace_of([[[e], [e + 1]] for e in (0, 2, 4, 6)], EXPERTS)
    config = SimConfig(policy="lru", resident_fraction=1 / EXPERTS, prefetch_distance=1, prefetch_experts_per_layer=1)
    with_prefetch = simulate(trace, config, predictor=ShiftPredictor(EXPERTS), cost=cost_model).timing
    on_demand = simulate(trace, SimConfig(policy="lru", resident_fraction=1 / EXPERTS), cost=cost_model).timing
    assert with_prefetch.elapsed_s < on_demand.elapsed_s
    assert with_prefetch.tokens_per_s > on_demand.tokens_per_s
    assert 0.0 < with_prefetch.link_utilisation <= 1.0


def test_prefetches_use_only_idle_link_time_and_demand_copies_go_first(cost_model):
    timeline = Timeline(cost_model)
    key, other = ObjectKey("expert", "w", 1, 0), ObjectKey("expert", "w", 1, 1)
    timeline.prefetch([key, other])
    assert timeline.demand_copy() == pytest.approx(COPY_S)  # the prefetches wait
    timeline.run_layer(COPY_S, experts=0)  # compute 100 us after the demand copy lands
    timeline.now_s += 1.5 * COPY_S  # then 1.6 ms more pass without demand copies
    timeline.use_idle_link()
    assert timeline.settle(key, needed=True) == pytest.approx(2 * COPY_S)  # landed in idle time
    assert timeline.settle(other, needed=False) is None  # partly copied, not needed: cancelled
    assert timeline.link_busy_s == pytest.approx(COPY_S + 1.6 * COPY_S)  # the cancelled part still moved


def test_a_prefetch_that_never_started_is_cancelled_even_if_needed(cost_model):
    timeline = Timeline(cost_model)
    key = ObjectKey("expert", "w", 1, 0)
    timeline.prefetch([key])
    timeline.demand_copy()
    timeline.use_idle_link()
    assert timeline.settle(key, needed=True) is None
    assert timeline.link_busy_s == pytest.approx(COPY_S)


def test_a_partly_copied_needed_prefetch_finishes_at_demand_priority(cost_model):
    timeline = Timeline(cost_model)
    key = ObjectKey("expert", "w", 1, 0)
    timeline.prefetch([key])
    timeline.now_s = 0.25 * COPY_S
    timeline.use_idle_link()
    assert timeline.settle(key, needed=True) == pytest.approx(COPY_S)


def test_the_host_plans_a_layers_misses_before_its_copies_and_compute_start(cost_model):
    from dataclasses import replace

    from tiermem.simulate.cost import HostCost

    timeline = Timeline(replace(cost_model, host=HostCost(layer_us=200.0, miss_us=50.0)))
    timeline.begin_layer(misses=2)  # 200 + 2 x 50 us of host work first
    landings = [timeline.demand_copy() for _ in range(2)]
    assert landings == pytest.approx([0.3e-3 + COPY_S, 0.3e-3 + 2 * COPY_S])
    timeline.run_layer(max(landings), experts=2)
    assert timeline.stall_s == pytest.approx(2 * COPY_S)  # the wait for copies only, not for the host
    assert timeline.now_s == pytest.approx(0.3e-3 + 2 * COPY_S + 120e-6)


def test_a_host_behind_the_gpu_delays_the_next_layer_and_its_prefetch_starts_only_once_submitted(cost_model):
    from dataclasses import replace

    from tiermem.simulate.cost import HostCost

    timeline = Timeline(replace(cost_model, host=HostCost(layer_us=100.0, prefetch_layer_us=2000.0,
                                                          prefetch_object_us=500.0)))
    key = ObjectKey("expert", "w", 1, 0)
    timeline.begin_layer(misses=0)
    timeline.prefetch([key])  # submitted at 0.1 + 2.0 + 0.5 ms
    timeline.run_layer(0.0, experts=0)  # the GPU is done at 0.2 ms: the link idles until the submit
    timeline.now_s = 2.0e-3
    timeline.use_idle_link()
    assert not timeline.copy_started(key)
    timeline.begin_layer(misses=0)  # the next routing waits for the host, not only the GPU
    assert timeline.issue_s == pytest.approx(2.6e-3 + 0.1e-3)


def test_a_host_bound_replay_takes_the_hosts_time_and_an_ideal_host_changes_nothing(cost_model):
    from dataclasses import replace

    from tiermem.errors import ConfigError
    from tiermem.simulate.cost import HostCost

    trace = trace_of([[[2]]] * 5, EXPERTS)
    ideal = simulate(trace, SimConfig(resident_fraction=0.25), cost=cost_model).timing
    assert ideal == simulate(trace, SimConfig(resident_fraction=0.25),
                             cost=replace(cost_model, host=HostCost())).timing
    slow = simulate(trace, SimConfig(resident_fraction=0.25),
                    cost=replace(cost_model, host=HostCost(layer_us=5000.0))).timing
    # each layer: the host reads its routing after the GPU's last compute, works 5 ms, then the GPU computes
    assert slow.elapsed_s == pytest.approx(5 * (5e-3 + 110e-6) + COPY_S)
    assert slow.stall_s == pytest.approx(COPY_S)
    with pytest.raises(ConfigError, match="host times must be >= 0"):
        HostCost(miss_us=-1.0)
