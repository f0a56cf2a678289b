"""The Triton kernels behind ``gather``; imported on first use, so ``import tiermem`` needs no Triton.

Both read table rows through the table's address, which is valid on the GPU for HBM and, under
unified virtual addressing, for pinned or registered host memory. Both are persistent: a grid of a
few programs loops over the work, because a gather from host memory is bound by the link's latency
(reads in flight), not by SMs, and every SM it holds is one the model's GEMMs cannot use.

- ``gather_rows_kernel``: word ``w`` of output row ``r`` is word ``w`` of table row ``index[r]``
  for ``r < count``; the count stays on the device (rows past it are not written).
- ``hash_gather_kernel``: hashes each (sequence, position, head) exactly as ``NgramHasher.hash``
  does and copies that table row into the output: one launch per layer, no index tensor, no
  de-duplication. With a hot-row cache (``HAS_CACHE``) each row first probes the cache's row map
  in HBM (linear probing, as ``rowmap.RowMap.find``; that module says why not a sorted search);
  a hit copies the cached row, and only misses read the table, so only misses cross the link.
  Counters: ``counter[0]`` gains the rows requested, ``counter[2]`` the rows read from the table
  (requested less hits, exact once the kernel is done); the cache's ``[probed, hit]`` counts
  gain the requested rows and the hits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(table_address, index_ptr, count_ptr, out_ptr, words_per_row, BLOCK: tl.constexpr):
    total = tl.load(count_ptr) * words_per_row
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for first in range(tl.program_id(0).to(tl.int64) * BLOCK, total, step):
        offsets = first + tl.arange(0, BLOCK)
        mask = offsets < total
        out_row = offsets // words_per_row
        word = offsets % words_per_row
        table_row = tl.load(index_ptr + out_row, mask=mask, other=0)
        source = table_address.to(out_ptr.dtype) + table_row * words_per_row + word
        tl.store(out_ptr + offsets, tl.load(source, mask=mask), mask=mask)


@triton.jit
def hash_gather_kernel(ids_ptr, compression_ptr, multipliers_ptr, primes_ptr, offsets_ptr, table_address, out_ptr,
                       counter_ptr, map_ptr, cache_rows_ptr, cache_counts_ptr, window, num_positions, total_rows,
                       raw_vocab, pad_id, words_per_row, map_shift, map_mask, map_max_probes, hash_multiplier,
                       ORDER: tl.constexpr, HEADS: tl.constexpr, HEADS_PER_ORDER: tl.constexpr,
                       COMPRESSED: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_WORDS: tl.constexpr):
    """Rows ``[total_rows, words_per_row]`` of one layer for int ids ``[B, window]`` (contiguous)."""
    if tl.program_id(0) == 0:  # statistics: rows requested (and probed, with a cache) in this layer
        requested = tl.zeros([], dtype=tl.int64) + total_rows
        tl.atomic_add(counter_ptr, requested)
        if HAS_CACHE:
            tl.atomic_add(cache_counts_ptr, requested)
    words = tl.arange(0, BLOCK_WORDS)
    word_ok = words < words_per_row
    hits = tl.zeros([BLOCK_ROWS], dtype=tl.int64)  # rows of this program served from the cache
    for first in range(tl.program_id(0) * BLOCK_ROWS, total_rows, tl.num_programs(0) * BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < total_rows
        token = rows // HEADS
        head = rows % HEADS
        sequence = (token // num_positions).to(tl.int64)
        column = window - num_positions + token % num_positions
        mix = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        chosen = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        for back in tl.static_range(ORDER):  # the token ``back`` positions before the hashed one
            present = row_ok & (column >= back)
            raw = tl.load(ids_ptr + sequence * window + column - back, mask=present, other=0).to(tl.int64)
            if COMPRESSED:  # out-of-range ids read the pad id, never outside the compression table
                valid = present & (raw >= 0) & (raw < raw_vocab)
                token_id = tl.load(compression_ptr + raw, mask=valid, other=pad_id)
            else:
                token_id = tl.where(present, raw, pad_id)
            mix = mix ^ (token_id * tl.load(multipliers_ptr + back))
            if back >= 1:  # mix now covers order back + 1, whose heads are order index back - 1
                chosen = tl.where(head // HEADS_PER_ORDER == back - 1, mix, chosen)
        prime = tl.load(primes_ptr + head, mask=row_ok, other=1)
        remainder = chosen % prime
        remainder = tl.where(remainder < 0, remainder + prime, remainder)  # torch.remainder's sign
        table_row = remainder + tl.load(offsets_ptr + head, mask=row_ok, other=0)
        mask = row_ok[:, None] & word_ok[None, :]
        target = out_ptr + rows.to(tl.int64)[:, None] * words_per_row + words[None, :]
        source = table_address.to(out_ptr.dtype) + table_row[:, None] * words_per_row + words[None, :]
        if HAS_CACHE:  # linear probing in the row map (rowmap.RowMap); then misses read the table
            position = ((table_row * hash_multiplier) >> map_shift) & map_mask
            slot = tl.zeros([BLOCK_ROWS], dtype=tl.int64) - 1
            searching = row_ok
            probes = 0
            while (probes < map_max_probes) & (tl.max(searching.to(tl.int32), axis=0) > 0):
                entry = tl.load(map_ptr + position, mask=searching, other=-1)  # (slot << 32) | key: one read
                key = (entry << 32) >> 32  # the low half, sign-extended (an empty key is -1)
                found = searching & (key == table_row)
                slot = tl.where(found, entry >> 32, slot)
                searching = searching & (key != -1) & ~found
                position = (position + 1) & map_mask
                probes += 1
            hit = slot >= 0
            hits += hit.to(tl.int64)
            cached = tl.load(cache_rows_ptr + slot[:, None] * words_per_row + words[None, :], mask=mask & hit[:, None])
            fetched = tl.load(source, mask=mask & (slot < 0)[:, None])
            tl.store(target, tl.where(hit[:, None], cached, fetched), mask=mask)
        else:
            tl.store(target, tl.load(source, mask=mask), mask=mask)
    if tl.program_id(0) == 0:  # rows fetched from the table: all requested ones, less the hits counted below
        tl.atomic_add(counter_ptr + 2, tl.zeros([], dtype=tl.int64) + total_rows)
    if HAS_CACHE:
        program_hits = tl.sum(hits, axis=0)
        tl.atomic_add(counter_ptr + 2, -program_hits)
        tl.atomic_add(cache_counts_ptr + 1, program_hits)
