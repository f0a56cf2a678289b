"""The fused hash + gather kernel and the persistent row gather agree with the torch hasher (Triton interpreter)."""

from __future__ import annotations

import pytest

from tiermem.engram import EngramLookupConfig
from tiermem.errors import ConfigError


def test_fused_kernel_gathers_the_rows_the_torch_hasher_names(run_script):
    run_script(interpret=True, script="""
        import torch
        from tiermem.engram import EngramHashConfig, NgramHasher
        from tiermem.engram.gather import hash_gather
        RAW_VOCAB, VOCAB = 500, 300
        for compression in (None, torch.arange(RAW_VOCAB) % VOCAB):
            for order in (2, 4):
                config = EngramHashConfig(vocab_size=VOCAB, layer_ids=(2, 5), rows_per_head=(101,) * (order - 1),
                                          heads_per_order=3, max_ngram_order=order)
                hasher = NgramHasher(config, compression)
                for batch, window, positions, row_bytes in ((5, 6, 1, 160), (3, 7, 7, 264), (1, 2, 2, 6)):
                    ids = torch.randint(0, RAW_VOCAB if compression is not None else VOCAB, (batch, window),
                                        dtype=torch.int32)
                    indices = hasher.hash(ids, positions)
                    for layer in config.layer_ids:
                        table = torch.randint(0, 256, (hasher.rows_for_layer(layer), row_bytes), dtype=torch.uint8)
                        out = torch.zeros(indices[layer].numel(), row_bytes, dtype=torch.uint8)
                        counters = torch.zeros(3, dtype=torch.int64)
                        hash_gather(table, ids, positions, hasher.layer_constants(layer, ids.device),
                                    config.heads_per_order, out, counters, max_programs=2)
                        assert torch.equal(out, table[indices[layer].reshape(-1)]), (order, batch, layer)
                        assert counters.tolist() == [out.shape[0], 0, out.shape[0]]
        print("ok")
    """)


def test_fused_kernel_with_a_cache_gives_the_table_rows_and_counts_hits_and_misses(run_script):
    run_script(interpret=True, script="""
        import torch
        from tiermem.engram import EngramHashConfig, EngramTable, HotRowCache, NgramHasher, TableLayout
        from tiermem.engram.gather import hash_gather
        RAW_VOCAB, VOCAB = 500, 300
        generator = torch.Generator().manual_seed(0)
        for compression in (None, torch.arange(RAW_VOCAB) % VOCAB):
            for order in (2, 3):
                config = EngramHashConfig(vocab_size=VOCAB, layer_ids=(2,), rows_per_head=(101,) * (order - 1),
                                          heads_per_order=3, max_ngram_order=order)
                hasher = NgramHasher(config, compression)
                rows = hasher.rows_for_layer(2)
                # positions == window: the first positions hash with pad tokens; sequences 0 and 1 are equal
                for batch, window, positions, row_bytes in ((4, 5, 5, 160), (6, 4, 1, 264), (3, 3, 3, 6)):
                    ids = torch.randint(0, RAW_VOCAB if compression is not None else VOCAB, (batch, window),
                                        dtype=torch.int32, generator=generator)
                    ids[1] = ids[0]
                    indices = hasher.hash(ids, positions)[2].reshape(-1)
                    storage = torch.randint(0, 256, (rows, row_bytes), dtype=torch.uint8, generator=generator)
                    table = EngramTable(storage, TableLayout(rows, row_bytes // 2))
                    requested = torch.unique(indices)
                    unrequested = torch.tensor(sorted(set(range(rows)) - set(requested.tolist()))[:7])
                    cache = HotRowCache(table, torch.cat([requested[::2], unrequested]), "cpu")
                    hits = int(torch.isin(indices, cache.ids).sum())
                    assert 0 < hits < indices.numel() and indices.numel() > requested.numel()
                    out = torch.zeros(indices.numel(), row_bytes, dtype=torch.uint8)
                    counters = torch.zeros(3, dtype=torch.int64)
                    hash_gather(storage, ids, positions, hasher.layer_constants(2, ids.device),
                                config.heads_per_order, out, counters, max_programs=2, cache=cache)
                    assert torch.equal(out, storage[indices]), (order, batch, row_bytes)
                    assert counters.tolist() == [indices.numel(), 0, indices.numel() - hits]
                    assert cache.counts.tolist() == [indices.numel(), hits]
        print("ok")
    """)


def test_row_gather_with_fewer_programs_than_blocks_still_copies_every_row(run_script):
    run_script(interpret=True, script="""
        import torch
        from tiermem.engram.uva_kernel import gather_rows_kernel
        table = torch.randint(0, 256, (300, 160), dtype=torch.uint8)
        indices = torch.randint(0, 300, (50,))
        count = torch.tensor([41])
        out = torch.zeros(50, 160, dtype=torch.uint8)
        gather_rows_kernel[(2,)](table.data_ptr(), indices, count, out.view(torch.int64), 20, BLOCK=64)
        assert torch.equal(out[:41], table[indices[:41]]) and int(out[41:].sum()) == 0
        print("ok")
    """)


def test_gather_program_limit_must_be_positive():
    with pytest.raises(ConfigError, match="gather_max_programs"):
        EngramLookupConfig(gather_max_programs=0)
