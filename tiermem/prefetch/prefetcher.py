"""The prefetcher: turns predictions into copies ahead of use, and serves each layer's demand.

It drives three parts it does not own: a slot cache (``SlotCache``: HBM slots + residency directory +
eviction order), the objects' host homes (``Homes``) and a ``TierManager`` whose transfer engine
issues the copies on its own streams (through ``SlotCopies``: by address where it can). Decisions
come from the pure planners (``plan_prefetch``, ``plan_demand``); this class only applies plans,
tracks copies and counts.

Design note. One object (an expert) moves through these states::

    | state    | directory            | how it gets there                          | may be evicted |
    |----------|----------------------|--------------------------------------------|----------------|
    | absent   | not recorded         | start; ``evict``; ``abort_load``           | -              |
    | loading  | in flight (pinned)   | ``_issue``: slot taken, copy submitted     | no             |
    | resident | resident             | its copy's handle is done (``_reap``), or  | yes            |
    |          |                      | the compute stream waits on it (``ready``) |                |
    | pinned   | resident/in flight,  | ``demand`` pins what the running layer     | no             |
    |          | pin count > 0        | needs; the wave's end unpins               |                |
    | evicted  | not recorded         | a plan evicts it to free its slot          | -              |

- The copies of one plan (a layer's misses, or one prefetch) are one submit; each object keeps its
  own completion (``handle.part(i)``, one CUDA event after its copy), kept in flight (``InFlight``) until
  it is seen done or the compute stream waits on it; a key in flight is never copied again (no
  duplicate in-flight copies: planners skip in-flight keys, and ``SlotCache.begin_load`` raises on a
  second load). Landing at the compute stream's wait is stream order, not host knowledge: every later
  use runs on that stream, and the slot's next copy waits on the wave's last-use event, both behind
  the copy; so a layer's second wave may evict its first without the host waiting for any copy.
- The compute stream waits only on the objects it is about to use (``ready_all``: once per submit all
  of whose copies the wave uses, else per copy), never on the whole copy stream. Copies are submitted
  from a side stream of the prefetcher (the engine makes its copy streams wait on the stream passed as
  ``after``), so a copy waits for exactly what it must: a wave's end is an event on the compute stream,
  the last use of its objects; evicting one hands that event to its slot (``SlotFences``), and the next
  copy into the slot waits on it (no write while a kernel still reads the slot, no wait on unrelated
  compute; one wait per stream per submit, since events on a stream complete in order).
- Demand goes first: the prefetch copies of a layer wait for that layer's demand copies, so they
  share the link only with compute and with the next layer's CPU work, not with this layer's misses;
  they run on the engine's background streams, so the next layer's demand never queues behind them.
- Prefetch is weighed against the demand it may delay (``LinkWindow``, which has the model): queued
  right after the layer's misses, a layer's prefetch may load what pays for its link time (what
  overhangs the next demand delays it), its chance of being wrong (measured precision, and the
  measured chance that the next demand wants back what it evicted) and its host time (planning,
  submits and the prediction, where the host would not otherwise wait); it evicts only objects
  predicted lower than what it loads, and loads only objects whose expected uses exceed ``min_score``.
- Admission is decided before predicting: a decision whose window admits nothing predicts nothing (no
  host time for a prediction no copy would use) and forgets the target layers' published scores, so
  the ``predicted`` policy ranks those layers by recency (LRU) instead of by a stale prediction.
  Prefetch disabled by config (``objects_per_layer=0``) still predicts every layer: then the
  prediction serves the eviction policy alone.
- A demanded object that is absent is a miss: it is fetched now (a "synchronous" fetch: the compute
  stream waits for it) and counted. A demanded object in flight is a hit that may stall; the time
  the compute stream waited is measured with timing events around the wait (GPU) or the wall clock
  (CPU stand-in) and summed as ``stall_s``.
- When one layer needs more objects than its slot group holds, the demand runs in waves: a wave is
  pinned, used, unpinned, and the next wave may evict it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from tiermem.errors import ConfigError
from tiermem.manager import TierManager
from tiermem.predict.base import Predictor, RouteContext
from tiermem.prefetch.config import PrefetchConfig
from tiermem.prefetch.copies import SlotCopies
from tiermem.prefetch.fences import SlotFences
from tiermem.prefetch.inflight import InFlight
from tiermem.prefetch.planner import compile_now, plan_demand, plan_group_prefetch
from tiermem.prefetch.ports import Homes, SlotCache
from tiermem.prefetch.stats import HostPhases, PrefetchStats
from tiermem.prefetch.window import LinkWindow, NextDemandShare
from tiermem.residency.groups import NO_PLACES
from tiermem.residency.signals import PredictionScores
from tiermem.transfer import TransferHandle
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.prefetch")


class Prefetcher:
    """Serves demands and prefetches predicted objects into ``cache`` from ``homes``."""

    def __init__(
        self, cache: SlotCache, homes: Homes, manager: TierManager, *, config: PrefetchConfig | None = None,
        predictor: Predictor | None = None, predictions: PredictionScores | None = None,
        phases: HostPhases | None = None,
    ) -> None:
        self.cache = cache
        self.homes = homes
        self.manager = manager
        self.config = config or PrefetchConfig()
        self.predictor = predictor
        self.predictions = predictions
        self.stats = PrefetchStats()
        self.phases = phases or HostPhases(enabled=False)
        self._loads = InFlight()  # keys whose copies are submitted and not yet landed
        self._unused_prefetches: set[ObjectKey] = set()
        # what the link window weighs: the chance that the next demand of its layer uses a prefetched object
        # (a neutral prior), and the chance that it wants back an object a prefetch evicted
        self.precision = NextDemandShare(prior=0.5)
        self.regret = NextDemandShare(prior=0.0)
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cuda = self.cache.device.type == "cuda"
        # gates: the engine's copy streams wait on the submitting stream, so copies are submitted from
        # these, which wait on exactly what a copy must (its slot's last use; for prefetch, the demand)
        self._demand_gate = torch.cuda.Stream(device=self.cache.device) if self._cuda else None
        self._prefetch_gate = torch.cuda.Stream(device=self.cache.device) if self._cuda else None
        self._fences = SlotFences()  # each slot's next copy waits for the last use of what it held
        self._layer_demands: list[TransferHandle] = []
        self._compute_stream: torch.cuda.Stream | None = None  # the current stream at the latest demand
        self._copies = SlotCopies(cache, homes, manager)
        first = homes.key_at(0, 0)
        self._object_bytes = int(homes.home(first).numel())
        link_gbps = config.link_gbps or manager.tier(homes.tier_of(first)).link.bandwidth_gbps
        self.window = LinkWindow(link_gbps, config.link_fill) if config.link_fill is not None else None
        if predictor is not None:
            compile_now()  # the planners' kernels, compiled here rather than at a decode's first prefetch

    # ---- demand ----------------------------------------------------------------------------
    def demand(self, keys: Sequence[ObjectKey], tick: int, routing_wait_s: float = 0.0) -> Iterator[list[ObjectKey]]:
        """Yield ``keys`` (one slot group) in waves that are pinned and being copied; use each via ``ready``.

        ``routing_wait_s``: how long the host waited for this layer's routing (the GPU's work); the link
        window tells the part queued copies explain from the idle tail (see ``LinkWindow``).

        The first wave holds every key already present, then as many misses as the group has room for.
        A wave stays pinned until the caller asks for the next one (or the generator closes).
        """
        self._reap()
        self._layer_demands.clear()
        # the stream that uses this layer's waves, asked once per layer (each ask costs microseconds)
        self._compute_stream = torch.cuda.current_stream(self.cache.device) if self._cuda else None
        if self.window is not None:
            self.window.layer_started(routing_wait_s=routing_wait_s)
        present = [k for k in keys if self.cache.contains(k)]
        pending = sorted(k for k in keys if not self.cache.contains(k))
        self.cache.pin(present)
        wave = list(present)
        self.phases.lap("demand_plan")
        first = True
        while pending or first:
            try:
                if pending:
                    pending = self._fetch_some(wave, pending, tick)
                if first:  # once the first misses are on the link: the rest changes no plan of this wave
                    self._account(keys, present, tick)
                else:
                    self.stats.extra_waves += 1
                first = False
                yield list(wave)
            finally:
                if self._cuda and wave:
                    used = torch.cuda.Event()
                    used.record(self._compute_stream)
                    self._fences.wave_ended(wave, self._compute_stream.cuda_stream, used)
                self.cache.unpin(wave)
                wave.clear()

    def _account(self, keys: Sequence[ObjectKey], present: list[ObjectKey], tick: int) -> None:
        """Count a demand of ``keys`` whose ``present`` ones were hits, score the prefetches and evictions that
        awaited it, and mark the hits used at ``tick`` (pinned: no plan of this wave could evict them anyway)."""
        self.stats.demands += len(keys)
        self.stats.hits += len(present)
        self.stats.late += sum(1 for k in present if k in self._loads)
        used = self._unused_prefetches.intersection(present)
        if used:
            self.stats.prefetch_used += len(used)
            self._unused_prefetches -= used
        if keys:
            self.precision.resolve(keys[0].layer, keys)
            self.regret.resolve(keys[0].layer, keys)
        self.cache.touch(present, tick)
        self.phases.lap("demand_plan")

    def ready(self, key: ObjectKey) -> torch.Tensor:
        """``key``'s slot row, once the compute stream will see its bytes (waits only on this copy)."""
        self.ready_all((key,))
        return self.cache.block(key)

    def ready_all(self, keys: Sequence[ObjectKey]) -> None:
        """Make the compute stream see every key's bytes: it waits only on these copies, once per submit whose
        every copy it needs (a wave's misses are one submit: one wait, not one per key), and their stall is
        measured once for all of them (one pair of timing events, not one per key). No rows are built: a
        grouped wave reads its slots by index (building a view per key costs the decode host microseconds)."""
        landing, waiting = self._loads.handles_for(keys)
        if waiting and self._cuda:
            stream = self._compute_stream or torch.cuda.current_stream(self.cache.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for handle in waiting:
                handle.wait_on(stream)
            end.record(stream)
            self._stall_events.append((start, end))
        elif waiting:
            began = time.perf_counter()
            for handle in waiting:
                handle.wait()
            self.stats.stall_s += time.perf_counter() - began
        for key in landing:  # stream-ordered: every later use, and its slot's next copy, queues behind the wait
            self._land(key)

    # ---- prefetch --------------------------------------------------------------------------
    def prefetch(self, context: RouteContext, tick: int, needed_now: frozenset[ObjectKey] = frozenset()) -> int:
        """Predict the ``distance`` layers after ``context.layer``, publish the scores (for the ``predicted``
        eviction policy) and load the best within budget; returns the loads issued. When the link window
        admits nothing, nothing is predicted and the target layers' scores are forgotten."""
        distance = self.config.distance
        if self.predictor is None or distance == 0:
            return 0
        # no reaping here: copies landed since this layer's demand are its own (needed now, never victims) or
        # prefetches, and the next demand lands them all (a reap cost the H100 host about 30 us per layer)
        num_layers = len(self.homes.layers)
        targets = [self.homes.key_at((context.layer + d) % num_layers, 0) for d in range(1, distance + 1)]
        objects = self._admitted()  # before predicting: a decision that admits nothing skips the prediction
        if objects == 0 and self.config.objects_per_layer > 0:
            self.stats.predictions_skipped += 1
            if self.predictions is not None:  # no stale ranking: the policy ranks these layers by recency
                for first in targets:
                    self.predictions.forget(first)
            return self._prefetched(0)
        began = time.perf_counter()
        scores = np.asarray(self.predictor.predict(context, distance))
        self.phases.lap("predict")
        expected = (distance, context.batch_size, context.num_experts)
        if scores.shape != expected:
            raise ConfigError(
                f"prefetch: predictor {type(self.predictor).__name__} returned scores of shape {scores.shape}; the "
                f"Predictor protocol requires [distance, batch, experts] = {list(expected)}"
            )
        per_target = [scores[d].sum(axis=0, dtype=np.float64) for d in range(distance)]  # the planners' dtype
        if self.predictions is not None:
            per_target = [self.predictions.publish(first, per_object) for first, per_object in zip(targets, per_target)]
        if objects == 0:  # prefetch off by config: the prediction serves the eviction policy alone
            return 0
        if self.window is not None:
            self.window.predicted(time.perf_counter() - began)
        # the first target's admission was decided above; a later one's sees the copies queued since
        return sum(self._apply_prefetch(first, per_object, tick, needed_now, objects if d == 0 else None)
                   for d, (first, per_object) in enumerate(zip(targets, per_target)))

    def _admitted(self) -> int:
        """How many objects the link window lets the next prefetch load (``objects_per_layer`` without one)."""
        objects = self.config.objects_per_layer
        if self.window is not None and objects > 0:
            objects = self.window.admitted(self._object_bytes, objects, self.precision.value, self.regret.value)
            self.stats.prefetch_capped += objects < self.config.objects_per_layer
        return objects

    def _apply_prefetch(self, first: ObjectKey, per_object: np.ndarray, tick: int,
                        needed_now: frozenset[ObjectKey], objects: int | None) -> int:
        """Plan and issue the prefetch of ``first``'s layer, whose object ``i`` has ``per_object[i]``, loading at
        most ``objects`` (None: ask the link window now): the rule of ``plan_prefetch``, ranked on the slot
        group's arrays (``GroupState``)."""
        group = self.cache.group_of(first)
        objects = self._admitted() if objects is None else objects
        if objects == 0:
            return self._prefetched(0)
        state = self.cache.groups[group]
        base, free = state.first[first.layer], self.cache.free_slots(group)
        victims = self.cache.evictable(group, needed_now) if free < objects else NO_PLACES  # only when slots fall short
        loads, evictions = plan_group_prefetch(per_object, state.state, victims, base, self.config.min_score,
                                               objects, free)
        if loads.size == 0:  # all worth loading is here or coming, or nothing scores above a victim
            return self._prefetched(0)
        if self._cuda:
            for handle in self._layer_demands:  # demand first: prefetches start once this layer's misses landed
                handle.wait_on(self._prefetch_gate)
            self._layer_demands.clear()
        for place in evictions.tolist():
            key = state.keys[place]
            self._evict(key)
            self.regret.expect(key)
        self.phases.lap("prefetch_plan")
        self._issue([state.keys[place] for place in loads.tolist()], tick, prefetch=True)
        self.phases.lap("prefetch_submit")
        return self._prefetched(loads.size)

    def _prefetched(self, count: int) -> int:
        """A target layer's prefetch is done (``count`` objects issued): its host time is measured."""
        if count == 0:
            self.phases.lap("prefetch_plan")
        if self.window is not None:
            self.window.prefetched(count)
        return count

    # ---- accounting ------------------------------------------------------------------------
    def collect_stats(self) -> PrefetchStats:
        """The counters, with GPU stall time resolved (synchronises the device if stalls were recorded)."""
        if self._stall_events:
            self._stall_events[-1][1].synchronize()
            self.stats.stall_s += sum(s.elapsed_time(e) for s, e in self._stall_events) / 1e3
            self._stall_events.clear()
        return self.stats

    def reset_stats(self) -> None:
        self.collect_stats()
        self.stats = PrefetchStats()
        self._unused_prefetches.clear()

    def drain(self) -> None:
        """Wait for every copy in flight and record it as landed."""
        for key in self._loads:
            self._loads.part(key).wait()
            self._land(key)
        if self._cuda:  # copies landed at ``ready_all`` are ordered before the compute stream's later work only
            torch.cuda.synchronize(self.cache.device)

    # ---- internals -------------------------------------------------------------------------
    def _fetch_some(self, wave: list[ObjectKey], pending: list[ObjectKey], tick: int) -> list[ObjectKey]:
        """Fetch as many ``pending`` keys as the group has room for (evicting by policy); returns the rest."""
        group = self.cache.group_of(pending[0])
        free = self.cache.free_slots(group)
        victims = self.cache.evictable(group) if free < len(pending) else NO_PLACES  # ranked only when slots fall short
        if victims.size == 0 and not wave and free == 0:
            self._wait_group(group)  # only prefetches in flight hold the group's slots: let them land
            free, victims = self.cache.free_slots(group), self.cache.evictable(group)
            if victims.size == 0 and free == 0:
                raise ConfigError(
                    f"prefetch: slot group {group} has no slot that is free or evictable (all pinned); "
                    "give the cache at least one slot per object a layer needs at once"
                )
        room = free + victims.size
        if room == 0:
            return pending
        chunk, rest = pending[:room], pending[room:]
        # victims: resident, unpinned, not wanted by this layer (its present keys are pinned); the plan takes
        # the first of them, so only those become keys
        keys = self.cache.groups[group].keys
        plan = plan_demand(chunk, [keys[p] for p in victims[:max(len(chunk) - free, 0)].tolist()], frozenset(),
                           frozenset(), free)
        for key in plan.evictions:
            self._evict(key)
        self.phases.lap("demand_plan")
        if plan.loads:
            self._issue(plan.loads, tick, prefetch=False)
        self.phases.lap("demand_submit")
        self.cache.pin(plan.loads)
        self.cache.touch(plan.loads, tick)
        wave.extend(plan.loads)
        self.stats.misses += len(plan.loads)
        return rest

    def _issue(self, keys: Sequence[ObjectKey], tick: int, *, prefetch: bool) -> None:
        """Take a slot for each key and copy all of them in one submit; each key keeps its own completion."""
        rows = []
        try:
            for key in keys:
                rows.append(self.cache.begin_load(key, tick))
            gate = None
            if self._cuda:
                gate = self._prefetch_gate if prefetch else self._demand_gate
                self._fences.fence([self.cache.slot_of(key) for key in keys], gate)
            # a demand wave waits for all its misses at once (``ready_all``): no completion per object to record
            handle = self._copies.submit(keys, rows, background=prefetch, after=gate, parts=prefetch)
        except BaseException:
            for key in keys[: len(rows)]:
                self.cache.abort_load(key)
            raise
        nbytes = self._object_bytes
        self._loads.add(keys, handle)
        for key in keys:
            self.stats.bytes_by_tier[self.homes.tier_of(key)] += nbytes
        total = nbytes * len(keys)
        if self.window is not None:
            self.window.queued(total)
        if prefetch:
            self.stats.prefetch_loads += len(keys)
            self.stats.prefetch_bytes += total
            self._unused_prefetches.update(keys)
            for key in keys:
                self.precision.expect(key)
        else:
            self._layer_demands.append(handle)
            self.stats.demand_bytes += total

    def _evict(self, key: ObjectKey) -> None:
        self._fences.evicted(key, self.cache.slot_of(key))
        self.cache.evict(key)
        if key in self._unused_prefetches:
            self._unused_prefetches.discard(key)
            self.stats.prefetch_evicted_unused += 1

    def _land(self, key: ObjectKey) -> None:
        self._loads.land(key)
        self.cache.finish_load(key)

    def _wait_group(self, group: int) -> None:
        for key in [k for k in self._loads if self.cache.group_of(k) == group]:
            self._loads.part(key).wait()
            self._land(key)

    def _reap(self) -> None:
        for key in self._loads.done():
            self._land(key)
