"""DevicePager: its tables stay inverse maps, every wave ends resident, and its choices are LRU's / LFU's.

The pager runs on CPU tensors here (the same operations as on the GPU). Two references: a plain
Python pager with the documented tie rules (empty slots first, then the lowest rank, then the lower
slot), compared step by step; and, for waves of one object (no ties), an ``OrderedDict`` LRU.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from tiermem.errors import ConfigError
from tiermem.experts.grouped import wave_index as host_wave_index
from tiermem.experts.grouped import wave_rows
from tiermem.residency.device_pager import DevicePager, wave_index


class ReferencePager:
    """One group, in Python: the tie rules stated in the module docstring."""

    def __init__(self, slots: int, objects: int, policy: str, scores: np.ndarray | None = None) -> None:
        self.slot_object = [-1] * slots
        self.last_use = [0] * slots
        self.uses = [0] * objects
        self.objects, self.policy, self.clock = objects, policy, 0
        self.scores = scores  # int64 [objects, objects], fixed point (the pager's)

    def page(self, pairs: list[int], keep: list[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        valid = [p for p in pairs if 0 <= p < self.objects]
        needed = sorted(set(valid))
        kept = set(needed) | {k for k in keep if 0 <= k < self.objects}
        where = {o: s for s, o in enumerate(self.slot_object) if o >= 0}
        missed = [o for o in needed if o not in where]

        def rank(slot: int) -> float:
            held = self.slot_object[slot]
            if held < 0:
                return -1
            if held in kept:
                return float("inf")
            if self.policy == "predicted":
                return self.last_use[slot] + (int(sum(self.scores[o, held] for o in needed)) << 32)
            return self.last_use[slot] + (self.uses[held] << 32 if self.policy == "lfu" else 0)

        victims = sorted(range(len(self.slot_object)), key=lambda s: (rank(s), s))[:len(missed)]
        for obj, slot in zip(missed, victims):
            self.slot_object[slot] = obj
            where[obj] = slot
        self.clock += 1
        for obj in valid:
            self.last_use[where[obj]] = self.clock
            self.uses[obj] += 1
        return [where.get(p, -1) if 0 <= p < self.objects else -1 for p in pairs], list(zip(missed, victims))


def _copies(wave) -> list[tuple[int, int]]:
    count = int(wave.count)
    return list(zip(wave.missing[:count].tolist(), wave.victims[:count].tolist()))


def _table(rng: np.random.Generator, groups: int, objects: int) -> torch.Tensor:
    """A row-stochastic table per group, as a co-occurrence predictor's step table."""
    table = rng.random((groups, objects, objects)) ** 4
    return torch.from_numpy(table / table.sum(axis=2, keepdims=True))


@pytest.mark.parametrize("policy", ["lru", "lfu", "predicted"])
def test_pages_exactly_as_the_reference_and_keeps_both_maps_inverse(policy):
    rng = np.random.default_rng(0)
    slots, objects, pairs = 6, 20, 5
    pager = DevicePager(num_groups=2, slots_per_group=slots, objects_per_group=objects, device="cpu", policy=policy)
    reference = ReferencePager(slots, objects, policy)
    if policy == "predicted":
        pager.set_scores(_table(rng, 2, objects))
        reference.scores = pager.scores[1].numpy()
    hits, kept, previous = 0, 0, None
    for _ in range(300):
        wave = (rng.zipf(1.3, size=pairs) - 1).clip(max=objects + 3)  # skewed; some dropped (>= objects)
        wave[rng.random(pairs) < 0.1] = -1
        # keep the wave before's objects too, where both fit (as pipelined waves guarantee)
        keep = previous if previous is not None and len({*wave.tolist(), *previous.tolist()} - {-1}) <= slots \
            and rng.random() < 0.5 else None
        kept += keep is not None
        expected_slots, expected_copies = reference.page(wave.tolist(), () if keep is None else keep.tolist())
        result = pager.page(1, torch.from_numpy(wave), 1, keep=None if keep is None else torch.from_numpy(keep))
        previous = wave
        assert result.pair_slot.tolist() == expected_slots
        assert _copies(result) == expected_copies
        hits += len({p for p in wave.tolist() if 0 <= p < objects}) - len(expected_copies)
        table = pager.slot_object[1, :slots].tolist()
        assert table == reference.slot_object
        assert {o: s for s, o in enumerate(table) if o >= 0} == pager.resident(1)
    assert pager.resident(0) == {}  # the other group was never touched
    needed, loads = pager.stats()
    assert needed - int(loads.sum()) == hits > 0
    assert kept > 50


