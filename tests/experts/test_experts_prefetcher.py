"""The HBM expert cache and the prefetcher on a CPU stand-in: hits, misses, waves, no duplicate copies, eviction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiermem.experts.cache import ExpertCache
from tiermem.experts.sources import ModuleExperts
from tiermem.experts.store import ExpertStore
from tiermem.manager import TierManager
from tiermem.predict.base import RouteContext
from tiermem.prefetch import planner
from tiermem.prefetch.prefetcher import PrefetchConfig, Prefetcher
from tiermem.prefetch.stats import HostPhases
from tiermem.prefetch.window import LinkWindow
from tiermem.residency import groups
from tiermem.residency.policies import PolicySignals
from tiermem.residency.signals import ActivationCounts, PredictionScores
from tiermem.residency.slots import SlotLayout

from .conftest import NUM_EXPERTS, TOP_K

LAYERS = (0, 1)
SLOW_GBPS = 0.0002  # a modelled link slow enough that a copy of one tiny expert stays in flight for ~40 ms


class FixedScores:
    """A predictor that always scores the given experts 1 and the rest 0, and counts its calls."""

    def __init__(self, experts: list[int]) -> None:
        self.experts = experts
        self.calls = 0

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        self.calls += 1
        scores = np.zeros((distance, context.batch_size, context.num_experts), dtype=np.float32)
        scores[:, :, self.experts] = 1.0
        return scores


def _setup(fused, *, slots: int, policy: str = "lru", bandwidth_gbps: float | None = None, predictor=None,
           objects_per_layer: int = 2, link_fill: float | None = None):
    tier = {"kind": "sim", "capacity_bytes": "4MiB", "arena_bytes": "1MiB", "model_time": bandwidth_gbps is not None,
            "bandwidth_gbps": bandwidth_gbps or 25.0, "latency_us": 0.0}
    manager = TierManager.from_config({"tiers": [tier]})
    store = ExpertStore.from_source(manager, ModuleExperts(dict.fromkeys(LAYERS, fused)), tier="sim")
    predictions = PredictionScores()
    keys = [tuple(store.key(layer, e) for e in range(store.num_experts)) for layer in LAYERS]
    cache = ExpertCache(layout=store.layout, layers=LAYERS, keys=keys, slots_per_group=slots,
                        slot_layout=SlotLayout.PER_LAYER,
                        device=torch.device("cpu"), policy=policy,
                        signals=PolicySignals(counts=ActivationCounts(), predictions=predictions))
    prefetcher = Prefetcher(cache, store, manager, predictor=predictor, predictions=predictions,
                            config=PrefetchConfig(distance=1, objects_per_layer=objects_per_layer, link_fill=link_fill))
    return manager, store, cache, prefetcher


def _serve(prefetcher: Prefetcher, store: ExpertStore, layer: int, experts: list[int], tick: int) -> None:
    """Demand ``experts`` of ``layer`` and check each slot holds exactly the expert's home bytes."""
    for wave in prefetcher.demand([store.key(layer, e) for e in experts], tick):
        for key in wave:
            assert torch.equal(prefetcher.ready(key), store.home(key))


def _context(layer: int) -> RouteContext:
    current = np.full((1, len(LAYERS), TOP_K), -1, dtype=np.int16)
    return RouteContext(num_experts=NUM_EXPERTS, layer=layer, current=current)


def test_a_miss_is_fetched_and_counted_then_hits(fused_experts):
    manager, store, _, prefetcher = _setup(fused_experts, slots=2)
    _serve(prefetcher, store, 0, [1, 4], tick=0)
    _serve(prefetcher, store, 0, [4], tick=1)
    stats = prefetcher.collect_stats()
    assert (stats.demands, stats.hits, stats.misses) == (3, 1, 2)
    assert stats.demand_bytes == 2 * store.layout.block_bytes == stats.bytes_by_tier["sim"]
    manager.close()


def test_lru_evicts_the_least_recently_used_expert(fused_experts):
    manager, store, cache, prefetcher = _setup(fused_experts, slots=2, policy="lru")
    for tick, expert in enumerate([0, 1, 0, 2]):
        _serve(prefetcher, store, 0, [expert], tick)
    assert cache.resident(0) == {store.key(0, 0), store.key(0, 2)}
    manager.close()


