"""Trace replay: decode steps through per-layer expert caches, with optional prediction-driven prefetch.

For each decode step (batch 1, or B sequences interleaved step-aligned) and each traced layer in
order: settle the prefetches aimed at this layer (with a cost model, a copy that never started is
cancelled, see ``tiermem.simulate.cost``), count as hits the distinct experts the batch needs that
are resident or in flight, fetch the misses on demand (evicting by policy), and then, when a
predictor is given, ask it about the next ``prefetch_distance`` traced layers and apply a
``plan_prefetch`` to each within ``prefetch_experts_per_layer``. A ``CostModel`` turns it into time;
without one, every prefetch lands in time (the hit rate of unlimited overlap).
The predictor sees the traced layers as consecutive MoE layers (a trace with data in layers 0, 8, 12
holds them in context slots 0, 1, 2), so distances count traced layers, wrapping into the next step.

Conventions, chosen to match how the issue's reference figures were measured (see ``SimConfig``):
hit rate = hits / demands over distinct (step, layer, expert) needs of decode tokens; a cache starts
cold for each batch of sequences unless ``lifetime`` says otherwise; prefill tokens are not counted
and warm the cache only with ``warm_with_prefill`` (fed token by token, an approximation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from tiermem.errors import ConfigError, TraceError
from tiermem.predict.base import Predictor
from tiermem.prefetch.planner import PrefetchBudget
from tiermem.residency.policies import PolicySignals
from tiermem.residency.signals import ActivationCounts, FutureUses, PredictionScores
from tiermem.residency.slots import slots_for_fraction
from tiermem.simulate.cache import ExpertKeys, LayerCaches
from tiermem.simulate.config import CacheLifetime, SimConfig
from tiermem.simulate.cost import CostModel, Timeline
from tiermem.simulate.result import LayerStats, SimResult
from tiermem.simulate.steps import Step, build_steps, prediction_context
from tiermem.simulate.trace import Phase, SimTrace, batch_groups, mask_incomplete_layers
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.simulate")


def simulate(
    trace: SimTrace, config: SimConfig, *, predictor: Predictor | None = None, cost: CostModel | None = None,
) -> SimResult:
    """Replay the decode tokens of ``trace`` under ``config``; see the module docstring."""
    if (config.prefetch_distance > 0) != (predictor is not None):
        raise ConfigError(
            "simulate: a prefetch distance needs a predictor and a predictor needs a prefetch distance; give both "
            f"(prefetch_distance={config.prefetch_distance}, predictor={type(predictor).__name__})"
        )
    if config.prefetch_distance >= len(trace.layers):
        raise ConfigError(
            f"simulate: prefetch_distance={config.prefetch_distance} must be below the {len(trace.layers)} traced "
            f"layers (a load may not target a layer's use after the next)"
        )
    if config.only_complete_layers:
        trace = mask_incomplete_layers(trace)
    replay = _Replay(trace, config, predictor, cost)
    groups = batch_groups(trace, config.batch_size)
    if config.lifetime is CacheLifetime.PER_BATCH:
        for group in groups:
            replay.run_segment(build_steps(trace, group, config.warm_with_prefill))
    else:
        replay.run_segment([step for group in groups for step in build_steps(trace, group, config.warm_with_prefill)])
    result = replay.result()
    log.debug("simulated %s %s: hit rate %.3f over %d demands", trace.model, config, result.hit_rate, result.demands)
    return result


class _Replay:
    """The mutable state of one ``simulate`` call."""

    def __init__(self, trace: SimTrace, config: SimConfig, predictor: Predictor | None, cost: CostModel | None):
        self.trace, self.config, self.predictor, self.cost = trace, config, predictor, cost
        self.slots = slots_for_fraction(config.resident_fraction, trace.num_experts)
        self.keys = ExpertKeys(trace.layers, trace.num_experts)
        self.timeline = Timeline(cost) if cost is not None else None
        self.demands = np.zeros(len(trace.layers), dtype=np.int64)
        self.hits = np.zeros(len(trace.layers), dtype=np.int64)
        self.steps = self.tokens = self.demand_loads = self.prefetch_loads = self.prefetch_used = 0
        self.prefetch_cancelled = self.late_hits = 0
        self.budget = PrefetchBudget(
            max_bytes=config.prefetch_experts_per_layer * (cost.expert_bytes if cost else 1),
            object_bytes=cost.expert_bytes if cost else 1,
        )

    def run_segment(self, steps: list[Step]) -> None:
        """Replay ``steps`` through caches that start cold."""
        trace, config = self.trace, self.config
        future = _future_uses(trace, steps, self.keys) if config.policy == "belady" else None
        half_life = config.lfu_half_life_steps * trace.num_layers if config.lfu_half_life_steps else None
        counts, predictions = ActivationCounts(half_life), PredictionScores()
        caches = LayerCaches(trace.layers, self.slots, config.policy, PolicySignals(counts, predictions, future))
        segment = _Segment(caches, counts, predictions, future, steps, self._activation_table(steps))
        for index, step in enumerate(steps):
            for group, layer in enumerate(trace.layers):
                self._run_layer(segment, index, group, index * trace.num_layers + layer)
            if segment.activation is not None:
                for row, seq in zip(step.rows, step.seqs):
                    _count_tokens(segment.activation[seq], trace.experts[row][None])
            if step.counted:
                self.steps += 1
                self.tokens += len(step.rows)

    def _run_layer(self, seg: _Segment, index: int, group: int, tick: int) -> None:
        """Serve one traced layer of one step, then prefetch for the layers after it."""
        step, layer = seg.steps[index], self.trace.layers[group]
        timed = self.timeline is not None and step.counted
        if seg.future is not None:
            seg.future.advance(tick)
        routed = step.routed[layer]
        needed = [self.keys(layer, e) for e, _ in routed]
        if not needed:
            return
        landing = self._settle_prefetches(seg, group, needed) if timed else {}
        seg.caches.land(group)
        outcome = seg.caches.serve(group, needed, tick, seg.future)
        for key, (_, uses) in zip(needed, routed):
            seg.counts.record(key, tick, float(uses))
        used = seg.unused_prefetches & outcome.present
        seg.unused_prefetches -= used | set(outcome.evicted)
        ready_s = 0.0
        if timed:
            landings = [landing.get(k, 0.0) for k in outcome.present]
            self.late_hits += sum(at > self.timeline.now_s for at in landings)
            self.timeline.begin_layer(len(outcome.fetched))
            landings += [self.timeline.demand_copy() for _ in outcome.fetched]
            ready_s = max(landings, default=0.0)
        if step.counted:
            self.demands[group] += len(needed)
            self.hits[group] += len(outcome.present)
            self.demand_loads += len(outcome.fetched)
            self.prefetch_used += len(used)
        if self.predictor is not None:
            loads, evicted = self._prefetch(seg, index, group)
            seg.unused_prefetches = (seg.unused_prefetches - set(evicted)) | set(loads)
            if timed:
                self.timeline.prefetch(loads)
            if step.counted:
                self.prefetch_loads += len(loads)
        if timed:
            self.timeline.run_layer(ready_s, len(needed))

    def _settle_prefetches(self, seg: _Segment, group: int, needed: list[ObjectKey]) -> dict[ObjectKey, float]:
        """Settle the prefetches aimed at ``group`` (see ``tiermem.simulate.cost``); returns landing times."""
        self.timeline.use_idle_link()
        wanted = set(needed)
        landing = {}
        for key in seg.caches.in_flight(group):
            started = self.timeline.copy_started(key)
            at = self.timeline.settle(key, key in wanted)
            if at is None:
                seg.caches.cancel(group, key, copy_started=started)
                seg.unused_prefetches.discard(key)
                self.prefetch_cancelled += 1
            else:
                landing[key] = at
        return landing

    def _activation_table(self, steps: list[Step]) -> np.ndarray | None:
        """Per-sequence activation counts [sequences, L, E] before the first step (predictors read them)."""
        if self.predictor is None:
            return None
        trace = self.trace
        table = np.zeros((max(trace.sequences()) + 1, trace.num_layers, trace.num_experts), dtype=np.float32)
        if not self.config.warm_with_prefill:
            for seq in {seq for step in steps for seq in step.seqs}:
                _count_tokens(table[seq], trace.experts[trace.rows(seq, Phase.PREFILL)])
        return table

    def _prefetch(self, seg: _Segment, index: int, group: int) -> tuple[list[ObjectKey], list[ObjectKey]]:
        """Predict the next traced layers after ``group`` and prefetch into each; returns (loads, evictions)."""
        trace, layers = self.trace, self.trace.layers
        targets = []
        for d in range(1, self.config.prefetch_distance + 1):
            wraps, target = divmod(group + d, len(layers))
            if wraps and index + 1 >= len(seg.steps):
                break  # no next step in this segment
            targets.append((target, d))
        if not targets:
            return [], []
        step = seg.steps[index]
        context = prediction_context(trace, step, group, seg.activation)
        horizon = targets[-1][1]
        scores = np.asarray(self.predictor.predict(context, horizon))
        expected = (horizon, len(step.rows), trace.num_experts)
        if scores.shape != expected:
            raise TraceError(
                f"simulate: predictor {type(self.predictor).__name__} returned scores of shape {scores.shape}; the "
                f"protocol requires [distance, batch, experts] = {list(expected)}"
            )
        loads, evictions = [], []
        for target, distance in targets:
            per_expert = scores[distance - 1].sum(axis=0)
            wanted = {self.keys(layers[target], e): float(s) for e, s in enumerate(per_expert)}
            seg.predictions.update(wanted)
            plan = seg.caches.prefetch(target, wanted, self.budget, index * trace.num_layers + layers[group])
            loads.extend(plan.loads)
            evictions.extend(plan.evictions)
        return loads, evictions

    def result(self) -> SimResult:
        stats = tuple(
            LayerStats(layer, int(d), int(h)) for layer, d, h in zip(self.trace.layers, self.demands, self.hits)
        )
        timing = self.timeline.timing(self.steps, self.tokens) if self.timeline is not None else None
        return SimResult(
            trace=self.trace.model, config=self.config, slots_per_layer=self.slots, per_layer=stats,
            steps=self.steps, tokens=self.tokens, demand_loads=self.demand_loads,
            prefetch_loads=self.prefetch_loads, prefetch_used=self.prefetch_used,
            prefetch_cancelled=self.prefetch_cancelled, late_hits=self.late_hits, timing=timing,
        )


@dataclass
class _Segment:
    """State of one cache lifetime: the caches, their signals and the copies in flight."""

    caches: LayerCaches
    counts: ActivationCounts
    predictions: PredictionScores
    future: FutureUses | None
    steps: list[Step]
    activation: np.ndarray | None  # [sequences, L, E] activation counts so far; only with a predictor
    unused_prefetches: set[ObjectKey] = field(default_factory=set)


def _future_uses(trace: SimTrace, steps: list[Step], keys: ExpertKeys) -> FutureUses:
    """Every (tick, key) demand of ``steps``, for the Belady oracle."""
    return FutureUses.from_events(
        (index * trace.num_layers + layer, keys(layer, e))
        for index, step in enumerate(steps) for layer in trace.layers for e, _ in step.routed[layer]
    )


def _count_tokens(counts: np.ndarray, experts: np.ndarray) -> None:
    """Add the routing of ``experts`` [tokens, L, K] to per-sequence ``counts`` [L, E] (ignoring -1)."""
    tokens, layers, top_k = np.nonzero(experts >= 0)
    np.add.at(counts, (layers, experts[tokens, layers, top_k]), 1.0)
