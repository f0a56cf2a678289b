"""DeviceLayerPager: one layer's residency decided on the device, on a CPU and in a CUDA graph (no sglang needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import HIDDEN, NUM_EXPERTS, REGISTERED_CXL, TOP_K, expert_weights, filled_store, slot_tensors
from tiermem.errors import ConfigError
from tiermem.manager import TierManager

from tiermem_sglang.device import DeviceLayerPager

LAYER = 2
NUM_SLOTS = 4


def build(manager, experts, device: str = "cpu") -> DeviceLayerPager:
    pager = DeviceLayerPager(store=filled_store(manager, experts, LAYER), layer=LAYER,
                             slots=slot_tensors(NUM_SLOTS, device))
    pager.fill()
    return pager


def assert_slots_hold(pager: DeviceLayerPager, experts) -> None:
    for expert, slot in pager.pager.resident(0).items():
        for name in ("gate_up", "down"):
            assert torch.equal(pager.slots[name][slot].cpu(), experts[expert][name]), (expert, slot, name)


@pytest.fixture
def experts():
    return expert_weights()


@pytest.fixture
def pager(manager, experts):
    pager = build(manager, experts)
    yield pager
    pager.store.close()


def test_fill_starts_with_the_first_k_experts_in_their_slots_and_counts_nothing(pager, experts):
    assert {e: pager.slot_of(e) for e in pager.resident_experts()} == {e: e for e in range(NUM_SLOTS)}
    assert_slots_hold(pager, experts)
    stats = pager.stats
    assert (stats.steps, stats.waves, stats.hits, stats.misses) == (0, 0, 0, 0)


def test_one_wave_maps_each_entry_to_its_slot_and_lands_the_home_bytes(pager, experts):
    topk_ids = torch.tensor([[5, 1], [-1, 6]], dtype=torch.int32)
    waves = pager.device_waves(topk_ids)
    assert len(waves) == 1 and waves[0] is topk_ids  # 4 entries fit the 4 slots
    slots = pager.place_all(topk_ids)
    assert slots.dtype == torch.int32 and slots[1, 0] == -1  # padding stays masked
    resident = pager.pager.resident(0)
    assert [[resident.get(int(e), -1) for e in row] for row in topk_ids] == slots.tolist()
    assert_slots_hold(pager, experts)
    stats = pager.stats
    assert (stats.steps, stats.waves, stats.hits, stats.misses) == (1, 1, 1, 2)
    assert stats.bytes_loaded == 2 * pager.store.layout.payload_bytes


def test_a_large_step_is_planned_in_waves_of_at_most_k_resident_experts_first(pager, experts):
    topk_ids = torch.tensor([[7, 1], [5, 0], [6, 4], [1, 7]])
    waves = pager.plan(topk_ids)
    assert [w.tolist() for w in waves] == [[0, 1, 4, 5], [6, 7]]
    covered = torch.full_like(topk_ids, -1)
    for wave in waves:
        slots = pager.place(topk_ids, wave)
        inside = torch.isin(topk_ids, wave)
        assert bool((slots[~inside] == -1).all()) and bool((slots[inside] >= 0).all())
        resident = pager.pager.resident(0)
        assert all(resident[int(e)] == int(s) for e, s in zip(topk_ids[inside], slots[inside]))
        assert_slots_hold(pager, experts)
        covered = torch.where(inside, topk_ids, covered)
    assert torch.equal(covered, topk_ids)
    stats = pager.stats
    assert (stats.steps, stats.waves) == (1, 2) and stats.hits + stats.misses == 6
    assert [w.tolist() for w in pager.plan(torch.full((2, TOP_K), -1))] == [[]]  # all padding: one empty wave


def test_a_large_decode_step_splits_on_the_device_into_the_planned_waves(manager, experts):
    topk_ids = torch.tensor([[7, 1], [5, 0], [6, 4], [1, 7]])
    planned, device = build(manager, experts), build(manager, experts)
    assert device.on_device(topk_ids) and not DeviceLayerPager(
        store=device.store, layer=LAYER, slots=slot_tensors(NUM_SLOTS), waves_max_tokens=3).on_device(topk_ids)
    waves = device.device_waves(topk_ids)
    assert len(waves) == 2  # static: ceil(min(8 entries, 8 experts) / 4 slots)
    for wave, ids in zip(planned.plan(topk_ids), waves):  # the same waves, resident experts first
        assert torch.equal(torch.where(torch.isin(topk_ids, wave), topk_ids, -1), ids)
        assert torch.equal(planned.place(topk_ids, wave), device.place_all(ids))
        assert_slots_hold(device, experts)
    assert dataclasses.astuple(planned.stats) == dataclasses.astuple(device.stats)
    assert (device.stats.steps, device.stats.waves) == (1, 2)
    repeated = torch.tensor([[0, 1], [0, 1], [1, 0]])  # 6 entries, 2 distinct: the second of 2 waves is empty
    waves = device.device_waves(repeated)
    assert len(waves) == 2 and torch.equal(waves[0], repeated) and bool((waves[1] == -1).all())
    for ids in waves:
        device.place_all(ids)
    assert (device.stats.steps, device.stats.waves) == (2, 4)
    for pager in (planned, device):
        pager.store.close()


def test_the_predicted_policy_keeps_the_experts_the_step_table_expects_next(manager, experts):
    pager = DeviceLayerPager(store=filled_store(manager, experts, LAYER), layer=LAYER,
                             slots=slot_tensors(NUM_SLOTS), policy="predicted")
    pager.fill()  # experts 0..3, used together: LRU would evict the lowest slot, expert 0
    table = np.zeros((NUM_EXPERTS, NUM_EXPERTS), dtype=np.float32)
    table[5, 0] = 0.9  # after expert 5, expert 0 comes next
    pager.set_step_table(table)
    pager.place_all(torch.tensor([[5]]))
    assert pager.resident_experts() == {0, 2, 3, 5}  # expert 1 made way, not expert 0
    with pytest.raises(ConfigError, match=r"step table is \[4, 4\]; its 8 experts need \[8, 8\]"):
        pager.set_step_table(np.zeros((4, 4), dtype=np.float32))
    pager.store.close()


def test_slot_tensors_must_match_the_home_layout(manager, experts):
    store = filled_store(manager, experts, LAYER)
    wrong = {**slot_tensors(NUM_SLOTS), "down": torch.zeros(NUM_SLOTS, HIDDEN, 3)}
    with pytest.raises(ConfigError, match="slot tensor down"):
        DeviceLayerPager(store=store, layer=LAYER, slots=wrong)
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_wave_pages_each_replay_for_its_own_routing(experts):
    with TierManager.from_config(REGISTERED_CXL) as manager:
        pager = build(manager, experts, device="cuda")
        static = torch.zeros((1, TOP_K), dtype=torch.int32, device="cuda")
        pager.place_all(static)  # warm-up: compiles the kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            slots = pager.place_all(static)
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            ids = torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K].to(torch.int32)
            static.copy_(ids.unsqueeze(0))
            graph.replay()
            torch.cuda.synchronize()
            resident = pager.pager.resident(0)
            assert slots.cpu().tolist()[0] == [resident[int(e)] for e in ids]
            assert_slots_hold(pager, experts)
        assert pager.stats.waves == 21  # the warm-up and every replay; the capture itself ran nothing
        pager.drain()
        pager.store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_device_waves_page_each_replay_as_the_planned_waves_do(experts):
    with TierManager.from_config(REGISTERED_CXL) as manager:
        device, planned = build(manager, experts, device="cuda"), build(manager, experts, device="cuda")
        static = torch.zeros((4, TOP_K), dtype=torch.int32, device="cuda")  # 8 entries for 4 slots
        for ids in device.device_waves(static):  # warm-up: compiles the kernels
            device.place_all(ids)
        for wave in planned.plan(static):
            planned.place(static, wave)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            slots = [device.place_all(ids) for ids in device.device_waves(static)]
        generator = torch.Generator().manual_seed(1)
        for _ in range(20):
            ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K] for _ in range(4)])
            static.copy_(ids)
            graph.replay()
            expected = [planned.place(static, wave) for wave in planned.plan(static)]
            torch.cuda.synchronize()
            assert device.pager.resident(0) == planned.pager.resident(0)
            for wave, got in enumerate(slots):  # the planned waves, then (static count) empty ones
                want = expected[wave].cpu() if wave < len(expected) else torch.full((4, TOP_K), -1)
                assert torch.equal(got.cpu(), want.to(got.dtype)), wave
            assert_slots_hold(device, experts)
        got, want = device.stats, planned.stats
        assert got.steps == 21 and (got.steps, got.hits, got.misses) == (want.steps, want.hits, want.misses)
        assert got.waves == 2 * 21 >= want.waves  # the device counts its empty waves too
        for pager in (device, planned):
            pager.drain()
            pager.store.close()
