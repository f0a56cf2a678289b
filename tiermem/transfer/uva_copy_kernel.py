"""The Triton kernel behind ``uva_copy``; imported on first use, so ``import tiermem`` needs no Triton.

``copy_blocks_kernel`` copies whole blocks whose list lives on the device: for ``i < count[0]``,
block ``objects[i]`` (its address read from ``addresses``, valid on the GPU under unified virtual
addressing for pinned or registered host memory, or HBM) goes to row ``slots[i]`` of ``out``. The
work is (block, chunk) items that a fixed grid of programs loops over, so the launch shape never
depends on the count: a read from host memory is bound by the link's latency (reads in flight),
and every program past the work returns at once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_blocks_kernel(addresses_ptr, objects_ptr, slots_ptr, count_ptr, out_ptr, words_per_block,
                       BLOCK: tl.constexpr):
    chunks = tl.cdiv(words_per_block, BLOCK)
    items = tl.load(count_ptr) * chunks
    words = tl.arange(0, BLOCK)
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        row = item // chunks
        offsets = (item % chunks) * BLOCK + words
        mask = offsets < words_per_block
        source = tl.load(addresses_ptr + tl.load(objects_ptr + row)).to(out_ptr.dtype)
        target = out_ptr + tl.load(slots_ptr + row) * words_per_block
        tl.store(target + offsets, tl.load(source + offsets, mask=mask), mask=mask)
