"""``DevicePager``: the residency of every slot group as device tensors, paged with no host in the loop.

The host pager (``ExpertCache`` + ``Prefetcher``) reads each layer's routing back to the host, plans
there and issues one copy per miss: at decode batch 1 the host's few hundred microseconds per layer,
not the link, set the pace. This pager keeps the same state (which object sits in which slot, and
when each slot was last used) as tensors on the slots' device, and pages a wave with a fixed
sequence of tensor operations: no ``.item()``, no data-dependent shape, no synchronisation. A
layer's paging, copies and compute therefore queue back to back on one stream and can be captured
in a CUDA graph.

``page(group, objects, top_k)`` takes the wave's pairs (object ids within the group, ``-1`` or out
of range: a dropped pair) and returns each pair's slot, the copies to make (``missing[i]`` into
slot ``victims[i]`` for ``i < count``; ``count`` stays on the device) and the wave index that the
grouped compute reads (pairs in slot order, their tokens, slot end offsets). Eviction ranks slots
by a policy key (LRU: last use; LFU: use count, then last use; predicted: the object's score for
the group's next wave given this wave's distinct objects, a sum of rows of a table set by
``set_scores`` (e.g. P(j next step | i this step), a co-occurrence predictor's step table), then
last use); empty slots go first, ties go to the lower slot. On a GPU one Triton program (``page_kernel``) does all of it; elsewhere, or for
groups or waves wider than ``MAX_LANES``, about fifty tensor operations do the same (the reference
the kernel is tested against).

Invariants:
- ``object_slot`` and ``slot_object`` are inverse maps of each group (``-1``: none), exactly;
- after ``page``, every valid pair's object is in a slot (``pair_slot >= 0``), and no slot holding an
  object of the wave, or of ``keep``, was a victim; this needs the wave's distinct objects (plus
  ``keep``'s) to fit in the group, which the caller guarantees statically (``pairs <= slots_per_group``,
  or waves of at most half the group each keeping only the wave before);
- the tables say an object is resident as soon as its copy is queued: the copy runs on the stream
  that every later use of the slot runs on, so stream order makes that true for every reader;
- column ``N`` of ``object_slot`` / ``S`` of ``slot_object`` and ``last_use`` are sentinels that absorb
  the writes of unused lanes; they are never read as state.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from tiermem.errors import ConfigError

DEVICE_POLICIES = ("lru", "lfu", "predicted")
SCORE_SCALE = 1 << 20  # scores are fixed point: exact integer sums, so kernel and tensor operations agree bit for bit
KERNEL_MODULE = "tiermem.residency.page_kernel"  # imports Triton (the optional [gpu] extra): loaded on first use
MAX_LANES = 128  # the kernel's widest tile side: groups of more slots, or waves of more pairs, page by tensor ops
_NEVER = -1  # the rank of an empty slot: evicted before any used one
_KEEP = torch.iinfo(torch.int64).max  # the rank of a slot the wave needs: never a victim


@dataclass(frozen=True)
class PagedWave:
    """One wave's slots and copies, all on the device."""

    pair_slot: torch.Tensor  # int64 [P]: the slot of each pair within the group, -1 for a dropped pair
    missing: torch.Tensor  # int64 [M]: objects to copy in (the first ``count`` are real)
    victims: torch.Tensor  # int64 [M]: the slot each of them goes to
    count: torch.Tensor  # int64 [1]: how many copies to make
    index: torch.Tensor  # int64 [2P + S]: the pairs in slot order (stable), their tokens, each slot's end offset