def test_lfu_keeps_the_most_used_expert(fused_experts):
    manager, store, cache, prefetcher = _setup(fused_experts, slots=2, policy="lfu")
    counts = cache.policy.counts
    for tick, expert in enumerate([1, 1, 1, 0, 2]):
        counts.record(store.key(0, expert), tick)
        _serve(prefetcher, store, 0, [expert], tick)
    assert cache.resident(0) == {store.key(0, 1), store.key(0, 2)}
    manager.close()


def test_prefetch_never_duplicates_a_load_in_flight(fused_experts):
    manager, store, cache, prefetcher = _setup(fused_experts, slots=3, bandwidth_gbps=SLOW_GBPS,
                                               predictor=FixedScores([2, 5]))
    assert prefetcher.prefetch(_context(0), tick=0) == 2
    assert prefetcher.prefetch(_context(0), tick=1) == 0  # both still in flight: nothing new
    assert cache.in_flight(1) == {store.key(1, 2), store.key(1, 5)}
    assert manager.engine.stats()["h2h_bytes"] == 2 * store.layout.block_bytes
    prefetcher.drain()
    assert prefetcher.prefetch(_context(0), tick=2) == 0  # resident now
    assert prefetcher.collect_stats().prefetch_loads == 2
    manager.close()


def test_demanding_an_expert_in_flight_is_a_late_hit_that_waits_for_its_bytes(fused_experts):
    manager, store, _, prefetcher = _setup(fused_experts, slots=2, bandwidth_gbps=SLOW_GBPS,
                                           predictor=FixedScores([3]), objects_per_layer=1)
    prefetcher.prefetch(_context(0), tick=0)
    _serve(prefetcher, store, 1, [3], tick=1)
    stats = prefetcher.collect_stats()
    assert (stats.hits, stats.late, stats.misses, stats.prefetch_used) == (1, 1, 0, 1)
    assert stats.stall_s > 0.005 and stats.prefetch_precision == 1.0 and stats.prefetch_recall == 1.0
    manager.close()


def test_a_layer_needing_more_experts_than_its_slots_runs_in_waves(fused_experts):
    manager, store, cache, prefetcher = _setup(fused_experts, slots=2)
    _serve(prefetcher, store, 0, list(range(NUM_EXPERTS)), tick=0)
    stats = prefetcher.collect_stats()
    assert stats.misses == NUM_EXPERTS and stats.extra_waves == NUM_EXPERTS // 2 - 1
    assert len(cache.resident(0)) == 2 and not cache.snapshot().pinned
    manager.close()


def test_prefetch_evicts_only_less_likely_experts(fused_experts):
    manager, store, cache, prefetcher = _setup(fused_experts, slots=2, policy="predicted",
                                               predictor=FixedScores([4]), objects_per_layer=1)
    _serve(prefetcher, store, 1, [0, 1], tick=0)
    assert prefetcher.prefetch(_context(0), tick=1) == 1
    prefetcher.drain()
    assert store.key(1, 4) in cache.resident(1) and len(cache.resident(1)) == 2
    assert prefetcher.collect_stats().prefetch_loads == 1
    manager.close()


def test_a_predictor_returning_the_wrong_shape_is_refused(fused_experts):
    class Wrong:
        def predict(self, context, distance):
            return np.zeros((distance, NUM_EXPERTS))

    manager, _, _, prefetcher = _setup(fused_experts, slots=2, predictor=Wrong())
    with pytest.raises(Exception, match="Predictor protocol requires"):
        prefetcher.prefetch(_context(0), tick=0)
    manager.close()


def test_link_window_admits_nothing_until_a_lead_is_measured_then_the_objects_that_fit():
    window = LinkWindow(bandwidth_gbps=1.0, fill=0.5, smoothing=1.0)
    assert window.admitted(250_000, 8, precision=1.0, now_s=0.0) == 0  # decision at 0 ms, nothing measured yet
    window.layer_started(now_s=0.003)  # the next demand came 3 ms later: the lead
    window.queued(1_000_000, now_s=0.003)  # its misses: 1 ms of the 1 GB/s link
    # free: half of (3 ms lead - 1 ms backlog) = 1 ms = four 0.25 ms objects; a fifth would overhang it whole
    assert window.admitted(250_000, 8, precision=0.9, now_s=0.003) == 4
    assert window.admitted(250_000, 3, precision=0.9, now_s=0.003) == 3  # never more than asked for


