"""Fixtures of the simulator tests."""

from __future__ import annotations

import pytest

from tiermem.simulate import CostModel
from tiermem.types import LinkProfile


@pytest.fixture
def cost_model() -> CostModel:
    """1 MB experts over a 1 GB/s, 0-latency link: one copy takes exactly 1 ms; compute 100 us + 10 us/expert."""
    return CostModel(link=LinkProfile(bandwidth_gbps=1.0, latency_us=0.0), expert_bytes=10**6,
                     compute_fixed_us=100.0, compute_per_expert_us=10.0)