class DevicePager:
    """Slot tables of ``num_groups`` groups of ``slots_per_group`` slots over ``objects_per_group`` objects."""

    def __init__(self, *, num_groups: int, slots_per_group: int, objects_per_group: int, device: torch.device,
                 policy: str = "lru", kernel: bool | None = None) -> None:
        if policy not in DEVICE_POLICIES:
            raise ConfigError(f"device pager: policy must be one of {DEVICE_POLICIES}, got {policy!r}")
        if min(num_groups, slots_per_group, objects_per_group) < 1:
            raise ConfigError(f"device pager: needs at least one group, slot and object; got {num_groups} group(s) "
                              f"of {slots_per_group} slot(s) over {objects_per_group} object(s)")
        self.num_groups, self.slots_per_group, self.objects_per_group = num_groups, slots_per_group, objects_per_group
        self.policy = policy
        self.device = torch.device(device)
        # one Triton program per wave where it can run; ``kernel=True`` forces it (tests, Triton's interpreter)
        self.kernel = kernel if kernel is not None else (
            self.device.type == "cuda" and slots_per_group <= MAX_LANES and importlib.util.find_spec("triton") is not None)
        groups, slots, objects = num_groups, slots_per_group, objects_per_group
        self.object_slot = torch.full((groups, objects + 1), -1, dtype=torch.int64, device=self.device)
        self.slot_object = torch.full((groups, slots + 1), -1, dtype=torch.int64, device=self.device)
        self.last_use = torch.zeros((groups, slots + 1), dtype=torch.int64, device=self.device)
        self.uses = torch.zeros((groups, objects + 1), dtype=torch.int64, device=self.device)
        self.scores = torch.zeros((groups, objects, objects) if policy == "predicted" else (1, 1, 1),
                                  dtype=torch.int64, device=self.device)
        self.clock = torch.zeros((), dtype=torch.int64, device=self.device)
        self.needed = torch.zeros((), dtype=torch.int64, device=self.device)  # distinct objects the waves needed
        self.loads = torch.zeros((groups, objects + 1), dtype=torch.int64, device=self.device)  # copies in, per object
        self._none = torch.tensor(-1, dtype=torch.int64, device=self.device)
        self._real = torch.ones(objects + 1, dtype=torch.bool, device=self.device)  # False for the sentinel lane
        self._real[objects] = False  # (a host scalar written here, never inside a captured wave)

    def page(self, group: int, objects: torch.Tensor, top_k: int, *, keep: torch.Tensor | None = None) -> PagedWave:
        """Give every pair of ``objects`` (int ``[P]``, ids within ``group``; pair ``i`` is token ``i // top_k``'s)
        a slot; see the module docstring. ``keep`` (int ``[P]``, ids as ``objects``): objects whose slots must not
        be victims either (a wave still computing while this one's copies run: pipelined waves, ``device_layer``)."""
        pairs = objects.reshape(-1).to(device=self.device, dtype=torch.int64)
        kept = pairs if keep is None else keep.reshape(-1).to(device=self.device, dtype=torch.int64)
        if kept.numel() != pairs.numel():
            raise ConfigError(f"device pager: keep lists {kept.numel()} pair(s) for a wave of {pairs.numel()}; give "
                              "one entry per pair (-1 for none)")
        if self.kernel and pairs.numel() <= MAX_LANES:
            return self._page_kernel(group, pairs, kept, top_k)
        slots, count = self.slots_per_group, self.objects_per_group
        obj = torch.where((pairs >= 0) & (pairs < count), pairs, count)
        need = torch.zeros(count + 1, dtype=torch.bool, device=self.device).index_fill_(0, obj, True) & self._real
        held_back = need if keep is None else need.index_fill(  # needed now, or by the wave still computing
            0, torch.where((kept >= 0) & (kept < count), kept, count), True) & self._real
        object_slot, slot_object, last_use = self.object_slot[group], self.slot_object[group], self.last_use[group]
        held = slot_object[:slots]
        missed = need[:count] & (object_slot[:count] < 0)
        num_missed = missed.sum()
        rank = last_use[:slots]
        if self.policy == "lfu":
            rank = (self.uses[group][held.clamp(min=0)] << 32) + rank
        elif self.policy == "predicted":
            score = (self.scores[group] * need[:count].unsqueeze(1)).sum(0)  # [N]: rows of the wave's objects
            rank = (score[held.clamp(min=0)] << 32) + rank
        rank = torch.where(held < 0, _NEVER, rank)
        rank = torch.where(held_back[torch.where(held >= 0, held, count)], _KEEP, rank)
        lanes = min(pairs.numel(), slots, count)
        victims = torch.argsort(rank, stable=True)[:lanes]
        missing = torch.argsort((~missed).to(torch.int8), stable=True)[:lanes]  # missed objects first, ascending
        take = torch.arange(lanes, device=self.device) < num_missed
        evicted = held[victims]
        object_slot.index_put_((torch.where(take & (evicted >= 0), evicted, count),), self._none)
        object_slot.index_put_((torch.where(take, missing, count),), torch.where(take, victims, -1))
        slot_object.index_put_((torch.where(take, victims, slots),), torch.where(take, missing, -1))
        self.clock += 1
        pair_slot = object_slot[obj]
        last_use.index_put_((torch.where(pair_slot >= 0, pair_slot, slots),), self.clock.expand(pair_slot.numel()))
        if self.policy == "lfu":
            self.uses[group].index_add_(0, obj, torch.ones_like(obj))
        self.needed += need.sum()
        self.loads[group].index_add_(0, torch.where(take, missing, count), torch.ones_like(missing))
        return PagedWave(pair_slot, missing, victims, num_missed.reshape(1), wave_index(pair_slot, top_k, slots))

    def split_waves(self, group: int, objects: torch.Tensor, *, distinct_max: int,
                    wave_objects: int | None = None) -> tuple[torch.Tensor, int]:
        """Split a step into waves that ``page`` can take, decided on the device (no host sync, so capturable): the
        step's distinct objects ranked resident ones first, then by id, wave ``w`` taking ranks ``[w W, (w + 1) W)``
        for ``W = wave_objects`` (default: the group's slots, for a step with more pairs than slots; at most half of
        them for waves that page while the one before computes). ``objects`` as for ``page``; ``distinct_max``
        bounds the step's distinct objects (e.g. a layer's experts). Returns each pair's wave (``-1``: dropped) and
        the static wave count ``ceil(min(pairs, distinct_max) / W)``; waves past the step's last are empty."""
        slots, count = self.slots_per_group, self.objects_per_group
        per_wave = slots if wave_objects is None else wave_objects
        if not 1 <= per_wave <= slots:
            raise ConfigError(f"device pager: waves of {per_wave} object(s) in a group of {slots} slot(s); give 1 to "
                              f"{slots}")
        pairs = objects.reshape(-1).to(device=self.device, dtype=torch.int64)
        valid = (pairs >= 0) & (pairs < count)
        obj = torch.where(valid, pairs, count)
        need = torch.zeros(count + 1, dtype=torch.bool, device=self.device).index_fill_(0, obj, True)
        ids = torch.arange(count, device=self.device)
        key = torch.where(need[:count], torch.where(self.object_slot[group, :count] >= 0, ids, ids + count), 2 * count)
        rank = torch.empty_like(ids).scatter_(0, torch.argsort(key), ids)
        wave_of_pair = torch.where(valid, rank[obj.clamp(max=count - 1)] // per_wave, -1)
        return wave_of_pair, -(-min(pairs.numel(), distinct_max, count) // per_wave)

    def plan_waves(self, group: int, objects: torch.Tensor) -> list[torch.Tensor]:
        """``split_waves`` with the host in the loop, for a step that synchronises anyway (a prefill): reads the
        step's objects (as for ``page``) and which of them are resident back once and returns exactly the waves it
        needs, each its distinct objects (on the host, ``objects``' dtype) in ``split_waves``' order; one empty
        wave for a step of dropped pairs only."""
        on_host = objects.reshape(-1).cpu()
        distinct = torch.unique(on_host[(on_host >= 0) & (on_host < self.objects_per_group)])
        resident = self.object_slot[group, distinct.to(self.device)].cpu() >= 0
        return list(torch.cat([distinct[resident], distinct[~resident]]).split(self.slots_per_group))

    def _page_kernel(self, group: int, pairs: torch.Tensor, kept: torch.Tensor, top_k: int) -> PagedWave:
        """``page`` as one Triton program (``page_kernel``): the same decisions and writes."""
        num_pairs, slots = pairs.numel(), self.slots_per_group
        lanes = min(num_pairs, slots, self.objects_per_group)
        out = torch.empty(num_pairs + 2 * lanes + 1 + 2 * num_pairs + slots, dtype=torch.int64, device=self.device)
        pair_slot, missing, victims, count, index = out.split([num_pairs, lanes, lanes, 1, 2 * num_pairs + slots])
        scores = self.scores[group if self.policy == "predicted" else 0]
        _kernel()[(1,)](pairs, kept, num_pairs, self.object_slot[group], self.slot_object[group], self.last_use[group],
                        self.uses[group], scores, self.clock, self.needed, self.loads[group], pair_slot, missing, victims,
                        count, index, self.objects_per_group, slots, top_k, LFU=self.policy == "lfu",
                        PREDICTED=self.policy == "predicted",
                        PAIRS=_lanes(num_pairs), SLOTS=_lanes(slots), num_warps=4)
        return PagedWave(pair_slot, missing, victims, count, index)

    def set_scores(self, table: torch.Tensor | np.ndarray) -> None:
        """The predicted policy's table ``[G, N, N]`` (float, rows of at most 1 each): ``table[g, i, j]`` scores
        object ``j`` of group ``g`` for the next wave when ``i`` is in this one; copied in place, so captured
        waves read the new table."""
        if self.policy != "predicted":
            raise ConfigError(f"device pager: scores serve the predicted policy; this pager evicts by {self.policy}")
        expected = (self.num_groups, self.objects_per_group, self.objects_per_group)
        if tuple(table.shape) != expected:
            raise ConfigError(f"device pager: a score table must be {list(expected)} (groups, objects, objects); got "
                              f"{list(table.shape)}")
        fixed = (torch.as_tensor(table).to(torch.float64).clamp(0.0, 1.0) * SCORE_SCALE).round().to(torch.int64)
        self.scores.copy_(fixed)

    def resident(self, group: int) -> dict[int, int]:
        """Object -> slot of ``group`` (reads the device: for tests and reports, not the decode path)."""
        table = self.object_slot[group, :self.objects_per_group].cpu()
        return {int(o): int(s) for o, s in enumerate(table.tolist()) if s >= 0}

    def stats(self) -> tuple[int, torch.Tensor]:
        """Distinct objects the waves needed since the last reset, and the copies in per object ``[G, N]``
        (on the host; reads the device)."""
        return int(self.needed), self.loads[:, :self.objects_per_group].cpu()

    def save_counts(self) -> tuple[torch.Tensor, ...]:
        """A copy of the counters and LFU use counts, for ``restore_counts`` after waves that should not count
        (a graph's warm-up). Slot tables are never restored: the warm-up's copies really happened."""
        return self.needed.clone(), self.loads.clone(), self.uses.clone()

    def restore_counts(self, saved: tuple[torch.Tensor, ...]) -> None:
        for tensor, value in zip((self.needed, self.loads, self.uses), saved):
            tensor.copy_(value)

    def forget(self, group: int) -> None:
        """Mark every slot of ``group`` empty (its bytes stay, unused; later waves copy in again)."""
        self.object_slot[group].fill_(-1)
        self.slot_object[group].fill_(-1)
        self.last_use[group].zero_()

    def reset_stats(self) -> None:
        self.needed.zero_()
        self.loads.zero_()


def wave_index(pair_slot: torch.Tensor, top_k: int, num_slots: int) -> torch.Tensor:
    """The pairs in slot order (a stable sort; ``-1``, dropped, after every slot's), their tokens (``pair //
    top_k``) and each slot's end offset, as one int64 tensor ``[2P + S]``: static shapes, no synchronisation."""
    key = torch.where(pair_slot >= 0, pair_slot, num_slots)
    pairs = torch.argsort(key, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=key.device).index_add_(0, key, torch.ones_like(key))
    return torch.cat([pairs, torch.div(pairs, top_k, rounding_mode="floor"), counts[:num_slots].cumsum(0)])


def _lanes(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # a power of two tile side (Triton), at least 16


@functools.cache
def _kernel():
    try:
        return importlib.import_module(KERNEL_MODULE).page_kernel
    except ImportError:
        raise ConfigError("device pager: Triton is not installed; install tiermem[gpu], or pass kernel=False to page "
                          "by tensor operations") from None
