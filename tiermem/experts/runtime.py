"""``ExpertRuntime``: runs one MoE layer's experts out of an ``ExpertStore`` through an HBM ``ExpertCache``.

Per layer: group tokens by expert -> record the routing (tracker; activation counts for LFU) -> demand the
hit experts (misses are fetched now, in one submit per wave, waves if the slot group is too small) ->
compute -> predict and prefetch the next layers. Two ways to compute, chosen by ``compute``:

- ``loop``: each expert on its slot as soon as its own copy has landed, summed in the order of
  transformers' eager experts (``tiermem.experts.compute``); the prefetch is queued before the
  compute launches, right behind this layer's misses, since launching the loop takes long;
- ``grouped``: each wave's experts in two grouped GEMMs over their slots, as transformers'
  ``grouped_mm`` experts (``tiermem.experts.grouped``); the prefetch is planned and queued after the
  last wave's launches, so its host time overlaps the GPU's work on this layer and its copies do not
  compete with a later wave's misses for the link.

Either way the output is bit-identical to the all-resident module computed the same way. With
``pager="device"`` none of the above runs on the host: ``tiermem.experts.device_layer`` pages,
copies and computes each layer on the GPU (grouped, on demand, one CUDA graph per layer). Inference
only: slot weights are not parameters and carry no gradients.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tiermem.config import format_bytes, option, require
from tiermem.errors import CapacityError, ConfigError
from tiermem.experts.cache import ExpertCache
from tiermem.experts.compute import combine, expert_output, route
from tiermem.experts.device_layer import build_device_pager, check_step_table, device_stats
from tiermem.experts.graphs import WaveGraphs
from tiermem.experts.grouped import SlotWeights, compile_now, pair_buffer, run_wave, sum_pairs, wave_rows
from tiermem.experts.routes import RouteTracker
from tiermem.experts.store import ExpertStore
from tiermem.predict.base import Predictor, RouteContext
from tiermem.prefetch.prefetcher import PrefetchConfig, Prefetcher
from tiermem.prefetch.stats import HostPhases
from tiermem.residency.policies import EVICTION_POLICIES, PolicySignals
from tiermem.residency.signals import ActivationCounts, PredictionScores
from tiermem.residency.slots import SlotLayout, SlotPool, slots_for_fraction
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.experts")


class Pager(str, enum.Enum):
    """Where a layer's residency is decided."""

    HOST = "host"  # the host reads each layer's routing back, plans, prefetches (predictors) and issues copies
    DEVICE = "device"  # tensors on the GPU decide and a kernel copies: no host sync per layer, on demand only


class ExpertCompute(str, enum.Enum):
    """How a layer's experts are computed on their slots (each bit-exact to its transformers counterpart)."""

    LOOP = "loop"  # one expert at a time: transformers' eager experts
    GROUPED = "grouped"  # two grouped GEMMs per wave: transformers' grouped_mm experts


