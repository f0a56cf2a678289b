"""What one layer's lookup must fetch: batch de-duplication and hot-row cache hits, as a frozen plan.

``plan_fetch`` is pure and runs on whatever device the indices are on, with fixed output shapes
and no host sync (the number of rows to fetch stays a device tensor), so the GPU path is
CUDA-graph capturable. A lookup then gathers ``fetch_ids[:fetch_count]`` from the table and
assembles each requested row from the fetched rows or the cache, following the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.engram.cache import HotRowCache


@dataclass(frozen=True)
class Dedup:
    """Distinct indices of a flat index tensor, computed without a host sync.

    ``unique[:count]`` holds the distinct indices in ascending order (entries past ``count`` are
    padding), ``indices == unique[inverse]``, and ``count`` is an int64 ``[1]`` tensor on the same
    device as the indices: ``torch.unique(sorted=True, return_inverse=True)`` with fixed shapes.
    """

    unique: torch.Tensor
    inverse: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class FetchPlan:
    """Rows to move for one layer's lookup and where each requested row comes from.

    Requested row ``i`` is ``cache.rows[request_slot[i]]`` where ``request_hit[i]``, otherwise
    ``fetched[request_rank[i]]`` with ``fetched[j] = table[fetch_ids[j]]`` for ``j < fetch_count``.
    Without a cache, ``request_hit`` and ``request_slot`` are None. ``distinct_rows`` and
    ``hit_rows`` are int64 ``[1]`` counters for statistics.
    """

    fetch_ids: torch.Tensor
    fetch_count: torch.Tensor
    request_rank: torch.Tensor
    request_hit: torch.Tensor | None
    request_slot: torch.Tensor | None
    distinct_rows: torch.Tensor
    hit_rows: torch.Tensor


def deduplicate(indices: torch.Tensor) -> Dedup:
    """Sort-based de-duplication of a non-empty 1-D int64 tensor."""
    assert indices.dim() == 1 and indices.numel() > 0, "deduplicate takes a non-empty flat tensor"
    ordered, order = torch.sort(indices)
    is_first = torch.ones_like(ordered, dtype=torch.bool)
    is_first[1:] = ordered[1:] != ordered[:-1]
    run = torch.cumsum(is_first, dim=0) - 1
    inverse = torch.empty_like(run).scatter_(0, order, run)
    unique = torch.zeros_like(ordered).scatter_(0, run, ordered)  # duplicates write equal values
    return Dedup(unique, inverse, run[-1:] + 1)


def plan_fetch(indices: torch.Tensor, cache: HotRowCache | None = None) -> FetchPlan:
    """Plan the fetch of the flat row ``indices`` of one layer: distinct rows not held by ``cache``."""
    dedup = deduplicate(indices)
    if cache is None:
        no_hits = torch.zeros_like(dedup.count)
        return FetchPlan(dedup.unique, dedup.count, dedup.inverse, None, None, dedup.count, no_hits)
    size = dedup.unique.numel()
    valid = torch.arange(size, device=indices.device) < dedup.count
    hit, slot = cache.probe(dedup.unique, valid)
    miss = valid & ~hit
    rank = torch.cumsum(miss, dim=0) - 1
    spill = torch.full_like(rank, size)  # misses go to their rank, everything else to a spare last slot
    fetch_ids = torch.zeros(size + 1, dtype=torch.int64, device=indices.device)
    fetch_ids.scatter_(0, torch.where(miss, rank, spill), dedup.unique)
    hit_rows = hit.sum(dim=0, keepdim=True)
    return FetchPlan(
        fetch_ids=fetch_ids[:size],
        fetch_count=dedup.count - hit_rows,
        request_rank=rank.clamp(min=0)[dedup.inverse],
        request_hit=hit[dedup.inverse],
        request_slot=slot[dedup.inverse],
        distinct_rows=dedup.count,
        hit_rows=hit_rows,
    )
