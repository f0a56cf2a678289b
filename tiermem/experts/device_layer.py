"""``DevicePagedLayers``: a layer's paging, copies and grouped compute, queued on the GPU with no host sync.

With the device pager (``OffloadConfig(pager="device")``) a layer is: map the routing to object
ids -> ``DevicePager.page`` (slots, copies and the wave index, on the device) ->
``BlockCopier.copy`` (one kernel that reads the missed experts from their host homes) ->
``grouped.compute_wave`` over the slot group -> sum over top-k; a decode layer in waves copies each
wave beside the previous one's compute (``pipelined``). The host never reads the routing,
so it runs ahead of the GPU by whole layers; on a GPU each (group, shape) is captured once in a
CUDA graph and replayed, so a layer costs the host three input copies, one replay and one clone.
``build_device_pager`` assembles it for a runtime's store and cache, ``device_stats`` reports its
counters in the host pager's terms, and ``check_step_table`` checks a predictor for its predicted
eviction.

Invariants:
- a layer whose routed pairs fit its slot group (``pairs <= slots_per_group``, a static bound on its
  distinct experts: decode at small batch) is one wave and never waits on the host;
- a layer with more pairs runs its distinct experts in waves, resident ones first, then by id:
  decided on the device for a layer of at most ``waves_max_tokens`` tokens (decode at larger batch:
  a static count of waves, so its graph captures them; a wave left empty copies and computes
  nothing), else (a prefill) after one read of the routing, exactly the waves it needs, each wave's
  copies read back and run on the copy engines (eager, no graph). Unpipelined, both make the same
  waves of at most a group's slots (``ceil(min(pairs, experts) / slots)`` on the device).
  ``pipelined`` decode waves hold at most half a group's slots: wave ``w + 1`` is paged keeping wave
  ``w``'s objects, so its copies (on a second stream) never overwrite a slot wave ``w`` computes on,
  and start only after wave ``w - 1`` computed (the copy stream waits for the compute stream after
  each paging); the layer's compute stream waits for its last copy before the layer ends;
- the output is bit-identical to the host pager's grouped path and to transformers' ``grouped_mm``
  experts on the all-resident weights (each row computed by its own expert's GEMM group; dropped
  pairs are zero); slot choice never changes a value;
- a graph's warm-ups page real waves (their copies really run, so the tables stay true); the first
  warm-up of a layer met in a decode is that layer's run (its output is returned, its paging
  counted), and the counters forget the other warm-ups (a layer in waves has none: a second run
  would page other waves and leave the group unlike an eager run's); ``prepare`` counts none and
  leaves the group empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from tiermem.errors import ConfigError
from tiermem.experts.cache import ExpertCache
from tiermem.experts.graphs import WARMUP_RUNS
from tiermem.experts.grouped import SlotWeights, compute_wave, pair_buffer, sum_pairs
from tiermem.experts.store import ExpertStore
from tiermem.predict.base import Predictor
from tiermem.prefetch.stats import PrefetchStats
from tiermem.residency.device_pager import DevicePager, PagedWave
from tiermem.residency.slots import SlotLayout
from tiermem.transfer.uva_copy import BlockCopier

log = logging.getLogger("tiermem.experts")


@dataclass(frozen=True, eq=False)
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # static inputs, copied in before each replay
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    out: torch.Tensor  # the layer's output, in the graphs' memory pool


class DevicePagedLayers:
    """Runs layers through ``pager`` and ``copier`` on ``weights[group]`` (one ``SlotWeights`` per slot group)."""

    def __init__(self, pager: DevicePager, copier: BlockCopier, weights: Sequence[SlotWeights], *,
                 experts_per_layer: int, per_layer: bool, cuda_graphs: bool, waves_max_tokens: int = 64,
                 pipelined: bool = False, max_graphs: int = 1024) -> None:
        if pipelined and pager.slots_per_group < 2:
            raise ConfigError(f"device pager: pipelined waves need at least 2 slots per group (one wave computes while "
                              f"the next is copied); this cache has {pager.slots_per_group}. Raise the HBM budget "
                              "or turn device_pipelined_waves off")
        self.pager, self.copier, self.weights = pager, copier, list(weights)
        self.waves_max_tokens = waves_max_tokens  # larger layers with more pairs than slots read their routing back
        self.pipelined = pipelined  # device-decided waves of half a group, each copied while the last computes
        on_gpu = pipelined and pager.device.type == "cuda"
        self._copies = torch.cuda.Stream(pager.device) if on_gpu else None
        # the link saturates with 8 programs (bench/copy_overlap.py: 46.6 GB/s, against 45.3-47.7 for 16-528 on the
        # H100); a quarter of the SMs leaves the rest to the wave computing beside the copy
        self._copy_programs = max(8, torch.cuda.get_device_properties(pager.device).multi_processor_count // 4) \
            if on_gpu else None
        self.experts_per_layer = experts_per_layer
        self.per_layer = per_layer  # a slot group per layer position, or one group shared by every layer
        self.use_graphs = cuda_graphs and pager.device.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.replays = 0

    def place(self, position: int) -> tuple[int, int]:
        """The slot group of layer ``position`` and the object id of its expert 0 within that group."""
        return (position, 0) if self.per_layer else (0, position * self.experts_per_layer)

    def expert_of(self, group: int, obj: int) -> tuple[int, int]:
        """The layer position and expert index of object ``obj`` of ``group`` (``place``'s inverse)."""
        return (group, obj) if self.per_layer else divmod(obj, self.experts_per_layer)

    def run(self, position: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The routed experts' summed output ``[T, H]`` of the layer at ``position``."""
        group, first_object = self.place(position)
        if top_k_index.numel() > self.pager.slots_per_group and top_k_index.shape[0] > self.waves_max_tokens:
            rows = self._waves(group, first_object, hidden, top_k_index, top_k_weights, act_fn)
            return sum_pairs(rows, hidden.shape[0], hidden.dtype)
        key = self._key(group, first_object, hidden, top_k_index, top_k_weights, act_fn)
        captured = self._graphs.get(key)
        if captured is None:
            if not self._may_capture(key):
                return self._layer(group, first_object, hidden, top_k_index, top_k_weights, act_fn)
            return self._capture(key, group, first_object, hidden, top_k_index, top_k_weights, act_fn, count=True)
        captured.hidden.copy_(hidden)
        captured.top_k_index.copy_(top_k_index)
        captured.top_k_weights.copy_(top_k_weights)
        captured.graph.replay()
        self.replays += 1
        return captured.out.clone()

    def prepare(self, position: int, hidden: torch.Tensor, top_k_weights: torch.Tensor,
                act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Capture the graph of these shapes for the layer at ``position`` now, before it is needed; its warm-up
        counts nothing and the group is left empty. Returns whether a graph is ready."""
        group, first_object = self.place(position)
        index = torch.zeros(top_k_weights.shape, dtype=torch.int64, device=hidden.device)
        key = self._key(group, first_object, hidden, index, top_k_weights, act_fn)
        if key not in self._graphs and self._may_capture(key):
            self._capture(key, group, first_object, hidden, index, top_k_weights, act_fn, count=False)
            self.pager.forget(group)
        return key in self._graphs

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def _layer(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layer's summed output with no host sync: one wave, or waves decided on the device (pipelined or not)."""
        waves = self._pair_rows if top_k_index.numel() <= self.pager.slots_per_group else self._device_waves
        return sum_pairs(waves(group, first_object, hidden, top_k_index, top_k_weights, act_fn),
                         hidden.shape[0], hidden.dtype)

    def _objects(self, experts: torch.Tensor, first_object: int) -> torch.Tensor:
        """The group's object ids of a layer's routed experts; ``-1`` for a dropped pair (out of range)."""
        return torch.where((experts >= 0) & (experts < self.experts_per_layer), experts + first_object, -1)

    def _pair_rows(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor], *,
                   listed: bool = False) -> torch.Tensor:
        """One wave: page, copy, compute; each pair's weighted expert output ``[T * K, H]`` (dropped pairs: zero).
        ``listed``: read the wave's copies back and run them on the copy engines (waves of a synchronised layer)."""
        wave = self.pager.page(group, self._objects(top_k_index.reshape(-1), first_object), top_k_weights.shape[-1])
        self.copier.copy(group, wave.missing, wave.victims, wave.count, engines=listed)
        return self._compute(group, wave, hidden, top_k_weights, act_fn)

    def _compute(self, group: int, wave: PagedWave, hidden: torch.Tensor, top_k_weights: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A paged wave's grouped compute: each pair's weighted expert output ``[T * K, H]`` (pairs not in it: zero)."""
        weights = self.weights[group]
        out = pair_buffer(hidden, top_k_weights, weights)
        compute_wave(hidden, top_k_weights, wave.index, wave.pair_slot.numel(), weights, act_fn, out)
        return out.masked_fill_((wave.pair_slot < 0).unsqueeze(-1), 0)  # rows past the last slot's are not computed

    def _pipelined(self, group: int, hidden: torch.Tensor, top_k_weights: torch.Tensor,
                   act_fn: Callable[[torch.Tensor], torch.Tensor], objects: torch.Tensor,
                   members: list[torch.Tensor]) -> torch.Tensor:
        """``_device_waves``' waves (``members``: each wave's pairs of ``objects``; at most half the group's slots),
        wave ``w + 1`` paged with wave ``w``'s objects kept and copied on the copy stream (by a quarter of the SMs)
        while wave ``w`` computes; each pair's weighted output ``[T * K, H]``.

        Stream order makes it safe: wave ``w + 1``'s copies overwrite neither wave ``w``'s slots (kept) nor its own,
        and start after every wave before ``w`` computed (the copy stream waits for the compute stream at
        each wave's paging, which is queued after wave ``w - 1``'s compute)."""
        waves = len(members)
        masked = [torch.where(member, objects, -1) for member in members]
        compute = torch.cuda.current_stream(hidden.device) if self._copies is not None else None
        paged: list[PagedWave] = []  # held until the copy stream rejoins: it reads these tensors
        landed: list[torch.cuda.Event | None] = []

        def page_and_copy(wave: int) -> None:
            paged.append(self.pager.page(group, masked[wave], top_k_weights.shape[-1],
                                         keep=masked[wave - 1] if wave else None))
            copy = paged[-1].missing, paged[-1].victims, paged[-1].count
            if self._copies is None:
                self.copier.copy(group, *copy)
                landed.append(None)
                return
            self._copies.wait_stream(compute)
            with torch.cuda.stream(self._copies):
                self.copier.copy(group, *copy, programs=self._copy_programs)
                landed.append(torch.cuda.Event())
                landed[-1].record()

        page_and_copy(0)
        out = pair_buffer(hidden, top_k_weights, self.weights[group])
        for wave in range(waves):
            if wave + 1 < waves:
                page_and_copy(wave + 1)
            if landed[wave] is not None:
                compute.wait_event(landed[wave])
            rows = self._compute(group, paged[wave], hidden, top_k_weights, act_fn)
            out = torch.where(members[wave].unsqueeze(-1), rows, out)
        if compute is not None:
            compute.wait_stream(self._copies)
        return out

    def _device_waves(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A layer with more routed pairs than its group has slots, in waves decided on the device
        (``DevicePager.split_waves``: resident experts first, then by id, as ``_waves`` orders them; a static
        ``ceil(min(pairs, experts) / W)`` waves of ``W`` = the group's slots, or half of them ``pipelined``); each
        pair's weighted output ``[T * K, H]``."""
        experts = top_k_index.reshape(-1)
        objects = self._objects(experts, first_object)
        wave_of_pair, waves = self.pager.split_waves(
            group, objects, distinct_max=self.experts_per_layer,
            wave_objects=self.pager.slots_per_group // 2 if self.pipelined else None)
        members = [wave_of_pair == wave for wave in range(waves)]
        if self.pipelined:
            return self._pipelined(group, hidden, top_k_weights, act_fn, objects, members)
        return self._merge_waves(group, first_object, hidden, top_k_index, top_k_weights, act_fn, members,
                                 listed=False)

    def _waves(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A layer with more routed pairs than its group has slots (a prefill): the host reads the routing and
        which experts are resident, then the distinct experts run in waves of at most a group's slots, resident
        ones first, each paged and computed on the device as a decode layer; the host reads each wave's copies
        back (one synchronisation per wave) and runs them on the copy engines, faster than the copy kernel."""
        experts = top_k_index.reshape(-1)
        objects = self._objects(experts, first_object)
        chunks = self.pager.plan_waves(group, objects)
        return self._merge_waves(group, first_object, hidden, top_k_index, top_k_weights, act_fn,
                                 (torch.isin(experts, (chunk - first_object).to(experts.device)) for chunk in chunks),
                                 listed=True)

    def _merge_waves(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor],
                     members: Iterable[torch.Tensor], *, listed: bool) -> torch.Tensor:
        """Run one wave per mask of ``members`` (``[T * K]``: the pairs of that wave) and merge each pair's row from
        its own wave; ``listed``: copy each wave on the copy engines (``_pair_rows``)."""
        experts = top_k_index.reshape(-1)
        out = pair_buffer(hidden, top_k_weights, self.weights[group])
        for member in members:
            rows = self._pair_rows(group, first_object, hidden, torch.where(member, experts, -1).view_as(top_k_index),
                                   top_k_weights, act_fn, listed=listed)
            out = torch.where(member.unsqueeze(-1), rows, out)
        return out

    def _key(self, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
        return (group, first_object, tuple(hidden.shape), hidden.dtype, tuple(top_k_index.shape), top_k_index.dtype,
                tuple(top_k_weights.shape), top_k_weights.dtype, act_fn)

    def _may_capture(self, key: tuple) -> bool:
        return self.use_graphs and key not in self._failed and len(self._graphs) < self.max_graphs

    def _capture(self, key: tuple, group: int, first_object: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor], *,
                 count: bool) -> torch.Tensor:
        """Capture this layer's graph; returns the first warm-up's output, which is this layer's (and, with
        ``count``, the one warm-up whose paging the counters keep)."""
        static = hidden.clone(), top_k_index.clone(), top_k_weights.clone()
        saved = self.pager.save_counts()
        current = torch.cuda.current_stream(hidden.device)
        side = torch.cuda.Stream(device=hidden.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            first = self._layer(group, first_object, *static, act_fn)
            if count:
                saved = self.pager.save_counts()
            # A layer in waves ran each wave's kernels several times already; run again, it would page other
            # waves (they follow residency), leaving the group unlike an eager run's.
            for _ in range(WARMUP_RUNS - 1 if top_k_index.numel() <= self.pager.slots_per_group else 0):
                self._layer(group, first_object, *static, act_fn)
        current.wait_stream(side)
        first.record_stream(current)  # the caller uses it on its stream
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._layer(group, first_object, *static, act_fn)
        except RuntimeError as exc:  # an op that cannot be captured: this shape stays eager
            self._failed.add(key)
            log.warning("device pager graphs: capturing a layer of %d token(s) on slot group %d failed (%s); it "
                        "runs eagerly", hidden.shape[0], group, exc)
        else:
            self._graphs[key] = _Captured(graph, *static, out)
        finally:
            self.pager.restore_counts(saved)
        return first


def build_device_pager(store: ExpertStore, cache: ExpertCache, weights: Sequence[SlotWeights], policy: str, *,
                       cuda_graphs: bool, waves_max_tokens: int = 64, pipelined: bool = False) -> DevicePagedLayers:
    """The device pager over ``cache``'s slot groups and ``store``'s homes (validated here)."""
    hooked = sorted(t for t in store.placement.tiers if store.manager.tier(t).io_hooked)
    if hooked:
        raise ConfigError(f"expert runtime: the device pager's kernel reads the homes directly, past the I/O hooks "
                          f"of tier(s) {hooked} (modelled time, injected faults); use pager='host' with them")
    per_group = cache.pool.slots_per_group
    positions = range(len(store.layers))
    groups = [[p] for p in positions] if cache.slot_layout is SlotLayout.PER_LAYER else [list(positions)]
    homes = [[store.home(store.key_at(p, e)) for p in group for e in range(store.num_experts)] for group in groups]
    pager = DevicePager(num_groups=cache.num_groups, slots_per_group=per_group, objects_per_group=len(homes[0]),
                        device=cache.device, policy=policy)
    copier = BlockCopier(homes, [cache.memory[g * per_group:(g + 1) * per_group] for g in range(cache.num_groups)])
    return DevicePagedLayers(pager, copier, weights, experts_per_layer=store.num_experts,
                             per_layer=cache.slot_layout is SlotLayout.PER_LAYER, cuda_graphs=cuda_graphs,
                             waves_max_tokens=waves_max_tokens, pipelined=pipelined)


def device_stats(layers: DevicePagedLayers, store: ExpertStore) -> PrefetchStats:
    """The device pager's counters in the host pager's terms (demands are distinct experts per layer)."""
    needed, loads = layers.pager.stats()
    block = store.layout.block_bytes
    stats = PrefetchStats(demands=needed, misses=int(loads.sum()), demand_bytes=int(loads.sum()) * block)
    stats.hits = needed - stats.misses
    for group, counts in enumerate(loads.tolist()):
        for obj, copies in enumerate(counts):
            if copies:
                stats.bytes_by_tier[store.tier_of(store.key_at(*layers.expert_of(group, obj)))] += copies * block
    return stats


def check_step_table(predictor: Predictor, policy: str, *, per_layer: bool) -> None:
    """The device pager reads a predictor only as a step table ``[layers, experts, experts]`` (``predictor.step``:
    P(expert j at a layer | expert i at that layer one token earlier), a co-occurrence predictor's)."""
    if policy != "predicted":
        raise ConfigError(f"expert runtime: the device pager evicts by {policy} and would ignore the predictor; "
                          "use policy='predicted' or drop the predictor")
    if not (hasattr(type(predictor), "step") or hasattr(predictor, "step")):  # a property is not called here
        raise ConfigError(f"expert runtime: the device pager ranks slots by a step table (predictor.step, as the "
                          f"cooccurrence predictor has); {type(predictor).__name__} has none; use pager='host' for it")
    if not per_layer:
        raise ConfigError("expert runtime: the device pager's predicted eviction scores each layer's slots with its "
                          "layer's step table; use slot_layout='per_layer'")
