"""The cache's row map: every key finds its slot, absent keys find none, within the recorded probe bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.engram.rowmap import EMPTY_KEY, MAX_KEY, RowMap, home
from tiermem.errors import CapacityError

KEY_SPACE = 5_000
key_sets = st.sets(st.integers(min_value=0, max_value=KEY_SPACE - 1), min_size=1, max_size=400)


@given(key_sets)
@settings(max_examples=60, deadline=None)
def test_every_key_finds_its_slot_and_no_other_key_finds_one(keys):
    keys = torch.tensor(sorted(keys))[torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))]
    row_map = RowMap.build(keys)
    others = torch.tensor(sorted(set(range(KEY_SPACE)) - set(keys.tolist())) + [-5, MAX_KEY])
    for find in (row_map.find, row_map.find_fixed):  # host (early exit) and device (fixed work) probes
        assert torch.equal(find(keys), torch.arange(keys.numel()))
        assert bool((find(others) == EMPTY_KEY).all())


def test_map_is_a_power_of_two_at_least_twice_the_keys_with_one_entry_per_key():
    keys = torch.arange(0, 3000, 3)
    row_map = RowMap.build(keys)
    assert row_map.size == 2048 and row_map.size >= 2 * keys.numel()
    used = row_map.entries[:, 0] != EMPTY_KEY
    assert int(used.sum()) == keys.numel()
    assert torch.equal(torch.sort(row_map.entries[used, 0].long()).values, keys)
    assert row_map.nbytes == 2048 * 2 * 4
    packed = row_map.packed()  # what the fused kernel reads: (slot << 32) | key, one int64 per entry
    assert torch.equal((packed << 32) >> 32, row_map.entries[:, 0].long())
    assert torch.equal(packed >> 32, row_map.entries[:, 1].long())


def test_every_key_sits_within_max_probes_of_its_home_behind_occupied_entries():
    keys = torch.randperm(1 << 20, generator=torch.Generator().manual_seed(1))[:5000]
    row_map = RowMap.build(keys)
    slot_of_position = row_map.entries[:, 1].long()
    position = torch.empty(keys.numel(), dtype=torch.int64)
    used = slot_of_position != EMPTY_KEY
    position[slot_of_position[used]] = torch.nonzero(used).reshape(-1)
    distance = (position - home(keys, row_map.bits)) % row_map.size
    assert int(distance.max()) == row_map.max_probes - 1
    for key_index in torch.argsort(distance, descending=True)[:20].tolist():
        start = int(home(keys[key_index:key_index + 1], row_map.bits))
        for step in range(int(distance[key_index])):
            assert row_map.entries[(start + step) % row_map.size, 0] != EMPTY_KEY


def test_home_positions_spread_over_the_whole_map():
    bits = 12
    positions = home(torch.arange(1 << bits), bits)
    assert int(positions.min()) >= 0 and int(positions.max()) < 1 << bits
    assert torch.unique(positions).numel() > 0.6 * (1 << bits)


@pytest.mark.parametrize("keys", [[], [1, 1], [-1], [MAX_KEY + 1]])
def test_build_refuses_empty_duplicate_negative_or_too_large_keys(keys):
    with pytest.raises(CapacityError, match="row map"):
        RowMap.build(torch.tensor(keys, dtype=torch.int64))
