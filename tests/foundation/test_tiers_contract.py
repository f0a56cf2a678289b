"""One contract suite run over every registered tier kind."""

from __future__ import annotations

import pytest
import torch

from tiermem.errors import CapacityError, OwnershipError
from tiermem.manager import build_tier
from tiermem.tiers import TIERS, Tier

CAPACITY_BYTES = 1 << 20
ARENA_BYTES = 256 * 1024

SPECS = {
    "dram": {"kind": "dram", "capacity_bytes": CAPACITY_BYTES, "arena_bytes": ARENA_BYTES, "numa_node": 0},
    "cxl": {"kind": "cxl", "backing": "emulated", "capacity_bytes": CAPACITY_BYTES, "arena_bytes": ARENA_BYTES},
    "sim": {"kind": "sim", "capacity_bytes": CAPACITY_BYTES, "arena_bytes": ARENA_BYTES, "model_time": False},
    "faulty": {"kind": "faulty", "inner": {"kind": "sim", "capacity_bytes": CAPACITY_BYTES,
                                           "arena_bytes": ARENA_BYTES, "model_time": False}},
    "hbm": {"kind": "hbm", "capacity_bytes": CAPACITY_BYTES, "arena_bytes": ARENA_BYTES},
}


NON_ALLOCATING = {"rdma"}  # remote objects are read, not allocated: its own suite, tests/rdma/test_rdma_tier.py


def test_every_registered_kind_is_covered_by_the_contract_suite():
    assert sorted([*SPECS, *NON_ALLOCATING]) == TIERS.names()


@pytest.fixture(params=sorted(SPECS))
def tier(request) -> Tier:
    if request.param == "hbm" and not torch.cuda.is_available():
        pytest.skip("hbm tier needs CUDA")
    built = build_tier(SPECS[request.param])
    yield built
    built.close()


def test_tier_satisfies_the_protocol(tier):
    assert isinstance(tier, Tier)
    assert tier.capacity_bytes == CAPACITY_BYTES


def test_allocations_are_aligned_views_into_tier_memory(tier):
    blocks = [tier.allocate(n) for n in (1, 1000, 4096, 70_000)]
    for block in blocks:
        assert block.tensor.dtype == torch.uint8 and block.tensor.numel() == block.nbytes
        assert block.tensor.data_ptr() % 512 == 0
        assert tier.contains(block.tensor.data_ptr())
        assert tier.owner_of(block.tensor.data_ptr()) is not None
    ends = sorted((b.tensor.data_ptr(), b.tensor.data_ptr() + b.nbytes) for b in blocks)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:]))


def test_accounting_is_exact_and_freeing_restores_it(tier):
    blocks = [tier.allocate(n) for n in (100, 513, 2048)]
    assert tier.used_bytes == 512 + 1024 + 2048
    assert tier.free_bytes == CAPACITY_BYTES - tier.used_bytes
    for block in blocks:
        tier.free(block)
    assert tier.used_bytes == 0 and tier.stats().blocks == 0


def test_over_capacity_names_tier_request_and_free_bytes(tier):
    with pytest.raises(CapacityError, match=r"cannot allocate.*capacity 1\.0 MiB.*free"):
        tier.allocate(CAPACITY_BYTES + 1)
    assert tier.used_bytes == 0


def test_objects_larger_than_an_arena_get_their_own(tier):
    block = tier.allocate(ARENA_BYTES + 1)
    assert block.nbytes == ARENA_BYTES + 1
    assert tier.stats().mapped_bytes >= ARENA_BYTES + 1


def test_objects_summing_to_the_capacity_fit_despite_arena_tails(tier):
    object_bytes = 90 * 1024  # two fit in a 256 KiB arena, with a 76 KiB tail
    blocks = [tier.allocate(object_bytes) for _ in range(CAPACITY_BYTES // object_bytes)]
    assert tier.used_bytes == len(blocks) * object_bytes
    assert tier.stats().mapped_bytes <= CAPACITY_BYTES + ARENA_BYTES
    with pytest.raises(CapacityError):
        tier.allocate(tier.free_bytes + 1)


def test_double_free_is_refused_without_corrupting_state(tier):
    keep = tier.allocate(1000)
    block = tier.allocate(1000)
    tier.free(block)
    with pytest.raises(OwnershipError):
        tier.free(block)
    assert tier.used_bytes == 1024
    tier.free(keep)


def test_written_bytes_read_back(tier):
    block = tier.allocate(4096)
    pattern = torch.arange(4096, dtype=torch.int32).remainder(251).to(torch.uint8).to(block.tensor.device)
    block.tensor.copy_(pattern)
    assert torch.equal(block.tensor, pattern)


def test_close_is_idempotent_and_refuses_later_use(tier):
    tier.allocate(100)
    tier.close()
    tier.close()
    with pytest.raises(OwnershipError, match="closed"):
        tier.allocate(100)
