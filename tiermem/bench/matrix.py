"""``matrix`` suite: copy bandwidth between every pair of memories at one size (nvbandwidth style).

Endpoints are memory names (``node:N``, tiers, ``pinned``, ``cuda:N``); each ordered pair is one copy
point measured with one engine (default ``torch``: the copy engines for GPU paths, torch's parallel
memcpy between host memories). Cells are ordinary copy cells of suite ``matrix``; ``report`` lays them
out as a source x destination grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.bench.copy import CopyPoint, Engine, direction_between, supported
from tiermem.bench.memory import MemorySpec
from tiermem.errors import ConfigError


@dataclass(frozen=True)
class MatrixSweep:
    endpoints: tuple[MemorySpec, ...]
    nbytes: int = 256 << 20
    engine: Engine = Engine.TORCH

    def __post_init__(self) -> None:
        if len(self.endpoints) < 1:
            raise ConfigError("bench matrix: give at least one endpoint")
        if self.nbytes < 16 or self.nbytes % 16:
            raise ConfigError(f"bench matrix: size must be a multiple of 16 bytes, got {self.nbytes}")
        if self.engine not in (Engine.TORCH, Engine.TIERMEM):
            raise ConfigError(f"bench matrix: engine must be torch or tiermem, got {self.engine.value!r}")


def matrix_points(sweep: MatrixSweep) -> list[CopyPoint]:
    """Every ordered pair of endpoints the engine can copy between (row-major: source, then destination)."""
    points = []
    for src in sweep.endpoints:
        for dst in sweep.endpoints:
            direction = direction_between(src, dst)
            if supported(direction, sweep.engine, src, dst):
                points.append(CopyPoint(direction, sweep.engine, sweep.nbytes, src, dst))
    return points
