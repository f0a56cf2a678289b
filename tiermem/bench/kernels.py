"""Triton kernels the bench measures: an SM copy, a UVA row gather and a single-thread pointer chase.

Host memory reaches these kernels through its UVA pointer: Triton asks the driver for the device
pointer of every tensor argument, which succeeds for pinned and ``cudaHostRegister``-ed memory (every
tiermem host tier) and fails loudly for pageable memory. So a CPU tensor of a host tier is passed
as is, and the GPU reads or writes host memory over PCIe with no staging copy.

Shapes and dtypes (all tensors contiguous; every call is enqueued on the current stream and is CUDA-graph
capturable):
| function     | arguments                                                                        |
|--------------|----------------------------------------------------------------------------------|
| sm_copy      | src, dst: uint8 [n], n % 16 == 0, 16-byte aligned                              |
| uva_gather   | table: uint8 [rows, row_bytes] (host); index: int64 [k] (GPU); out: uint8 [k, row_bytes] (GPU) |
| chase        | chain: int64 [n], chain[i] = next i (host or GPU); state: int64 [1] (GPU), in/out |
Triton is optional: ``available()`` says whether it imports; the wrappers raise TopologyError if not
(``require_triton``).
"""

from __future__ import annotations

import torch

from tiermem.errors import TopologyError

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: only the SM-copy, UVA-gather and GPU-latency points need it
    triton = None

COPY_BLOCK_WORDS = 8192  # int32 words per program: 32 KiB
GATHER_TILE_WORDS = 4096  # int32 words per program: 16 KiB of rows
GATHER_MAX_COLS = 1024


def available() -> bool:
    return triton is not None


def require_triton() -> None:
    """Raise TopologyError naming the fix when Triton is not installed."""
    if triton is None:
        raise TopologyError("bench: this point runs a Triton kernel but triton is not installed; "
                            "pip install 'tiermem[gpu]' (or triton) on the GPU host")


def sm_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy bytes with GPU threads (load/store), not a copy engine; either side may be host memory."""
    require_triton()
    nbytes = src.numel()
    assert src.dtype == dst.dtype == torch.uint8 and dst.numel() == nbytes and nbytes % 16 == 0
    words = nbytes // 4
    _copy_kernel[(triton.cdiv(words, COPY_BLOCK_WORDS),)](
        src.view(torch.int32), dst.view(torch.int32), words, BLOCK=COPY_BLOCK_WORDS, num_warps=8)


def uva_gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[index[i]]``, the GPU reading rows of a host table through its UVA pointer."""
    require_triton()
    rows, row_bytes = out.shape
    assert table.dtype == out.dtype == torch.uint8 and table.shape[1] == row_bytes and row_bytes % 4 == 0
    assert index.dtype == torch.int64 and index.numel() == rows
    row_words = row_bytes // 4
    block_cols = min(triton.next_power_of_2(row_words), GATHER_MAX_COLS)
    block_rows = max(1, GATHER_TILE_WORDS // block_cols)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(row_words, block_cols))
    _gather_kernel[grid](table.view(torch.int32), index, out.view(torch.int32), rows,
                         ROW_WORDS=row_words, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=4)


def chase(chain: torch.Tensor, steps: int, state: torch.Tensor) -> None:
    """One GPU thread follows ``steps`` links of ``chain`` from ``state[0]`` (uncached loads), and stores
    where it stopped back into ``state[0]``, so consecutive calls walk on instead of re-reading lines."""
    require_triton()
    assert chain.dtype == state.dtype == torch.int64 and steps >= 1
    _chase_kernel[(1,)](chain, state, steps, num_warps=1)


if triton is not None:

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, words, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < words
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)

    @triton.jit
    def _gather_kernel(table_ptr, index_ptr, out_ptr, rows,
                       ROW_WORDS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        out_rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (out_rows < rows)[:, None] & (cols < ROW_WORDS)[None, :]
        src_rows = tl.load(index_ptr + out_rows, mask=out_rows < rows, other=0)
        values = tl.load(table_ptr + src_rows[:, None] * ROW_WORDS + cols[None, :], mask=mask)
        tl.store(out_ptr + out_rows[:, None] * ROW_WORDS + cols[None, :], values, mask=mask)

    @triton.jit
    def _chase_kernel(chain_ptr, state_ptr, steps):
        index = tl.load(state_ptr)
        for _ in range(steps):
            index = tl.load(chain_ptr + index, cache_modifier=".cv")
        tl.store(state_ptr, index)
