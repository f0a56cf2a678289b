"""The acceptance checks of the foundation (issue 2) and of ``tiermem bench`` (issue 3), over one run's cells.

| check                 | requirement                                                                   |
|-----------------------|-------------------------------------------------------------------------------|
| engine-h2d            | tiermem engine, ``dram`` -> GPU, >= 95% of raw ``copy_`` from ``pinned``,       |
|                       | at every size from 64 MiB to 1 GiB                                             |
| engine-bidir          | both directions at once, tiermem ``dram`` >= 90% of raw ``pinned`` bidir      |
| harness-h2d           | the reported raw pinned H2D within 5% of the plain copy loop, sizes >= 64 MiB |
| uva-gather-1k         | UVA gather of 1 KiB rows >= 40 GB/s (best table memory)                       |
| small-rows            | rows <= 256 B through the better method >= 15 GB/s, at every such row size    |
Ratios compare cells of the same run (same fingerprint) and use the engine's default settings (cells
whose ``chunk_bytes``/``streams`` params are None). A check without its cells is "not measured".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tiermem.bench.results import Cell

LARGE_MIN_BYTES = 64 << 20
LARGE_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """One requirement and what was measured against it (``passed`` None: not measured)."""

    name: str
    requirement: str
    value: float | None
    passed: bool | None
    detail: str


def run_checks(cells: Sequence[Cell]) -> list[Check]:
    return [
        _ratio_check("engine-h2d", "tiermem dram->GPU >= 0.95 x raw pinned copy_, 64 MiB..1 GiB", cells,
                     new={"direction": "h2d", "engine": "tiermem", "src": "dram"},
                     base={"direction": "h2d", "engine": "torch", "src": "pinned"}, low=0.95),
        _ratio_check("engine-bidir", "tiermem bidir (dram) >= 0.90 x raw pinned bidir, 64 MiB..1 GiB", cells,
                     new={"direction": "bidir", "engine": "tiermem", "src": "dram"},
                     base={"direction": "bidir", "engine": "torch", "src": "pinned"}, low=0.90),
        _ratio_check("harness-h2d", "reported pinned H2D within 5% of a plain copy_ loop, >= 64 MiB", cells,
                     new={"direction": "h2d", "engine": "torch", "src": "pinned"},
                     base={"direction": "h2d", "engine": "plain-loop", "src": "pinned"}, low=0.95, high=1.05),
        _uva_1k(cells),
        _small_rows(cells),
    ]


def all_passed(checks: Iterable[Check]) -> bool:
    """True when every measured check passed (unmeasured checks neither pass nor fail)."""
    return all(c.passed is not False for c in checks)


def _select(cells: Sequence[Cell], suite: str, **params: Any) -> list[Cell]:
    return [c for c in cells if c.suite == suite and all(c.params.get(k) == v for k, v in params.items())]


def _large_copy(cells: Sequence[Cell], **params: Any) -> dict[int, Cell]:
    chosen = _select(cells, "copy", chunk_bytes=None, streams=None, **params)
    return {c.params["bytes"]: c for c in chosen if LARGE_MIN_BYTES <= c.params["bytes"] <= LARGE_MAX_BYTES}


def _ratio_check(name: str, requirement: str, cells: Sequence[Cell], *, new: dict, base: dict, low: float,
                 high: float = float("inf")) -> Check:
    ours, theirs = _large_copy(cells, **new), _large_copy(cells, **base)
    sizes = sorted(s for s in ours if s in theirs and ours[s].fingerprint == theirs[s].fingerprint)
    if not sizes:
        return Check(name, requirement, None, None, "no pair of cells of the same run at 64 MiB..1 GiB")
    ratios = {s: ours[s].median / theirs[s].median for s in sizes}
    worst = max(ratios.values(), key=lambda r: max(low - r, r - high))  # the furthest from passing
    detail = ", ".join(f"{s >> 20} MiB: {ours[s].median:.1f}/{theirs[s].median:.1f} = {r:.3f}"
                       for s, r in ratios.items())
    return Check(name, requirement, worst, all(low <= r <= high for r in ratios.values()), detail)


def _uva_1k(cells: Sequence[Cell]) -> Check:
    requirement = "UVA gather, 1 KiB rows >= 40 GB/s"
    found = _select(cells, "gather", method="uva", row_bytes=1024)
    if not found:
        return Check("uva-gather-1k", requirement, None, None, "no UVA gather cell with 1 KiB rows")
    best = max(found, key=lambda c: c.median)
    detail = ", ".join(f"{c.params['memory']}: {c.median:.1f}" for c in found)
    return Check("uva-gather-1k", requirement, best.median, best.median >= 40.0, detail)


def _small_rows(cells: Sequence[Cell]) -> Check:
    requirement = "rows <= 256 B, better method >= 15 GB/s at every row size"
    small = [c for c in _select(cells, "gather") if c.params["row_bytes"] <= 256 and c.params["method"] != "host"]
    if not small:
        return Check("small-rows", requirement, None, None, "no GPU gather cell with rows <= 256 B")
    best: dict[int, Cell] = {}
    for cell in small:
        row_bytes = cell.params["row_bytes"]
        if row_bytes not in best or cell.median > best[row_bytes].median:
            best[row_bytes] = cell
    worst = min(best.values(), key=lambda c: c.median)
    detail = ", ".join(f"{b} B: {c.median:.1f} ({c.params['method']}, {c.params['memory']})"
                       for b, c in sorted(best.items()))
    return Check("small-rows", requirement, worst.median, worst.median >= 15.0, detail)

