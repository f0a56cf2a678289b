"""The Triton kernels behind ``gather``; imported on first use, so ``import tiermem`` needs no Triton.

Both read table rows through the table's address, which is valid on the GPU for HBM and, under
unified virtual addressing, for pinned or registered host memory. Both are persistent: a grid of a
few programs loops over the work, because a gather from host memory is bound by the link's latency
(reads in flight), not by SMs, and every SM it holds is one the model's GEMMs cannot use.

- ``gather_rows_kernel``: word ``w`` of output row ``r`` is word ``w`` of table row ``index[r]``
  for ``r < count``; the count stays on the device (rows past it are not written).
- ``hash_gather_kernel``: hashes each (sequence, position, head) exactly as ``NgramHasher.hash``
  does and copies that table row into the output: one launch per layer, no index tensor, no
  de-duplication.
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
                       counter_ptr, window, num_positions, total_rows, raw_vocab, pad_id, words_per_row,
                       ORDER: tl.constexpr, HEADS: tl.constexpr, HEADS_PER_ORDER: tl.constexpr,
                       COMPRESSED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    """Rows ``[total_rows, words_per_row]`` of one layer for int ids ``[B, window]`` (contiguous)."""
    if tl.program_id(0) == 0:  # statistics: requested and fetched rows of this layer
        requested = tl.zeros([], dtype=tl.int64) + total_rows
        tl.atomic_add(counter_ptr, requested)
        tl.atomic_add(counter_ptr + 2, requested)
    words = tl.arange(0, BLOCK_WORDS)
    word_ok = words < words_per_row
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
        source = table_address.to(out_ptr.dtype) + table_row[:, None] * words_per_row + words[None, :]
        target = out_ptr + rows.to(tl.int64)[:, None] * words_per_row + words[None, :]
        tl.store(target, tl.load(source, mask=mask), mask=mask)