def test_a_wave_keeps_the_slots_of_the_wave_still_computing():
    pager = DevicePager(num_groups=1, slots_per_group=4, objects_per_group=9, device="cpu")
    pager.page(0, torch.tensor([0, 1, 2, 3]), 1)
    pager.page(0, torch.tensor([2, 3]), 1)  # 0 and 1 are now the least recent
    result = pager.page(0, torch.tensor([4, -1]), 1, keep=torch.tensor([0, 7]))  # 0 kept: 1 goes, not 0
    assert _copies(result) == [(4, 1)]
    assert pager.resident(0) == {0: 0, 4: 1, 2: 2, 3: 3}
    with pytest.raises(ConfigError, match="one entry per pair"):
        pager.page(0, torch.tensor([5]), 1, keep=torch.tensor([0, 1]))


def test_a_step_splits_into_waves_of_a_chosen_size():
    pager = DevicePager(num_groups=1, slots_per_group=4, objects_per_group=9, device="cpu")
    pager.page(0, torch.tensor([6]), 1)
    step = torch.tensor([3, 6, 1, 8, 3])  # ranks: 6 (resident), then 1 3 8
    wave_of_pair, waves = pager.split_waves(0, step, distinct_max=9, wave_objects=2)
    assert wave_of_pair.tolist() == [1, 0, 0, 1, 1] and waves == 3  # ceil(5 pairs / 2): the last wave is empty
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="give 1 to 4"):
            pager.split_waves(0, step, distinct_max=9, wave_objects=bad)


def test_single_object_waves_hit_exactly_as_an_lru_cache():
    rng = np.random.default_rng(1)
    pager = DevicePager(num_groups=1, slots_per_group=4, objects_per_group=12, device="cpu")
    lru: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for obj in rng.integers(0, 12, size=500).tolist():
        if obj in lru:
            hits += 1
            lru.move_to_end(obj)
        else:
            lru[obj] = None
            if len(lru) > 4:
                lru.popitem(last=False)
        pager.page(0, torch.tensor([obj]), 1)
    needed, loads = pager.stats()
    assert needed - int(loads.sum()) == hits
    assert set(pager.resident(0)) == set(lru)


def test_a_wave_never_evicts_an_object_it_needs():
    pager = DevicePager(num_groups=1, slots_per_group=3, objects_per_group=9, device="cpu")
    pager.page(0, torch.tensor([0, 1, 2]), 1)
    pager.page(0, torch.tensor([3]), 1)  # evicts the least recent of 0, 1, 2: slot 0 (the lower slot on a tie)
    result = pager.page(0, torch.tensor([1, 4, 1]), 1)  # 1 is resident and needed: 2 (older than 3) goes
    assert pager.resident(0) == {1: 1, 3: 0, 4: 2}
    assert result.pair_slot.tolist() == [1, 2, 1]
    assert _copies(result) == [(4, 2)]


def test_a_step_splits_into_waves_of_resident_objects_first_then_by_id():
    pager = DevicePager(num_groups=1, slots_per_group=3, objects_per_group=9, device="cpu")
    pager.page(0, torch.tensor([5, 7]), 1)
    step = torch.tensor([8, 1, 7, -1, 1, 3, 5, 9, 0])  # distinct 0 1 3 5 7 8; -1 and 9 (out of range) dropped
    wave_of_pair, waves = pager.split_waves(0, step, distinct_max=9)
    # ranks: 5 7 (resident), then 0 1 3 8 -> waves [5 7 0], [1 3 8]
    assert wave_of_pair.tolist() == [1, 1, 0, -1, 1, 1, 0, -1, 0]
    assert waves == 3  # static: ceil(min(9 pairs, 9 objects) / 3); the third wave is empty
    assert [w.tolist() for w in pager.plan_waves(0, step)] == [[5, 7, 0], [1, 3, 8]]  # read back: no empty wave
    assert [w.tolist() for w in pager.plan_waves(0, torch.tensor([-1, 9]))] == [[]]  # dropped pairs only
    for wave in range(waves):
        distinct = set(step[wave_of_pair == wave].tolist())
        assert len(distinct) <= 3
        pager.page(0, torch.where(wave_of_pair == wave, step, -1), 1)  # each wave fits: nothing it needs is evicted
    assert pager.split_waves(0, step[:6], distinct_max=4)[1] == 2  # the bound caps the count: ceil(4 / 3)


def test_counters_reset_and_restore_and_forget_empties_a_group():
    pager = DevicePager(num_groups=1, slots_per_group=2, objects_per_group=4, device="cpu")
    pager.page(0, torch.tensor([0, 1]), 1)
    saved = pager.save_counts()
    pager.page(0, torch.tensor([2, 3]), 1)
    assert pager.stats()[0] == 4
    pager.restore_counts(saved)
    assert pager.stats()[0] == 2 and int(pager.stats()[1].sum()) == 2
    assert pager.resident(0) == {2: 0, 3: 1}  # the tables are never restored: those copies happened
    pager.forget(0)
    assert pager.resident(0) == {}
    assert pager.page(0, torch.tensor([2]), 1).pair_slot.tolist() == [0] and int(pager.stats()[1].sum()) == 3
    pager.reset_stats()
    assert pager.stats()[0] == 0 and int(pager.stats()[1].sum()) == 0


