"""The lookup path: a host-tier table gives the resident table's rows bit for bit, with measured counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tiermem.engram import (
    EngramHashConfig,
    EngramLookup,
    EngramLookupConfig,
    EngramTable,
    GatherMethod,
    HotRowCache,
    NgramHasher,
    RowFormat,
    TableLayout,
)
from tiermem.engram.gather import uva_gather
from tiermem.errors import CapacityError, ConfigError, TransferError

HASH = EngramHashConfig(vocab_size=300, layer_ids=(2, 5), rows_per_head=(101, 127), heads_per_order=4)
DIM = {RowFormat.BF16: 80, RowFormat.FP8_E4M3: 256}
BATCH = 6
WINDOW = 7
STAGED = EngramLookupConfig(method=GatherMethod.STAGED)


def build_tables(hasher, row_format, storage_for=lambda layer, layout: None):
    tables = {}
    for layer in HASH.layer_ids:
        layout = TableLayout(hasher.rows_for_layer(layer), DIM[row_format], row_format)
        tables[layer] = EngramTable.filled(layout, storage=storage_for(layer, layout), seed=layer, name=f"L{layer}")
    return tables


def random_ids(batch=BATCH, window=WINDOW, seed=0):
    return torch.randint(0, HASH.vocab_size, (batch, window), generator=torch.Generator().manual_seed(seed))


def rows_of(lookup, ids, num_positions=1):
    return {layer: handle.wait() for layer, handle in lookup.submit(ids, num_positions).items()}


@pytest.mark.parametrize("tier", ["dram", "cxl"])
@pytest.mark.parametrize("row_format", list(RowFormat))
@pytest.mark.parametrize("num_positions", [1, WINDOW])
def test_host_tier_table_gives_the_resident_rows_bit_for_bit(manager, tier, row_format, num_positions):
    hasher = NgramHasher(HASH)
    resident = build_tables(hasher, row_format)
    hosted = build_tables(hasher, row_format, lambda layer, layout: manager.empty(
        (layout.num_rows, layout.row_bytes), tier=tier))
    with EngramLookup(hasher, resident) as near, EngramLookup(hasher, hosted, STAGED) as far:
        assert set(near.methods.values()) == {GatherMethod.RESIDENT}
        assert set(far.methods.values()) == {GatherMethod.STAGED}
        ids = random_ids()
        expected, got = rows_of(near, ids, num_positions), rows_of(far, ids, num_positions)
    indices = hasher.hash(ids, num_positions)
    for layer in HASH.layer_ids:
        assert got[layer].shape == (BATCH, num_positions, HASH.heads_per_layer, DIM[row_format])
        assert torch.equal(got[layer], expected[layer])
        assert torch.equal(expected[layer], resident[layer].read_rows(indices[layer]))


def test_hot_row_cache_changes_where_rows_come_from_not_what_they_are():
    hasher = NgramHasher(HASH)
    tables = build_tables(hasher, RowFormat.FP8_E4M3)
    warmup = hasher.hash(random_ids(64, seed=1), WINDOW)
    caches = {layer: HotRowCache.from_observed(tables[layer], warmup[layer], 40, "cpu") for layer in HASH.layer_ids}
    ids = random_ids(seed=1)  # the warm-up stream again: many hits
    with EngramLookup(hasher, tables) as plain, EngramLookup(hasher, tables, STAGED, caches=caches) as cached:
        expected, got = rows_of(plain, ids, WINDOW), rows_of(cached, ids, WINDOW)
        stats = cached.stats()
    for layer in HASH.layer_ids:
        assert torch.equal(got[layer], expected[layer])
        cache_stats = caches[layer].stats()
        distinct = torch.unique(hasher.hash(ids, WINDOW)[layer])
        hits = int(torch.isin(distinct, caches[layer].ids).sum())
        assert (cache_stats.probed_rows, cache_stats.hit_rows) == (distinct.numel(), hits) and hits > 0
        assert stats[layer].fetched_rows == distinct.numel() - hits


def test_stats_count_requested_distinct_and_fetched_rows():
    hasher = NgramHasher(HASH)
    ids = torch.tensor([[4, 5, 6]] * 3 + [[1, 2, 3]])  # three identical sequences
    with EngramLookup(hasher, build_tables(hasher, RowFormat.BF16), STAGED) as lookup:
        rows_of(lookup, ids)
        stats = lookup.stats()
    distinct = {layer: torch.unique(i).numel() for layer, i in hasher.hash(ids).items()}
    for layer in HASH.layer_ids:
        assert stats[layer].requested_rows == 4 * HASH.heads_per_layer
        assert stats[layer].distinct_rows == stats[layer].fetched_rows == distinct[layer] <= 2 * HASH.heads_per_layer


def test_handles_come_in_layer_order_and_are_done_on_a_host_without_gpu():
    hasher = NgramHasher(HASH)
    with EngramLookup(hasher, build_tables(hasher, RowFormat.BF16), device="cpu") as lookup:
        handles = lookup.submit(random_ids())
    assert list(handles) == list(HASH.layer_ids) and all(h.done() for h in handles.values())


def test_tables_that_do_not_fit_the_hash_config_are_refused():
    hasher = NgramHasher(HASH)
    tables = build_tables(hasher, RowFormat.BF16)
    with pytest.raises(ConfigError, match="one table per Engram layer"):
        EngramLookup(hasher, {2: tables[2]})
    wrong = {**tables, 5: EngramTable.filled(TableLayout(10, 80))}
    with pytest.raises(ConfigError, match="10 rows"):
        EngramLookup(hasher, wrong)
    with pytest.raises(ConfigError, match="without an Engram"):
        EngramLookup(hasher, tables, caches={7: HotRowCache(tables[2], torch.tensor([0]), "cpu")})


def test_uva_without_gpu_and_oversized_submits_are_refused():
    hasher = NgramHasher(HASH)
    tables = build_tables(hasher, RowFormat.BF16)
    with pytest.raises(ConfigError, match="CUDA"):
        EngramLookup(hasher, tables, EngramLookupConfig(method=GatherMethod.UVA), device="cpu")
    small = EngramLookupConfig(max_tokens_per_submit=8)
    with EngramLookup(hasher, tables, small) as lookup, pytest.raises(CapacityError, match="max_tokens_per_submit=8"):
        lookup.submit(random_ids(batch=3), num_positions=3)


def test_importing_the_engram_package_loads_no_triton():
    code = "import sys, tiermem.engram; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_uva_gather_refuses_pageable_host_memory():
    table = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(TransferError, match="pageable"):
        uva_gather(table, torch.zeros(2, dtype=torch.int64), torch.ones(1, dtype=torch.int64), torch.empty(2, 16),
                   max_programs=1)


def test_uva_kernel_gathers_the_planned_rows_in_the_triton_interpreter(run_script):
    run_script(interpret=True, script="""
        import torch
        from tiermem.engram.gather import word_bytes
        from tiermem.engram.uva_kernel import gather_rows_kernel
        from tiermem.engram.plan import deduplicate
        for row_bytes in (264, 160, 6, 3):
            table = torch.randint(0, 256, (300, row_bytes), dtype=torch.uint8)
            indices = torch.tensor([299, 5, 5, 0, 17, 299, 42])
            dedup = deduplicate(indices)
            word = word_bytes(table)
            words = row_bytes // word
            out = torch.zeros(indices.numel(), row_bytes, dtype=torch.uint8)
            view = out.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[word])
            gather_rows_kernel[(indices.numel() * words // 64 + 1,)](
                table.data_ptr(), dedup.unique, dedup.count, view, words, BLOCK=64)
            count = int(dedup.count)
            assert torch.equal(out[:count], table[dedup.unique[:count]]), row_bytes
            assert torch.equal(out[dedup.inverse], table[indices]), row_bytes
            assert int(out[count:].sum()) == 0, row_bytes  # rows past the count are not written
        print("ok")
    """)


@pytest.mark.gpu
@pytest.mark.parametrize("row_format", list(RowFormat))
@pytest.mark.parametrize("method", [GatherMethod.UVA, GatherMethod.STAGED])
def test_gpu_host_gathers_equal_the_hbm_resident_rows(row_format, method):
    pytest.importorskip("triton")
    hasher = NgramHasher(HASH)
    host = build_tables(hasher, row_format, lambda layer, layout: torch.empty(
        layout.num_rows, layout.row_bytes, dtype=torch.uint8, pin_memory=True))
    resident = {layer: t.copy_to(torch.empty_like(t.storage, device="cuda")) for layer, t in host.items()}
    warmup = hasher.hash(random_ids(64, seed=1), WINDOW)
    caches = {layer: HotRowCache.from_observed(host[layer], warmup[layer], 40, "cuda") for layer in HASH.layer_ids}
    with EngramLookup(hasher, resident) as near, \
            EngramLookup(hasher, host, EngramLookupConfig(method=method)) as far, \
            EngramLookup(hasher, host, EngramLookupConfig(method=method), caches=caches) as cached:
        for seed, num_positions in ((0, 1), (1, WINDOW), (2, 1)):
            ids = random_ids(seed=seed).cuda()
            expected = rows_of(near, ids, num_positions)
            indices = hasher.hash(ids.cpu(), num_positions)
            assert all(torch.equal(expected[layer].cpu(), host[layer].read_rows(indices[layer])) for layer in expected)
            for lookup in (far, cached):
                got = rows_of(lookup, ids, num_positions)
                torch.cuda.synchronize()
                assert all(torch.equal(got[layer], expected[layer]) for layer in HASH.layer_ids)
        assert all(c.stats().hit_rows > 0 for c in caches.values())


@pytest.mark.gpu
def test_gpu_gather_from_pageable_host_memory_is_refused():
    hasher = NgramHasher(HASH)
    with pytest.raises(TransferError, match="pageable"):
        EngramLookup(hasher, build_tables(hasher, RowFormat.BF16), STAGED)


@pytest.mark.gpu
@pytest.mark.parametrize("cached", [False, True])
def test_uva_lookup_replays_inside_a_cuda_graph(cached):
    pytest.importorskip("triton")
    hasher = NgramHasher(HASH)
    host = build_tables(hasher, RowFormat.BF16, lambda layer, layout: torch.empty(
        layout.num_rows, layout.row_bytes, dtype=torch.uint8, pin_memory=True))
    warmup = hasher.hash(random_ids(64, seed=1), WINDOW)
    caches = {layer: HotRowCache.from_observed(host[layer], warmup[layer], 60, "cuda")
              for layer in HASH.layer_ids} if cached else None
    with EngramLookup(hasher, host, EngramLookupConfig(method=GatherMethod.UVA), caches=caches) as lookup:
        assert all(lookup.fused.values())  # a cache no longer takes a layer off the fused kernel
        static_ids = random_ids().cuda()
        rows_of(lookup, static_ids)  # warm-up: constants on the device, kernel compiled
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rows = rows_of(lookup, static_ids)
        before = {layer: c.stats() for layer, c in (caches or {}).items()}
        for seed in (3, 4):
            static_ids.copy_(random_ids(seed=seed))
            graph.replay()
            torch.cuda.synchronize()
            indices = hasher.hash(static_ids.cpu())
            assert all(torch.equal(rows[layer].cpu(), host[layer].read_rows(indices[layer])) for layer in rows)
        for layer, cache in (caches or {}).items():  # the replays counted every probe (two steps of rows)
            assert cache.stats().probed_rows - before[layer].probed_rows == 2 * BATCH * HASH.heads_per_layer
