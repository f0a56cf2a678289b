"""Pages one MoE layer's experts into its K HBM slots on the GPU's own decision: capturable in a CUDA graph.

``LayerPager`` (``pager.py``) reads each step's routing back to the host to plan, so a step that pages
cannot sit inside a CUDA graph: SGLang runs it as an eager break of a breakable graph, and a full
graph is refused. This pager keeps the layer's residency in tiermem's ``DevicePager`` (the slot
tables as GPU tensors, decided by one Triton program; LRU, or ``predicted``: slots ranked by a
step table, P(expert next step | experts this step), set with ``set_step_table``) and copies the
missed experts with tiermem's ``BlockCopier`` (a Triton kernel that reads the pinned host homes
over UVA), one copy group per slot tensor (SGLang's ``w13_weight`` and ``w2_weight`` rows).

A step of at most ``waves_max_tokens`` tokens (decode) never syncs: ``device_waves`` splits it on
the GPU into a static number of waves of at most K distinct experts (one when its routed entries
fit the K slots; else ``ceil(min(entries, E) / K)``, resident experts first, then by id: tiermem's
``DevicePager.split_waves``, a wave past the step's last left empty), and ``place_all`` queues each
wave's paging and copies, so the MoE kernels after them are captured with them in SGLang's decode
graph at any batch size and every replay pages for its own routing. A larger step (a prefill)
goes through ``plan`` (which reads the routing and the resident set back once) and ``place`` per
wave, the same two calls as ``LayerPager``: the same waves, exactly as many as it needs, each
decided on the device and its copies read back and run on the copy engines (as SGLang's own eager
path copies).

Invariants: the device tables are the only record of residency, and every wave (replayed, captured
or eager) reads and writes them on the current stream, so graph replays and eager steps stay
coherent; a wave's copies are queued before the kernel that reads its slots, on the same stream;
a wave never holds more than K distinct experts (``device_waves``' and ``plan``'s waves).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tiermem.errors import ConfigError
from tiermem.experts.store import ExpertStore
from tiermem.residency.device_pager import DevicePager
from tiermem.transfer.uva_copy import BlockCopier

from tiermem_sglang.pager import PagerStats, check_slots


class DeviceLayerPager:
    """Residency (on the device) and copies for the K HBM slots of MoE layer ``layer``."""

    def __init__(self, *, store: ExpertStore, layer: int, slots: Mapping[str, torch.Tensor], policy: str = "lru",
                 waves_max_tokens: int = 256, kernel: bool | None = None) -> None:
        """``policy``: ``lru`` or ``predicted`` (give the table with ``set_step_table``; until then it ranks as LRU).
        ``waves_max_tokens``: the largest step paged with no host sync (``on_device``).
        ``kernel``: decide and copy with the Triton kernels (default: where the slots are on a GPU)."""
        self.store = store
        self.waves_max_tokens = waves_max_tokens
        self.layer = layer
        self.slots = dict(slots)
        self.num_slots = check_slots(store, self.slots)
        self.num_experts = store.num_experts
        names = store.layout.names
        self.pager = DevicePager(num_groups=1, slots_per_group=self.num_slots, objects_per_group=self.num_experts,
                                 device=self.device, policy=policy, kernel=kernel)
        homes = [[store.read(layer, expert)[name] for expert in range(self.num_experts)] for name in names]
        rows = [self.slots[name].view(self.num_slots, -1).view(torch.uint8) for name in names]
        self.copier = BlockCopier(homes, rows, kernel=kernel)
        self._first_wave = 0  # the pager's clock when the counters were last reset
        self._steps = torch.zeros((), dtype=torch.int64, device=self.device)  # counted on the device (graph replays)

    @property
    def device(self) -> torch.device:
        return next(iter(self.slots.values())).device

    @property
    def stats(self) -> PagerStats:
        """The counters since ``fill`` (reads the device; graph replays count too)."""
        needed, loads = self.pager.stats()
        misses = int(loads.sum())
        waves = int(self.pager.clock) - self._first_wave
        return PagerStats(steps=int(self._steps), waves=waves, hits=needed - misses, misses=misses,
                          bytes_loaded=misses * self.store.layout.payload_bytes)

    def set_step_table(self, table: np.ndarray) -> None:
        """The predicted policy's table ``[E, E]``: ``table[i, j]``, the chance that expert ``j`` is routed at the
        next step when ``i`` is at this one (a co-occurrence predictor's ``step`` for this layer)."""
        expected = (self.num_experts, self.num_experts)
        if tuple(table.shape) != expected:
            raise ConfigError(f"tiermem-sglang: layer {self.layer}'s step table is {list(table.shape)}; its "
                              f"{self.num_experts} experts need {list(expected)}: a trace of this model")
        self.pager.set_scores(table[None])

    def resident_experts(self) -> set[int]:
        """Experts in a slot (their copy queued); reads the device."""
        return set(self.pager.resident(0))

    def slot_of(self, expert: int) -> int | None:
        return self.pager.resident(0).get(expert)

    def fill(self) -> None:
        """Start with experts ``0 .. K-1`` in slots ``0 .. K-1`` (as after loading), and wait for them."""
        self.place_all(torch.arange(self.num_slots, device=self.device).unsqueeze(0))
        self.pager.reset_stats()
        self._first_wave = int(self.pager.clock)
        self._steps.zero_()

    def on_device(self, topk_ids: torch.Tensor) -> bool:
        """Whether a step of this shape is paged with no host sync (``device_waves``) rather than planned (``plan``):
        decided from the shape alone, so a captured graph and an eager step of one shape page alike (the config's
        ``unsynced_max_tokens``, which caps the decode graphs)."""
        return topk_ids.numel() <= self.num_slots or topk_ids.shape[0] <= self.waves_max_tokens

    def device_waves(self, topk_ids: torch.Tensor) -> list[torch.Tensor]:
        """One step's waves, decided on the device: ``topk_ids`` with the entries of other waves masked to ``-1``,
        one tensor per wave (``place_all`` each in turn); see the module docstring. No host sync."""
        self._steps += 1
        if topk_ids.numel() <= self.num_slots:
            return [topk_ids]
        wave_of_entry, waves = self.pager.split_waves(0, topk_ids.reshape(-1), distinct_max=self.num_experts)
        wave_of_entry = wave_of_entry.view(topk_ids.shape)
        return [torch.where(wave_of_entry == wave, topk_ids, -1) for wave in range(waves)]

    def place_all(self, topk_ids: torch.Tensor, *, engines: bool = False) -> torch.Tensor:
        """Make every routed expert of ``topk_ids`` (at most K entries) resident; returns their slot ids (padding,
        ``-1``, stays ``-1``). No host sync, so capturable, unless ``engines`` (``BlockCopier.copy``)."""
        wave = self.pager.page(0, topk_ids.reshape(-1), topk_ids.shape[-1])
        for group in range(len(self.copier.slots)):
            self.copier.copy(group, wave.missing, wave.victims, wave.count, engines=engines)
        return wave.pair_slot.view(topk_ids.shape).to(topk_ids.dtype)

    def plan(self, topk_ids: torch.Tensor) -> list[torch.Tensor]:
        """One step's waves: its distinct experts (on the device) in chunks of at most K, resident ones first
        (``DevicePager.plan_waves``: reads the routing and the resident set back once)."""
        self._steps += 1
        return [wave.to(self.device) for wave in self.pager.plan_waves(0, topk_ids)]

    def place(self, topk_ids: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        """Make the experts of ``wave`` resident; returns ``topk_ids`` as slot ids, entries outside it masked. The
        host reads the wave's copies back and runs them on the copy engines (this step has synchronised already,
        and they move a large step's experts ~5% faster than the copy kernel)."""
        return self.place_all(torch.where(torch.isin(topk_ids, wave), topk_ids, -1), engines=True)

    def drain(self) -> None:
        """Wait for the queued copies, which read the homes (before the homes are freed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
