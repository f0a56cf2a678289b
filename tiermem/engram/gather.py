"""Row gathers for Engram lookups: the UVA zero-copy kernels and the CPU gather into staging.

- ``uva_gather`` launches a Triton kernel whose threads read rows straight out of pinned host
  memory (the host address is valid on the device under unified virtual addressing), each thread
  one 8/4/2/1-byte word; it pays off for rows of ~512 B and more (measured on the H100: 45.8 GB/s at
  1 KiB rows, 3.9 GB/s at 64 B rows).
- ``hash_gather`` hashes a layer's n-grams and gathers the rows in one kernel (no index tensor, no
  de-duplication), from HBM or pinned host memory alike; with a hot-row cache, rows it holds come
  from HBM and only misses read the table (same launch).
- GPU gathers run on at most ``max_programs`` Triton programs (CTAs) that loop over the rows: a
  host-memory gather waits on the link, and the SMs it does not hold stay with the model.
- ``staged_gather`` is a multi-threaded ``index_select`` into a (pinned) staging buffer; the
  caller then issues one host-to-device copy. It serves small rows.

Invariant: a gather only reads the table and writes ``out``; the caller owns both until the stream
work that uses them is complete.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from tiermem.engram.cache import HotRowCache
from tiermem.engram.hashing import LayerHashConstants
from tiermem.engram.rowmap import HASH_MULTIPLIER
from tiermem.errors import ConfigError, TransferError

UVA_KERNEL_MODULE = "tiermem.engram.uva_kernel"  # imports Triton (the optional [gpu] extra): loaded on first use
UVA_BLOCK_WORDS = 1024  # words copied per Triton program
UVA_NUM_WARPS = 4
MAX_ROW_WORDS = 4096  # hash_gather keeps one row's words in a program's tile
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def uva_available() -> bool:
    """True when the UVA gather can run here (Triton importable and a CUDA device present)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def word_bytes(table: torch.Tensor) -> int:
    """Widest word (8/4/2/1 bytes) that divides the row size and aligns the table's address."""
    row_bytes = table.shape[1] * table.element_size()
    return next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and table.data_ptr() % w == 0)


def uva_gather(table: torch.Tensor, indices: torch.Tensor, count: torch.Tensor, out: torch.Tensor, *,
               max_programs: int) -> None:
    """``out[i] = table[indices[i]]`` for ``i < count``, read by the GPU straight from ``table``.

    ``table`` is a uint8 ``[rows, row_bytes]`` tensor in pinned host memory (or HBM); ``indices``
    (int64 ``[n]``), ``count`` (int64 ``[1]``) and ``out`` (uint8 ``[n, row_bytes]``) live on the
    GPU. Launched on the current stream; CUDA-graph capturable; rows of ``out`` past ``count`` are
    left untouched.
    """
    _check_readable(table)
    word = word_bytes(table)
    words_per_row = table.shape[1] // word
    grid = (max(1, min(max_programs, -(-indices.numel() * words_per_row // UVA_BLOCK_WORDS))),)
    _kernel("gather_rows_kernel")[grid](table.data_ptr(), indices, count, out.view(_WORD_DTYPES[word]), words_per_row,
                                        BLOCK=UVA_BLOCK_WORDS, num_warps=UVA_NUM_WARPS)


def hash_gather(table: torch.Tensor, ids: torch.Tensor, num_positions: int, constants: LayerHashConstants,
                heads_per_order: int, out: torch.Tensor, counters: torch.Tensor, *, max_programs: int,
                cache: HotRowCache | None = None) -> None:
    """``out[r]`` = the table row that ``NgramHasher.hash`` gives for row ``r`` of the last positions.

    ``ids`` is int ``[B, T]`` on the GPU; rows ``r`` run over (sequence, position, head), the order
    of ``hash(ids, num_positions)[layer].reshape(-1)``. ``table`` is uint8 ``[rows, row_bytes]`` in
    HBM or pinned host memory; ``out`` is ``[B * num_positions * heads, row_bytes]`` bytes (any dtype
    viewable so); ``counters`` (int64 ``[3]``) gains the rows requested (``[0]``) and read from the
    table (``[2]``). With ``cache`` (on the device of ``out``), rows it holds are copied from HBM
    and counted in its ``counts``; the output is the same bytes either way. Launched on the
    current stream; CUDA-graph capturable; ids must be token ids (with a compression table, ids
    outside it hash as the pad token).
    """
    if ids.device.type == "cuda":
        _check_readable(table)
    word = word_bytes(table) if cache is None else min(word_bytes(table), word_bytes(cache.rows))
    words_per_row = table.shape[1] // word
    if words_per_row > MAX_ROW_WORDS:
        raise ConfigError(f"engram hash gather: rows of {table.shape[1]} bytes exceed {MAX_ROW_WORDS} words of "
                          f"{word} bytes; use the uva method with fuse_hash_gather=False")
    heads = constants.primes.numel()
    total_rows = ids.shape[0] * num_positions * heads
    block_words = _next_power_of_2(words_per_row)
    block_rows = max(1, UVA_BLOCK_WORDS // block_words)
    grid = (max(1, min(max_programs, -(-total_rows // block_rows))),)
    compression = constants.compression if constants.compression is not None else constants.primes
    out_words = out.view(torch.uint8).view(-1, table.shape[1]).view(_WORD_DTYPES[word])
    if cache is None:  # the kernel never reads the cache arguments then: stand-ins of the right kinds
        row_map, cached_rows, cache_counts, bits, max_probes = counters, out_words, counters, 1, 0
    else:
        row_map, cached_rows, cache_counts = cache.row_map.packed(), cache.rows.view(out_words.dtype), cache.counts
        bits, max_probes = cache.row_map.bits, cache.row_map.max_probes
    _kernel("hash_gather_kernel")[grid](
        ids.contiguous(), compression, constants.multipliers, constants.primes, constants.offsets, table.data_ptr(),
        out_words, counters, row_map, cached_rows, cache_counts,
        ids.shape[1], num_positions, total_rows, constants.raw_vocab_size, constants.pad_id, words_per_row,
        64 - bits, (1 << bits) - 1, max_probes, HASH_MULTIPLIER,
        ORDER=constants.multipliers.numel(), HEADS=heads, HEADS_PER_ORDER=heads_per_order,
        COMPRESSED=constants.compression is not None, HAS_CACHE=cache is not None, BLOCK_ROWS=block_rows,
        BLOCK_WORDS=block_words, num_warps=UVA_NUM_WARPS)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def staged_gather(table: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:n] = table[indices]`` on the CPU (multi-threaded index_select); returns ``out[:n]``."""
    return torch.index_select(table, 0, indices, out=out[: indices.numel()])


def _check_readable(table: torch.Tensor) -> None:
    if table.device.type == "cpu" and not table.is_pinned():
        raise TransferError(f"engram uva gather: the table ({table.shape[0]} rows x {table.shape[1]} bytes) is "
                            "pageable host memory, which the GPU cannot read; allocate it from a host tier "
                            "(pinned/registered) or pin it")


@functools.cache
def _kernel(name: str):
    try:
        return getattr(importlib.import_module(UVA_KERNEL_MODULE), name)
    except ImportError:
        raise TransferError("engram uva gather: Triton is not installed; install tiermem[gpu] or use the "
                            "staged gather method") from None