def test_an_object_overhanging_the_window_is_admitted_only_when_likely_enough_to_pay():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)
    window.admitted(1_000_000, 1, precision=0.5, now_s=0.0)
    window.layer_started(now_s=0.0006)  # 0.6 ms lead, nothing queued: a 1 ms object would spill 0.4 ms
    assert window.admitted(1_000_000, 2, precision=0.5, now_s=0.0006) == 1  # spill 0.4 < 0.5 x 1 ms
    window.layer_started(now_s=0.0012)
    assert window.admitted(1_000_000, 2, precision=0.3, now_s=0.0012) == 0  # 0.4 >= 0.3 x 1 ms: too likely wasted


def test_a_wait_for_routing_that_queued_copies_explain_is_not_lent_to_a_layer_with_nothing_queued():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)
    window.queued(4_000_000, now_s=0.0)  # 4 ms of misses on the link
    window.admitted(1_000_000, 1, precision=0.9, now_s=0.0)  # decision with a 4 ms backlog
    window.layer_started(now_s=0.0045, routing_wait_s=0.004)  # 0.5 ms of host work, then waiting for those copies
    assert (window.host_s, window.tail_s) == pytest.approx((0.0005, 0.0005))  # the backlog explains 3.5 of 4 ms
    # the next layer has nothing queued: its demand comes after ~0.5 ms of host work + 0.5 ms tail, not 4.5 ms,
    # so a 1 ms object spills nothing and a second one a whole 1 ms (> 0.9 x 1 ms)
    assert window.admitted(1_000_000, 4, precision=0.9, now_s=0.0045) == 1


def test_a_wait_for_compute_with_the_link_idle_counts_as_prefetch_time():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)
    window.admitted(1_000_000, 1, precision=0.9, now_s=0.0)  # nothing queued at the decision
    window.layer_started(now_s=0.003, routing_wait_s=0.001)  # 2 ms host work, 1 ms waiting for compute
    assert (window.host_s, window.tail_s) == pytest.approx((0.002, 0.001))
    assert window.admitted(1_000_000, 4, precision=0.9, now_s=0.003) == 3  # 3 ms free: three 1 ms objects


def test_prefetch_host_time_is_free_only_within_the_hosts_wait_and_never_widens_the_window():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)  # a 100 kB object: 0.1 ms of link
    window.admitted(100_000, 4, precision=0.45, now_s=0.0)
    window.layer_started(now_s=0.001)  # 1 ms of host work to the next demand, no wait for routing
    assert window.admitted(100_000, 4, precision=0.45, now_s=0.001) == 4  # host cost per object not measured yet
    window.prefetched(4, now_s=0.0012)  # planning and submitting them took 0.2 ms: 0.05 ms per object
    window.layer_started(now_s=0.0022)
    assert window.host_s == pytest.approx(0.001)  # the prefetch's own 0.2 ms is not lent to the next window
    # each object would delay a host-bound layer by 0.05 ms, more than its expected saving (0.45 x 0.1 ms)
    assert window.admitted(100_000, 4, precision=0.45, now_s=0.0022) == 0
    window.prefetched(0, now_s=0.0022)
    window.layer_started(now_s=0.00332, routing_wait_s=0.00012)  # now the host waits 0.12 ms for routing
    # the first two objects' host time hides in that wait, the third costs 0.03 ms (< 0.045), the fourth 0.05
    assert window.admitted(100_000, 4, precision=0.45, now_s=0.00332) == 3


