"""Fixtures of the bench tests: tiny methods, a tier config with dram, emulated cxl and sim, synthetic cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiermem.bench.method import Method
from tiermem.bench.results import Cell, Metric
from tiermem.bench.session import Session, SessionOptions

TINY = Method(trials=3, min_trial_s=0.002, warmup=1, rotations=2, quick=True)
SIM_BANDWIDTH_GBPS = 0.5
TIERS_TOML = f"""
[[tiers]]
kind = "dram"
capacity_bytes = "64MiB"
arena_bytes = "8MiB"

[[tiers]]
kind = "cxl"
backing = "emulated"
capacity_bytes = "64MiB"
arena_bytes = "8MiB"

[[tiers]]
kind = "sim"
capacity_bytes = "64MiB"
arena_bytes = "8MiB"
bandwidth_gbps = {SIM_BANDWIDTH_GBPS}
latency_us = 0.0
"""


@pytest.fixture
def sim_bandwidth_gbps() -> float:
    """Modelled bandwidth of the ``sim`` tier in ``tier_config``."""
    return SIM_BANDWIDTH_GBPS


@pytest.fixture
def tier_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(TIERS_TOML)
    return path


@pytest.fixture
def session(tmp_path: Path, tier_config: Path):
    options = SessionOptions(method=TINY, out_dir=tmp_path / "results", tier_config=tier_config, progress=False,
                             command="pytest")
    with Session(options, name="test") as s:
        yield s


@pytest.fixture
def make_cell():
    """Factory of synthetic cells (see ``_cell``)."""
    return _cell


def _cell(name: str = "h2d pinned torch", median: float = 50.0, *, suite: str = "copy",
              metric: Metric = Metric.GBPS, fingerprint: str = "f" * 12, emulated: bool = False, **params) -> Cell:
    """A synthetic cell whose samples straddle ``median`` by 1%."""
    samples = (median * 0.99, median, median * 1.01)
    return Cell(suite=suite, name=name, params={"bytes": 1 << 26, **params}, bytes=1 << 26, metric=metric,
                median=median, min=samples[0], max=samples[2], samples=samples, trials=3, iterations=10,
                clock="cuda-events", quick=False, emulated=emulated, verified=True, fingerprint=fingerprint)
