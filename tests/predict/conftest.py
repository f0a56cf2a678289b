"""Fixtures of the route-prediction tests: the shared real traces and a single torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "traces"


@pytest.fixture
def shared_traces() -> Path:
    """``../shared/data/traces`` beside the checkout; tests using it skip where it is absent."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"real traces not found at {SHARED_TRACES}")
    return SHARED_TRACES.resolve()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny; one thread is fastest and keeps timings steady on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
