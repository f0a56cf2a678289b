"""Every GPU path of the bench on tiny sizes: engines, gathers, GPU latency (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tiermem.bench import suites
from tiermem.bench.copy import CopySweep, Direction, Engine
from tiermem.bench.gather import GatherMethod, GatherSweep
from tiermem.bench.latency import LatencySweep
from tiermem.bench.memory import parse_memory

pytestmark = pytest.mark.gpu

PINNED, PAGEABLE, DRAM, CXL = (parse_memory(n) for n in ("pinned", "pageable", "dram", "cxl"))
SIZES = (4096, 1 << 20)


def test_every_copy_engine_and_direction_moves_the_right_bytes(session):
    pytest.importorskip("triton")
    sweep = CopySweep(directions=tuple(Direction), memories=(PINNED, PAGEABLE, DRAM), peers=(DRAM,), sizes=SIZES,
                      engines=tuple(Engine), device=session.device_spec)
    cells = suites.run_copy(session, sweep)
    modes = {(c.params["direction"], c.params["engine"]) for c in cells}
    assert modes == {("h2d", e) for e in ("torch", "tiermem", "sm", "plain-loop")} | {
        ("d2h", e) for e in ("torch", "tiermem", "sm", "plain-loop")} | {
        ("bidir", "torch"), ("bidir", "tiermem"), ("d2d", "torch"), ("d2d", "tiermem"), ("d2d", "sm"),
        ("h2h", "torch"), ("h2h", "tiermem")}
    assert all(c.verified and c.median > 0 for c in cells)


def test_engine_tunings_are_recorded_in_extra(session):
    sweep = CopySweep(directions=(Direction.H2D,), memories=(DRAM,), peers=(), sizes=(1 << 20,),
                      engines=(Engine.TIERMEM,), chunk_bytes=(1 << 20,), streams=(1, 4), device=session.device_spec)
    cells = suites.run_copy(session, sweep)
    assert [(c.extra["chunk_bytes"], c.extra["streams"]) for c in cells] == [(1 << 20, 1), (1 << 20, 4)]


def test_every_gather_method_matches_index_select(session):
    pytest.importorskip("triton")
    sweep = GatherSweep(memories=(PINNED, DRAM), methods=tuple(GatherMethod), row_bytes=(64, 1024),
                        gather_bytes=256 << 10, table_bytes=8 << 20, staging_chunk_bytes=64 << 10,
                        device=session.device_spec)
    cells = suites.run_gather(session, sweep)
    assert len(cells) == 2 * len(GatherMethod) * 2 and all(c.verified for c in cells)


def test_gpu_latency_from_host_tiers_and_hbm(session):
    pytest.importorskip("triton")
    device = session.device_spec
    sweep = LatencySweep(memories=(DRAM, CXL, PINNED, device), cpu_nodes=(), device=device, buffer_bytes=8 << 20)
    cells = suites.run_latency(session, sweep)
    assert [c.params["memory"] for c in cells] == ["dram", "cxl", "pinned", str(torch.device("cuda", 0))]
    assert all(0 < c.median < 1e6 for c in cells)
    assert [c.emulated for c in cells] == [False, True, False, False]
