"""Shared pytest fixtures: small tier managers, the path of the shared routing traces, a script runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiermem.manager import TierManager

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACES_DIR = REPO_ROOT.parent / "shared" / "data" / "traces"

SMALL_TIER_BYTES = 4 << 20


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not TRACES_DIR.is_dir():
        pytest.skip(f"shared routing traces not found at {TRACES_DIR}")
    return TRACES_DIR


@pytest.fixture
def manager():
    """dram + emulated cxl + sim (no modelled time), 4 MiB each: fast to build on a CPU."""
    config = {"tiers": [
        {"kind": "dram", "capacity_bytes": SMALL_TIER_BYTES, "arena_bytes": "1MiB"},
        {"kind": "cxl", "backing": "emulated", "capacity_bytes": SMALL_TIER_BYTES, "arena_bytes": "1MiB"},
        {"kind": "sim", "capacity_bytes": SMALL_TIER_BYTES, "model_time": False, "arena_bytes": "1MiB"},
    ]}
    with TierManager.from_config(config) as tm:
        yield tm


@pytest.fixture
def run_script():
    """Run a Python script in a fresh process that must print ``ok``; ``interpret=True`` runs Triton kernels in
    Triton's interpreter on CPU tensors (skipped without Triton)."""
    def run(script: str, *, interpret: bool, timeout_s: float = 120) -> None:
        if interpret:
            pytest.importorskip("triton")
        env = {**os.environ, "TRITON_INTERPRET": "1"} if interpret else dict(os.environ)
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                                text=True, timeout=timeout_s, check=False)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    return run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
