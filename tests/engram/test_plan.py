"""Fetch planning: de-duplication equals torch.unique, and cache hits are exact and counted."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.engram.cache import HotRowCache
from tiermem.engram.plan import deduplicate, plan_fetch
from tiermem.engram.table import EngramTable, TableLayout
from tiermem.errors import CapacityError, TransferError

ROWS = 50
DIM = 4
CACHED_ROWS = (3, 7, 8, 20, 49)

index_lists = st.lists(st.integers(min_value=0, max_value=ROWS - 1), min_size=1, max_size=64)


@given(index_lists)
@settings(max_examples=60, deadline=None)
def test_deduplicate_equals_torch_unique_with_inverse(values):
    indices = torch.tensor(values)
    dedup = deduplicate(indices)
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    count = int(dedup.count)
    assert count == unique.numel()
    assert torch.equal(dedup.unique[:count], unique)
    assert torch.equal(dedup.inverse, inverse)
    assert torch.equal(dedup.unique[dedup.inverse], indices)


@given(index_lists)
@settings(max_examples=60, deadline=None)
def test_plan_fetches_each_missing_row_once_and_rebuilds_every_request(values):
    table = EngramTable.filled(TableLayout(ROWS, DIM), seed=4)
    cache = HotRowCache(table, torch.tensor(CACHED_ROWS), "cpu")
    indices = torch.tensor(values)
    plan = plan_fetch(indices, cache)
    count = int(plan.fetch_count)
    fetched_ids = plan.fetch_ids[:count].tolist()
    assert sorted(fetched_ids) == sorted(set(values) - set(CACHED_ROWS))
    assert int(plan.distinct_rows) == len(set(values))
    assert int(plan.hit_rows) == len(set(values) & set(CACHED_ROWS))
    fetched = table.storage[plan.fetch_ids]
    rebuilt = torch.where(plan.request_hit[:, None], cache.rows[plan.request_slot], fetched[plan.request_rank])
    assert torch.equal(rebuilt, table.storage[indices])


def test_cache_built_from_observed_indices_keeps_the_most_frequent_rows():
    table = EngramTable.filled(TableLayout(ROWS, DIM))
    observed = torch.tensor([5] * 9 + [6] * 7 + [7] * 3 + [1, 2, 3])
    cache = HotRowCache.from_observed(table, observed, capacity_rows=2, device="cpu")
    assert cache.ids.tolist() == [5, 6]
    assert torch.equal(cache.rows, table.storage[[5, 6]])


def test_cache_counters_measure_hits_over_distinct_rows():
    table = EngramTable.filled(TableLayout(ROWS, DIM))
    cache = HotRowCache(table, torch.tensor([1, 2]), "cpu")
    for batch in ([1, 1, 3], [2, 4, 5, 6]):
        plan = plan_fetch(torch.tensor(batch), cache)
        cache.record(plan.distinct_rows, plan.hit_rows)
    stats = cache.stats()
    assert (stats.probed_rows, stats.hit_rows) == (6, 2)
    assert stats.hit_rate == pytest.approx(2 / 6)


def test_cache_refuses_no_rows_and_rows_outside_the_table():
    table = EngramTable.filled(TableLayout(ROWS, DIM))
    with pytest.raises(CapacityError):
        HotRowCache.from_observed(table, torch.tensor([1]), capacity_rows=0, device="cpu")
    with pytest.raises(TransferError):
        HotRowCache(table, torch.tensor([ROWS]), "cpu")


def test_cache_from_counts_skips_rows_never_looked_up_and_breaks_ties_by_row_id():
    table = EngramTable.filled(TableLayout(ROWS, DIM))
    counts = torch.zeros(ROWS, dtype=torch.int64)
    counts[[4, 9, 30]] = torch.tensor([2, 5, 2])
    assert HotRowCache.from_counts(table, counts, capacity_rows=2, device="cpu").ids.tolist() == [4, 9]
    cache = HotRowCache.from_counts(table, counts, capacity_rows=10, device="cpu")
    assert cache.ids.tolist() == [4, 9, 30]
    assert cache.nbytes == 3 * table.layout.row_bytes + cache.row_map.nbytes + 2 * 8


def test_cache_probe_finds_each_cached_row_in_its_slot_and_nothing_else():
    table = EngramTable.filled(TableLayout(ROWS, DIM), seed=2)
    cache = HotRowCache(table, torch.tensor(CACHED_ROWS), "cpu")
    unique = torch.arange(ROWS)
    hit, slot = cache.probe(unique, unique != CACHED_ROWS[0])
    assert torch.nonzero(hit).reshape(-1).tolist() == list(CACHED_ROWS[1:])
    assert torch.equal(cache.rows[slot[hit]], table.storage[unique[hit]])