def test_the_prediction_is_host_time_too_and_objects_must_pay_for_it_together_where_the_host_paces_the_layer():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)  # a 100 kB object: 0.1 ms of link
    window.admitted(100_000, 4, precision=0.9, now_s=0.0)
    window.layer_started(now_s=0.001)  # 1 ms of host work to the next demand, no wait for routing: no slack
    assert window.admitted(100_000, 4, precision=0.9, now_s=0.001) == 4  # nothing measured costs nothing yet
    window.predicted(0.0002)  # the prediction took 0.2 ms
    window.prefetched(4, now_s=0.0014)  # and planning and submitting 4 objects 0.2 ms more: 0.05 ms each
    assert window.object_host_s == pytest.approx(0.00005)  # the prediction is not billed per object
    window.layer_started(now_s=0.0024)
    assert window.host_s == pytest.approx(0.001)  # neither is lent to the next window
    # each object saves 0.09 ms of link and costs 0.05 ms of host: 4 cannot pay for a 0.2 ms prediction, 8 can
    assert window.admitted(100_000, 4, precision=0.9, now_s=0.0024) == 0
    assert window.admitted(100_000, 8, precision=0.9, now_s=0.0024) == 8
    window.prefetched(0, now_s=0.0024)
    window.layer_started(now_s=0.0037, routing_wait_s=0.0003)  # now the host waits 0.3 ms for routing
    # the prediction and the first two objects' host time hide in that wait; the rest cost less than they save
    assert window.admitted(100_000, 1, precision=0.9, now_s=0.0037) == 1
    assert window.admitted(100_000, 4, precision=0.9, now_s=0.0037) == 4


def test_a_decision_that_admits_nothing_predicts_nothing_and_forgets_the_stale_scores(fused_experts):
    predictor = FixedScores([3])
    manager, store, _, prefetcher = _setup(fused_experts, slots=2, policy="predicted", predictor=predictor,
                                           objects_per_layer=1, link_fill=1.0)
    target = store.key(1, 0)
    prefetcher.predictions.publish(target, np.arange(NUM_EXPERTS, dtype=np.float64))  # an earlier prediction
    assert prefetcher.prefetch(_context(0), tick=0) == 0  # no lead measured yet: the window admits nothing
    assert predictor.calls == 0 and prefetcher.stats.predictions_skipped == 1
    assert prefetcher.predictions.layer(target) is None  # the predicted policy ranks layer 1 by recency now
    prefetcher.window.host_s = 1.0  # a measured lead of a second: every object fits
    assert prefetcher.prefetch(_context(0), tick=1) == 1
    assert predictor.calls == 1 and prefetcher.stats.predictions_skipped == 1
    assert prefetcher.predictions.layer(target)[3] == 1.0
    prefetcher.drain()
    manager.close()


def test_without_prefetch_every_layer_is_predicted_for_the_eviction_policy(fused_experts):
    predictor = FixedScores([3])
    manager, _, _, prefetcher = _setup(fused_experts, slots=2, policy="predicted", predictor=predictor,
                                       objects_per_layer=0, link_fill=1.0)
    assert prefetcher.prefetch(_context(0), tick=0) == 0
    assert predictor.calls == 1 and prefetcher.stats.predictions_skipped == 0
    manager.close()


def test_bytes_still_queued_on_the_link_leave_no_prefetch_room():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)
    window.admitted(1_000_000, 1, precision=0.9, now_s=0.0)
    window.layer_started(now_s=0.002)  # 2 ms lead
    window.queued(1_500_000, now_s=0.002)  # demand: 1.5 ms
    window.queued(1_000_000, now_s=0.002)  # an earlier prefetch still queued: 1 ms more
    assert window.admitted(100_000, 4, precision=0.9, now_s=0.002) == 0


def test_host_phases_report_the_mean_laps_per_layer_and_nothing_while_disabled():
    off, on = HostPhases(enabled=False), HostPhases(enabled=True)
    for phases in (off, on):
        for _ in range(2):
            phases.start()
            phases.lap("route")
            phases.lap("compute")
            phases.layer_done()
    assert off.us_per_layer() == {}
    report = on.us_per_layer()
    assert set(report) == {"route", "compute", "total"}
    assert report["total"] == pytest.approx(report["route"] + report["compute"])