@dataclass(frozen=True)
class OffloadConfig:
    """How much HBM the experts get, how it is shared, and how it is managed."""

    hbm_budget_bytes: int | None = option(None, help="HBM bytes for expert slots (or give resident_fraction).",
                                          unit="bytes")
    resident_fraction: float | None = option(None, help="Fraction of each layer's experts that fit in HBM.")
    slot_layout: SlotLayout = option(SlotLayout.PER_LAYER, help="per_layer slot groups, or one shared group.")
    policy: str | None = option(None, help="Eviction: lru, lfu or predicted; default predicted with a predictor, "
                                           "else lru.")
    prefetch: PrefetchConfig = option(PrefetchConfig(), help="Prefetch distance and per-layer budget.")
    lfu_half_life_steps: float | None = option(None, help="Half-life of LFU counts in decode steps; None: never.")
    time_host_phases: bool = option(False, help="Time each host phase of a layer (stats()['host_us_per_layer']).")
    compute: ExpertCompute | None = option(None, help="loop (transformers' eager experts) or grouped (its grouped_mm "
                                                      "experts); None: what the model uses (offload), else loop.")
    cuda_graphs: bool = option(True, help="grouped compute on a GPU: capture a layer whose pairs fit in one wave "
                                          "in a CUDA graph per shape and replay it (bit-identical, far fewer "
                                          "launches per layer).")
    pager: Pager = option(Pager.HOST, help="host: the host pages each layer (prefetch, predictors, any batch); "
                                           "device: the GPU pages on demand (lru, lfu, or predicted from a step "
                                           "table; grouped compute), with no host sync for a layer of at most "
                                           "device_waves_max_tokens tokens (decode), one per wave for a larger one.")
    device_waves_max_tokens: int = option(
        64, help="device pager: a layer of at most this many tokens whose routed pairs outnumber its slots runs its "
                 "waves decided on the device (no host sync, captured in its CUDA graph); a larger one (a prefill) "
                 "reads its routing back and runs exactly the waves it needs. 0: always read back.")
    device_pipelined_waves: bool = option(
        True, help="device pager: run a decode layer whose waves are decided on the device in waves of half its "
                   "slot group, copying wave w+1 (on a second stream, by a quarter of the SMs) while wave w computes; "
                   "a layer that fits one wave is one wave either way.")

    def __post_init__(self) -> None:
        for name, kind in (("pager", Pager), ("slot_layout", SlotLayout), ("compute", ExpertCompute)):
            value = getattr(self, name)  # by value when built directly (from_dict converts): "device" -> DEVICE
            if value is not None and not isinstance(value, kind):
                valid = [member.value for member in kind]
                require(value in valid, self, f"{name} must be one of {valid}, got {value!r}")
                object.__setattr__(self, name, kind(value))
        require((self.hbm_budget_bytes is None) != (self.resident_fraction is None), self,
                "give exactly one of hbm_budget_bytes and resident_fraction")
        require(self.policy is None or (self.policy in EVICTION_POLICIES and self.policy != "belady"), self,
                f"policy must be lru, lfu or predicted (belady needs the future: simulation only), got {self.policy!r}")
        require(self.device_waves_max_tokens >= 0, self,
                f"device_waves_max_tokens must be >= 0, got {self.device_waves_max_tokens}")
        if self.pager is Pager.DEVICE:
            require(self.compute in (None, ExpertCompute.GROUPED), self,
                    "the device pager computes grouped (its wave index is built on the device); use compute='grouped'")
            require(self.lfu_half_life_steps is None, self,
                    "the device pager's LFU counts do not decay; leave lfu_half_life_steps unset or use pager='host'")