def test_predicted_eviction_keeps_what_the_table_says_comes_next():
    pager = DevicePager(num_groups=1, slots_per_group=2, objects_per_group=4, device="cpu", policy="predicted")
    table = torch.zeros(1, 4, 4)
    table[0, 2, 0] = 1.0  # after 2 comes 0
    pager.set_scores(table)
    pager.page(0, torch.tensor([0]), 1)
    pager.page(0, torch.tensor([1]), 1)  # 0 is older, but an empty slot goes first
    pager.page(0, torch.tensor([2]), 1)  # LRU would evict 0; the table keeps it and evicts 1
    assert pager.resident(0) == {0: 0, 2: 1}
    with pytest.raises(ConfigError, match=r"must be \[1, 4, 4\]"):
        pager.set_scores(torch.zeros(1, 4, 3))
    with pytest.raises(ConfigError, match="serve the predicted policy"):
        DevicePager(num_groups=1, slots_per_group=2, objects_per_group=4, device="cpu").set_scores(table)


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "belady"}, "policy must be one of"),
    ({"slots_per_group": 0}, "at least one group, slot and object"),
])
def test_bad_configurations_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DevicePager(**{"num_groups": 1, "slots_per_group": 2, "objects_per_group": 4, "device": "cpu", **kwargs})


def test_the_device_wave_index_matches_the_host_counting_sort():
    rng = np.random.default_rng(2)
    for _ in range(50):
        slots, top_k = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        pair_slot = rng.integers(-1, slots, size=top_k * int(rng.integers(1, 6)))
        host = host_wave_index(wave_rows(pair_slot, np.arange(slots), slots), top_k)
        device = wave_index(torch.from_numpy(pair_slot), top_k, slots)
        valid = int((pair_slot >= 0).sum())
        n = len(pair_slot)
        assert torch.equal(device[:valid], host[:valid])  # the rows with a slot, in the same order
        assert torch.equal(device[n:n + valid], host[valid:2 * valid])  # their tokens
        assert torch.equal(device[2 * n:], host[2 * valid:])  # the slot offsets


KERNEL_SCRIPT = r"""
import numpy as np, torch
from tiermem.residency.device_pager import DevicePager
rng = np.random.default_rng(3)
for policy in ("lru", "lfu", "predicted"):
    for slots, objects, pairs, top_k in ((6, 20, 5, 1), (8, 12, 8, 4), (16, 60, 12, 4)):
        ops, kernel = (DevicePager(num_groups=2, slots_per_group=slots, objects_per_group=objects, device="cpu",
                                   policy=policy, kernel=k) for k in (False, True))
        if policy == "predicted":
            table = torch.from_numpy(rng.random((2, objects, objects)) ** 4)
            for pager in (ops, kernel):
                pager.set_scores(table / table.sum(dim=2, keepdim=True))
        previous = None
        for step in range(40):
            wave = torch.from_numpy((rng.zipf(1.3, size=pairs) - 1).clip(max=objects + 3))
            wave[torch.from_numpy(rng.random(pairs) < 0.1)] = -1
            wave = wave.to(ops.device)
            fits = previous is not None and len({o for o in wave.tolist() + previous.tolist() if 0 <= o < objects}) <= slots
            keep = previous if fits and step % 3 else None  # the wave before's objects, kept where both fit
            x, y = (pager.page(step % 2, wave, top_k, keep=keep) for pager in (ops, kernel))
            previous = wave
            n = int(x.count)
            assert int(y.count) == n and torch.equal(x.pair_slot, y.pair_slot) and torch.equal(x.index, y.index)
            assert torch.equal(x.missing[:n], y.missing[:n]) and torch.equal(x.victims[:n], y.victims[:n])
            for name in ("object_slot", "slot_object", "last_use", "uses", "loads"):  # the sentinel lanes aside
                assert torch.equal(getattr(ops, name)[:, :-1], getattr(kernel, name)[:, :-1]), (policy, step, name)
            assert int(ops.clock) == int(kernel.clock) and int(ops.needed) == int(kernel.needed)
print("ok")
"""


def test_the_paging_kernel_decides_and_writes_exactly_as_the_tensor_operations(run_script):
    """Run by Triton's interpreter on CPU tensors (skipped without Triton); the GPU test runs it compiled."""
    run_script(KERNEL_SCRIPT, interpret=True, timeout_s=300)


@pytest.mark.gpu
def test_the_compiled_paging_kernel_matches_the_tensor_operations_on_the_gpu(run_script):
    run_script(KERNEL_SCRIPT.replace('device="cpu"', 'device="cuda"'), interpret=False, timeout_s=300)