def test_a_layers_misses_are_one_submit_yet_each_lands_exactly(fused_experts):
    manager, store, _, prefetcher = _setup(fused_experts, slots=4)
    plans = []
    submit = manager.engine.submit
    manager.engine.submit = lambda plan, **kw: plans.append(plan) or submit(plan, **kw)
    _serve(prefetcher, store, 0, [0, 1, 2], tick=0)  # _serve checks every slot's bytes
    assert [len(plan.copies) for plan in plans] == [3]
    assert prefetcher.collect_stats().misses == 3
    manager.close()


def test_the_precision_estimate_follows_whether_the_next_demand_of_the_layer_uses_a_prefetch(fused_experts):
    manager, store, _, prefetcher = _setup(fused_experts, slots=1, predictor=FixedScores([3]), objects_per_layer=1)
    assert prefetcher.precision.value == 0.5  # neutral prior
    prefetcher.prefetch(_context(0), tick=0)
    _serve(prefetcher, store, 1, [3], tick=1)  # used
    used = prefetcher.precision.value
    assert used > 0.5
    prefetcher.drain()
    _serve(prefetcher, store, 1, [5], tick=2)  # no prefetch awaits this demand: no change
    assert prefetcher.precision.value == used
    prefetcher.prefetch(_context(0), tick=3)  # loads 3 again, evicting 5
    prefetcher.drain()
    _serve(prefetcher, store, 1, [0], tick=4)  # the next demand does not use the prefetched 3
    assert prefetcher.precision.value < used
    manager.close()


def test_objects_are_admitted_only_while_likelier_needed_than_the_objects_they_evict():
    window = LinkWindow(bandwidth_gbps=1.0, fill=1.0, smoothing=1.0)
    window.admitted(100_000, 1, precision=0.5, now_s=0.0)
    window.layer_started(now_s=0.01)  # a 10 ms window: 0.1 ms objects all fit
    assert window.admitted(100_000, 3, precision=0.5, regret=0.2, now_s=0.01) == 3
    assert window.admitted(100_000, 3, precision=0.5, regret=0.5, now_s=0.01) == 0  # as likely to undo as to help
    window.layer_started(now_s=0.0106)  # 0.6 ms lead: a 1 ms object would spill 0.4 ms
    assert window.admitted(1_000_000, 1, precision=0.5, regret=0.0, now_s=0.0106) == 1  # 0.4 < 0.5 x 1 ms
    window.layer_started(now_s=0.0112)
    assert window.admitted(1_000_000, 1, precision=0.5, regret=0.2, now_s=0.0112) == 0  # 0.4 >= 0.3 x 1 ms


def test_the_regret_estimate_rises_when_the_next_demand_wants_an_object_a_prefetch_evicted(fused_experts):
    manager, store, _, prefetcher = _setup(fused_experts, slots=1, policy="predicted",
                                               predictor=FixedScores([3]), objects_per_layer=1)
    _serve(prefetcher, store, 1, [5], tick=0)  # 5 resident in layer 1's only slot
    assert prefetcher.prefetch(_context(0), tick=1) == 1  # 3 evicts 5
    prefetcher.drain()
    assert prefetcher.regret.value == 0.0
    _serve(prefetcher, store, 1, [5], tick=2)  # the next demand wants 5 back
    assert prefetcher.regret.value > 0.0
    manager.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "predicted"])
def test_every_kernel_a_decode_calls_is_compiled_before_it_starts(fused_experts, policy):
    kernels = (groups.evictable_places, planner.plan_group_prefetch, planner.pair_victims)
    manager, store, _, prefetcher = _setup(fused_experts, slots=2, policy=policy, predictor=FixedScores([3, 5]))
    compiled = [len(kernel.signatures) for kernel in kernels]
    for tick in range(6):  # demands that evict, and prefetches that evict (scored, and unscored layers)
        _serve(prefetcher, store, tick % 2, [tick % NUM_EXPERTS, (tick + 2) % NUM_EXPERTS], tick)
        prefetcher.prefetch(_context(tick % 2), tick)
        if tick == 3:
            prefetcher.predictions.forget(store.key(1, 0))
    assert [len(kernel.signatures) for kernel in kernels] == compiled  # a first compile mid-decode takes ~1 s
    manager.close()