class ExpertRuntime:
    """The store, the cache, the prefetcher and the routing tracker of one offloaded model."""

    def __init__(
        self, store: ExpertStore, config: OffloadConfig, *, device: torch.device, top_k: int,
        predictor: Predictor | None = None,
    ) -> None:
        if store.layout.quantized:
            raise ConfigError(
                f"expert runtime: the store packs quantization scales ({store.layout.describe()}); computing on "
                "quantized experts needs a dequantizing kernel, which OffloadedMoE does not have; dequantize first"
            )
        num_layers = len(store.layers)
        if config.prefetch.distance >= num_layers:
            raise ConfigError(
                f"expert runtime: prefetch distance {config.prefetch.distance} must be below the {num_layers} MoE "
                "layers (a prefetch may not target a layer's use after the next)"
            )
        policy = config.policy or ("predicted" if predictor is not None else "lru")
        if policy == "predicted" and predictor is None:
            raise ConfigError("expert runtime: policy 'predicted' ranks by predictions; give a predictor, or choose "
                              "'lru'/'lfu'")
        if policy == "predicted" and config.pager is Pager.HOST and config.prefetch.distance == 0:
            raise ConfigError("expert runtime: policy 'predicted' ranks by the predictions of the prefetch; give a "
                              "prefetch distance > 0, or choose 'lru'/'lfu'")
        if config.pager is Pager.DEVICE and predictor is not None:
            check_step_table(predictor, policy, per_layer=config.slot_layout is SlotLayout.PER_LAYER)
        self.store = store
        self.config = config
        self.top_k = top_k
        self.counts = ActivationCounts(config.lfu_half_life_steps * num_layers if config.lfu_half_life_steps else None)
        self._record_counts = policy == "lfu"  # the one policy that reads them: others skip the per-layer update
        predictions = PredictionScores()
        self._keys = {layer: tuple(store.key(layer, e) for e in range(store.num_experts)) for layer in store.layers}
        self.cache = ExpertCache(
            layout=store.layout, layers=store.layers, keys=[self._keys[layer] for layer in store.layers],
            slots_per_group=_slots_per_group(store, config, top_k),
            slot_layout=config.slot_layout, device=device, policy=policy,
            signals=PolicySignals(counts=self.counts, predictions=predictions),
        )
        self.phases = HostPhases(enabled=config.time_host_phases)
        # the device pager reads a predictor only as its step table: the host prefetcher never predicts then (and
        # compiles no planner for it)
        self.prefetcher = Prefetcher(self.cache, store, store.manager, config=config.prefetch,
                                     predictor=predictor if config.pager is Pager.HOST else None,
                                     predictions=predictions, phases=self.phases)
        self.compute = config.compute or (ExpertCompute.GROUPED if config.pager is Pager.DEVICE else ExpertCompute.LOOP)
        self._slot_weights: list[SlotWeights] = []
        if self.compute is ExpertCompute.GROUPED:
            compile_now()  # the wave's row sort, compiled here rather than in a decode's first layer
            per_group = self.cache.pool.slots_per_group
            self._slot_weights = [SlotWeights.of(store.layout, self.cache.memory[g * per_group:(g + 1) * per_group])
                                  for g in range(self.cache.num_groups)]
        use_graphs = self.compute is ExpertCompute.GROUPED and config.cuda_graphs and self.cache.device.type == "cuda"
        self._graphs = WaveGraphs(self._slot_weights) if use_graphs else None
        self._device = build_device_pager(store, self.cache, self._slot_weights, policy, cuda_graphs=config.cuda_graphs,
                                          waves_max_tokens=config.device_waves_max_tokens,
                                          pipelined=config.device_pipelined_waves) \
            if config.pager is Pager.DEVICE else None
        self._predictor = predictor
        self._scores_from: Any = None  # the step table now in the device pager (predicted policy)
        self.tracker = RouteTracker(num_layers=num_layers, num_experts=store.num_experts, top_k=top_k)
        # a predictor that reads the router input gets it on the host, copied with the routing: read on the GPU
        # after this layer's compute was queued, it would wait for that compute (and its misses' copies)
        self._input_to_host = predictor is not None and getattr(predictor, "reads_hidden", True)
        self._closed = False
        log.info("expert runtime: %d slot(s) per group x %d group(s) (%s of HBM), policy %s, prefetch %s",
                 self.cache.pool.slots_per_group, self.cache.num_groups, format_bytes(self.cache.capacity_bytes),
                 policy, config.prefetch)

    def run_layer(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor], router_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed experts' summed output for ``hidden [T, H]`` at real layer ``layer``.

        ``router_input`` is what predictors see as the router's input (``RouteContext.hidden``); in a
        model that is ``hidden`` itself (the default), a replay passes the recorded one."""
        if self._closed:
            raise ConfigError("expert runtime: closed (tiermem.offload handle.close() was called); the offloaded "
                              "experts are gone, so the model cannot run anymore")
        if top_k_index.numel() == 0:  # no token routed here (an empty batch): nothing to page or compute
            return hidden.new_zeros(hidden.shape)
        phases = self.phases
        phases.start()
        if self._device is not None:
            if self._device.pager.policy == "predicted" and self._predictor.step is not self._scores_from:
                self._scores_from = self._predictor.step  # a new table (the bench's cross-fitted halves)
                self._device.pager.set_scores(self._scores_from)
            out = self._device.run(self.store.position(layer), hidden, top_k_index.to(hidden.device), top_k_weights,
                                   act_fn)
            phases.lap("device")
            phases.layer_done()
            return out
        router_input = hidden if router_input is None else router_input
        if self._input_to_host and router_input.is_cuda:  # queued before the routing's copy: one wait for both
            router_input = router_input.detach().to("cpu", non_blocking=True)
        began = time.perf_counter()
        index = top_k_index.to("cpu").numpy()  # the one synchronisation per layer: which experts were hit
        routing_wait_s = time.perf_counter() - began
        phases.lap("route_sync")
        if self.compute is ExpertCompute.GROUPED:
            return self._run_grouped(layer, index, hidden, top_k_weights, act_fn, router_input, routing_wait_s)
        routing = route(torch.from_numpy(index), self.store.num_experts, hidden.device)
        context, tick, by_key = self._record_routing(layer, index, router_input)
        outputs: dict[int, torch.Tensor] = {}
        prefetched = False
        for wave in self.prefetcher.demand(list(by_key), tick, routing_wait_s):
            if not prefetched:
                # the next layers' prefetch queues on the link right behind this layer's misses, so it
                # moves while the host launches this layer's compute, not when the next layer's misses come
                self.prefetcher.prefetch(context, tick, needed_now=frozenset(by_key))
                prefetched = True
            for key in wave:
                weights = self.store.layout.views(self.prefetcher.ready(key))
                expert = by_key[key]
                outputs[expert] = expert_output(hidden, routing, expert, weights, top_k_weights, act_fn, hidden.dtype)
            phases.lap("compute")
        combined = combine(hidden, routing, outputs)
        phases.lap("compute")
        phases.layer_done()
        return combined

    def _record_routing(self, layer: int, index: np.ndarray,
                        router_input: torch.Tensor) -> tuple[RouteContext, int, dict[ObjectKey, int]]:
        """Record layer ``layer``'s routing ``[T, K]`` (tracker; activation counts for LFU); returns the predictors'
        context (``hidden``: the router's input as the model computed it, gain of the norm included), the
        tick and the hit experts' keys -> expert ids, in ascending expert order."""
        num_experts = self.store.num_experts
        pairs = index.reshape(-1)
        uses = np.bincount(pairs[(pairs >= 0) & (pairs < num_experts)], minlength=num_experts)
        experts = np.flatnonzero(uses)
        context, tick = self.tracker.record(self.store.position(layer), index, router_input)
        layer_keys = self._keys[layer]
        expert_of = {layer_keys[e]: e for e in experts.tolist()}
        self.phases.lap("route")
        if self._record_counts:
            self.counts.record_many(zip(expert_of, uses[experts].tolist()), tick)
        self.phases.lap("stats")
        return context, tick, expert_of

    def _run_grouped(
        self, layer: int, index: np.ndarray, hidden: torch.Tensor, top_k_weights: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor], router_input: torch.Tensor, routing_wait_s: float,
    ) -> torch.Tensor:
        phases = self.phases
        num_experts = self.store.num_experts
        pairs = index.reshape(-1)
        context, tick, expert_of = self._record_routing(layer, index, router_input)
        group = self.cache.group_of(self._keys[layer][0])
        weights = self._slot_weights[group]
        first_slot = group * self.cache.pool.slots_per_group
        out, result = None, None
        for wave in self.prefetcher.demand(list(expert_of), tick, routing_wait_s):
            slot_of_expert = np.full(num_experts, -1, dtype=np.int64)
            self.prefetcher.ready_all(wave)
            for key in wave:
                slot_of_expert[expert_of[key]] = self.cache.slot_of(key) - first_slot
            rows = wave_rows(pairs, slot_of_expert, weights.down.shape[0])
            if out is None and self._graphs is not None and rows.num_rows == pairs.size:  # the whole layer
                result = self._graphs.run(group, hidden, top_k_weights, rows, act_fn)
            if result is None:
                out = pair_buffer(hidden, top_k_weights, weights) if out is None else out
                run_wave(hidden, top_k_weights, rows, weights, act_fn, out)
            phases.lap("compute")
        # after the last wave's launches: planning overlaps the GPU's work on this layer, and the prefetch
        # copies (which start once this layer's misses landed) never share the link with a later wave's
        self.prefetcher.prefetch(context, tick, needed_now=frozenset(expert_of))
        if result is None:
            result = sum_pairs(out, index.shape[0], hidden.dtype)
        phases.lap("compute")
        phases.layer_done()
        return result

    def capture_graphs(self, hidden: torch.Tensor, top_k_weights: torch.Tensor,
                       act_fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Capture now, in every slot group, the graph of a whole-layer wave of these shapes (``hidden``
        ``[T, H]``, ``top_k_weights`` ``[T, K]``), so the first layers of that size do not pay for the
        capture; returns how many groups have it ready (0 without graphs: CPU, loop compute, or off)."""
        if self._device is not None:
            return sum(self._device.prepare(position, hidden, top_k_weights, act_fn)
                       for position in range(len(self.store.layers)))
        if self._graphs is None:
            return 0
        return sum(self._graphs.prepare(group, hidden, top_k_weights, act_fn) for group in range(self.cache.num_groups))

    def reset_stats(self) -> None:
        """Zero the hit, miss and byte counters (the cache's contents stay)."""
        self.prefetcher.reset_stats()
        if self._device is not None:
            self._device.pager.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Hit rate, prefetch precision/recall, bytes moved per tier, stall time, and the cache's shape."""
        if self._device is None:
            counters = self.prefetcher.collect_stats().as_dict()
        else:
            counters = device_stats(self._device, self.store).as_dict()
            counters["stall_s"] = None  # the host never waits per layer, so there is no host-side stall to time
        graphs = self._graphs if self._device is None else self._device
        return {
            **counters,
            "pager": self.config.pager.value,
            "host_us_per_layer": self.phases.us_per_layer(),
            "graphs_captured": len(graphs) if graphs is not None else 0,
            "graph_replays": graphs.replays if graphs is not None else 0,
            "policy": self.cache.policy_name,
            "slots_per_group": self.cache.pool.slots_per_group,
            "slot_groups": self.cache.num_groups,
            "hbm_bytes": self.cache.capacity_bytes,
            "expert_bytes": self.store.layout.block_bytes,
            "store_bytes_by_tier": {t: self.store.placement.experts_on(t) * self.store.layout.block_bytes
                                    for t in self.store.placement.tiers},
        }

    def close(self) -> None:
        """Wait for copies in flight and release the HBM slots (idempotent); the store is closed by its owner."""
        if self._closed:
            return
        self._closed = True
        if self._graphs is not None:
            self._graphs.clear()
        if self._device is not None:
            self._device.clear()
            self._device = None
        self.prefetcher.drain()
        self._slot_weights = []  # views of the slots: they would keep the HBM alive
        self.cache.release()


def _slots_per_group(store: ExpertStore, config: OffloadConfig, top_k: int) -> int:
    """Slots per group from the byte budget or the fraction; raises CapacityError below one step's working set."""
    num_layers, block = len(store.layers), store.layout.block_bytes
    per_layer = config.slot_layout is SlotLayout.PER_LAYER
    if config.hbm_budget_bytes is not None:
        pool = SlotPool.for_budget(config.hbm_budget_bytes, block, layout=config.slot_layout, num_layers=num_layers,
                                   working_set_per_layer=top_k)
        return pool.slots_per_group
    slots = slots_for_fraction(config.resident_fraction, store.num_experts if per_layer else
                               store.num_experts * num_layers)
    if slots < top_k:
        groups = num_layers if per_layer else 1
        needed = top_k * groups * block
        raise CapacityError(
            f"expert runtime: resident_fraction {config.resident_fraction} gives {slots} slot(s) per group, but one "
            f"token needs its top-{top_k} experts at once: {needed} bytes ({format_bytes(needed)}) of HBM at least; "
            f"raise resident_fraction to >= {top_k / (store.num_experts * (1 if per_layer else num_layers)):.4f}"
        )
    return slots
