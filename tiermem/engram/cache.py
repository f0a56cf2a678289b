"""An optional HBM cache of one table's most frequently looked-up rows, with measured hit counts.

Frequency policy: the rows are chosen once, from how often a profiling token stream looked each
row up (``from_counts``, ``from_observed``), and stay fixed while serving, so a probe has fixed
shapes (no host sync, CUDA-graph capturable). Rows are found through a ``RowMap`` (open
addressing, O(1) expected reads per probe; ``rowmap`` says why not a sorted search), which the
fused hash + gather kernel and the torch path (``probe``) share. Its value is whatever
``stats()`` reports on real traffic: Engram row reuse is low in practice (one third-party trace:
61% of lookups hit first-time rows), so nothing here assumes a hit rate.

Invariants: ``ids`` (host) is sorted and distinct; ``rows[i]`` holds the stored bytes of table row
``ids[i]`` and ``row_map`` maps ``ids[i] -> i``; counters only grow and live on the cache's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.engram.rowmap import EMPTY_KEY, RowMap
from tiermem.engram.table import EngramTable
from tiermem.errors import CapacityError


@dataclass(frozen=True)
class CacheStats:
    """Rows probed and how many were served from HBM, summed over lookups.

    What a probe is depends on the path: the de-duplicating paths probe each distinct row of a
    lookup once; the fused kernel (no de-duplication) probes every requested row, so there the hit
    rate is the share of requested rows served from HBM.
    """

    probed_rows: int
    hit_rows: int

    @property
    def hit_rate(self) -> float:
        return self.hit_rows / self.probed_rows if self.probed_rows else 0.0


class HotRowCache:
    """Fixed copies of chosen rows of ``table`` on ``device``; probed through a row map."""

    def __init__(self, table: EngramTable, row_ids: torch.Tensor, device: torch.device | str) -> None:
        ids = torch.unique(row_ids.reshape(-1).to("cpu", torch.int64))
        if ids.numel() == 0:
            raise CapacityError(f"engram hot-row cache for {table.name!r}: no rows chosen; pass at least one row "
                                "id or run without a cache")
        table.check_indices(ids)
        self.table_name = table.name
        self.row_bytes = table.layout.row_bytes
        self.ids = ids
        self.host_map = RowMap.build(ids)
        self.row_map = self.host_map.to(device)
        self.rows = table.storage.index_select(0, ids.to(table.device)).to(device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # probed rows, hit rows

    @classmethod
    def from_counts(cls, table: EngramTable, counts: torch.Tensor, capacity_rows: int,
                    device: torch.device | str) -> HotRowCache:
        """Cache the ``capacity_rows`` rows with the highest ``counts`` (lookups per row of a profiling run).

        ``counts`` is ``[num_rows]``; rows never looked up are not cached, so the cache may hold fewer
        rows than asked for; ties go to the lower row id.
        """
        if capacity_rows < 1:
            raise CapacityError(f"engram hot-row cache for {table.name!r}: capacity_rows must be >= 1, "
                                f"got {capacity_rows}")
        if counts.shape != (table.layout.num_rows,):
            raise CapacityError(f"engram hot-row cache for {table.name!r}: counts must be [{table.layout.num_rows}] "
                                f"(one per table row), got {tuple(counts.shape)}")
        order = torch.sort(counts, descending=True, stable=True).indices[:capacity_rows]  # where counts live
        return cls(table, order[counts[order] > 0], device)

    @classmethod
    def from_observed(cls, table: EngramTable, observed: torch.Tensor, capacity_rows: int,
                      device: torch.device | str) -> HotRowCache:
        """Cache the ``capacity_rows`` rows seen most often in ``observed`` (indices of a profiling run)."""
        table.check_indices(observed.cpu())
        counts = torch.bincount(observed.reshape(-1).cpu(), minlength=table.layout.num_rows)
        return cls.from_counts(table, counts, capacity_rows, device)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def capacity_rows(self) -> int:
        return self.ids.numel()

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on its device: the rows, the row map and the counters."""
        return self.rows.numel() + self.row_map.nbytes + self.counts.numel() * self.counts.element_size()

    def probe(self, unique: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask, cache slot) for each entry of ``unique``; entries where ``valid`` is false never hit.

        Runs on the cache's device for indices there, else on the host map; a missed entry's slot is
        0, so it can index ``rows`` before being masked out.
        """
        row_map = self.row_map if unique.device == self.device else self.host_map
        slot = row_map.find(unique.to(row_map.entries.device)).to(unique.device)
        hit = valid & (slot != EMPTY_KEY)
        return hit, slot.clamp_(min=0)

    def record(self, probed: torch.Tensor, hits: torch.Tensor) -> None:
        """Add one lookup's probed-row and hit counts (device or host int64 scalars) to the counters."""
        self.counts[0] += probed.to(self.device).reshape(())
        self.counts[1] += hits.to(self.device).reshape(())

    def stats(self) -> CacheStats:
        """Counters so far; on a GPU it waits for the whole device first (lookups count on side streams)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        probed, hits = self.counts.tolist()
        return CacheStats(probed, hits)
