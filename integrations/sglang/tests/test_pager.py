"""LayerPager: waves, residency and copies of one layer's experts, on a CPU (no sglang needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, INTERMEDIATE, REGISTERED_CXL, expert_weights, filled_store, slot_tensors
from tiermem.errors import ConfigError
from tiermem.manager import TierManager

from tiermem_sglang.pager import LayerPager, plan_waves

LAYER = 3
NUM_SLOTS = 3


@pytest.fixture
def experts():
    return expert_weights()


@pytest.fixture
def pager(manager, experts):
    store = filled_store(manager, experts, LAYER)
    pager = LayerPager(manager=manager, store=store, layer=LAYER, slots=slot_tensors(NUM_SLOTS))
    pager.fill()
    yield pager
    store.close()


def assert_slots_hold(pager: LayerPager, experts) -> None:
    for expert in pager.resident_experts():
        slot = pager.slot_of(expert)
        for name in ("gate_up", "down"):
            assert torch.equal(pager.slots[name][slot], experts[expert][name]), (expert, slot, name)


def test_waves_put_resident_experts_first_and_never_exceed_the_slots():
    waves = plan_waves([7, 1, 5, 0, 2], resident={0, 2}, num_slots=2)
    assert waves == [[0, 2], [7, 1], [5]]
    assert plan_waves([], resident={0}, num_slots=2) == [[]]


def test_fill_starts_with_the_first_k_experts_in_their_slots(pager, experts):
    assert pager.resident_experts() == set(range(NUM_SLOTS))
    assert [pager.slot_of(e) for e in range(NUM_SLOTS)] == list(range(NUM_SLOTS))
    assert_slots_hold(pager, experts)


def test_every_wave_lands_the_home_bytes_of_its_experts_in_their_slots(pager, experts):
    for wave in ([5, 6], [0, 7, 4], [1], [6, 2, 3]):
        placed = pager.make_resident(wave)
        assert sorted(placed) == sorted(wave)
        assert len(set(placed.values())) == len(wave)
        assert_slots_hold(pager, experts)


def test_lru_evicts_the_least_recently_used_expert(pager):
    pager.make_resident([0])
    pager.make_resident([1])
    pager.make_resident([5])  # experts 0, 1 were used; 2 was not since fill
    assert pager.resident_experts() == {0, 1, 5}
    pager.make_resident([6])
    assert pager.resident_experts() == {1, 5, 6}


def test_hits_and_misses_are_counted_per_needed_expert(pager):
    pager.make_resident([0, 1, 4])
    assert (pager.stats.hits, pager.stats.misses) == (2, 1)
    assert pager.stats.bytes_loaded == pager.store.layout.payload_bytes


def test_prefetched_experts_are_hits_of_the_next_wave_and_hold_their_bytes(pager, experts):
    started = pager.prefetch({6: 0.9, 7: 0.8, 0: 0.1}, max_experts=2)
    assert started == 2
    placed = pager.make_resident([6, 7])
    assert sorted(placed) == [6, 7]
    assert (pager.stats.prefetch_hits, pager.stats.misses) == (2, 0)
    assert_slots_hold(pager, experts)


def test_a_full_wave_waits_for_and_evicts_prefetches_it_does_not_need(experts):
    slow = {"tiers": [{"kind": "sim", "capacity_bytes": "8MiB", "arena_bytes": "1MiB", "bandwidth_gbps": 1e-4,
                       "register_cuda": "never"}]}  # 100 kB/s: the prefetches are still in flight at the next wave
    with TierManager.from_config(slow) as manager:
        store = filled_store(manager, experts, LAYER, tier="sim")
        pager = LayerPager(manager=manager, store=store, layer=LAYER, slots=slot_tensors(NUM_SLOTS))
        pager.make_resident([0])
        assert pager.prefetch({6: 0.9, 7: 0.8}, max_experts=2) == 2
        placed = pager.make_resident([0, 1, 2])  # needs all 3 slots; 6 and 7 were loaded for nothing
        assert sorted(placed) == [0, 1, 2] and pager.resident_experts() == {0, 1, 2}
        assert_slots_hold(pager, experts)
        store.close()


def test_prefetch_never_displaces_a_better_scored_resident_expert(pager):
    started = pager.prefetch({0: 0.9, 1: 0.9, 2: 0.9, 5: 0.5}, max_experts=1)
    assert started == 0
    assert pager.resident_experts() == {0, 1, 2}


def test_a_wave_larger_than_the_slots_is_refused(pager):
    with pytest.raises(ConfigError, match="exceeds the 3 slots"):
        pager.make_resident([0, 1, 2, 3])


def test_slot_tensors_must_match_the_home_layout(manager, experts):
    store = filled_store(manager, experts, LAYER)
    wrong = {**slot_tensors(NUM_SLOTS),
             "gate_up": torch.zeros(NUM_SLOTS, 2 * INTERMEDIATE, HIDDEN, dtype=torch.bfloat16)}
    with pytest.raises(ConfigError, match="slot tensor gate_up"):
        LayerPager(manager=manager, store=store, layer=LAYER, slots=wrong)
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_waves_land_in_gpu_slots_from_registered_host_memory(experts):
    with TierManager.from_config(REGISTERED_CXL) as manager:
        store = filled_store(manager, experts, LAYER)
        slots = slot_tensors(NUM_SLOTS, device="cuda")
        pager = LayerPager(manager=manager, store=store, layer=LAYER, slots=slots)
        pager.fill()
        pager.prefetch({7: 1.0}, max_experts=1)
        for wave in ([5, 6], [7, 0, 4], [1, 2]):
            placed = pager.make_resident(wave)
            torch.cuda.current_stream().synchronize()
            for expert, slot in placed.items():
                assert torch.equal(slots["gate_up"][slot].cpu(), experts[expert]["gate_up"])
                assert torch.equal(slots["down"][slot].cpu(), experts[expert]["down"])
        pager.drain()
        store.close()
