"""The Triton kernels give torch's answers, run by Triton's interpreter on CPU tensors (no GPU needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from tiermem.bench import kernels

src = torch.arange(4096, dtype=torch.int32).view(torch.uint8)
dst = torch.zeros_like(src)
kernels.sm_copy(src, dst)
assert torch.equal(src, dst), "sm_copy"

generator = torch.Generator().manual_seed(0)
for row_bytes in (16, 96, 1024, 8192):
    table = torch.randint(0, 256, (50, row_bytes), dtype=torch.uint8, generator=generator)
    index = torch.randint(0, 50, (37,), generator=generator)
    out = torch.zeros(37, row_bytes, dtype=torch.uint8)
    kernels.uva_gather(table, index, out)
    assert torch.equal(out, table[index]), f"uva_gather {row_bytes}"

chain = torch.tensor([3, 0, 1, 2], dtype=torch.int64)  # 0 -> 3 -> 2 -> 1 -> 0
state = torch.zeros(1, dtype=torch.int64)
for steps, expected in ((1, 3), (2, 1), (5, 0)):
    kernels.chase(chain, steps, state)
    assert int(state) == expected, f"chase {steps}: {int(state)} != {expected}"
print("ok")
"""


def test_sm_copy_uva_gather_and_chase_match_torch_under_the_interpreter(run_script):
    run_script(SCRIPT, interpret=True)
