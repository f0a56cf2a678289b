"""Run each suite's sweep in a session (runner built, points measured in order, runner closed).

Also the sizes a default sweep uses where the user gave none, and ``quick_cells``: the default
``tiermem bench``, a quick sweep (< 60 s) of whatever this host has:
- with a GPU: pinned / pageable / ``dram``-tier H2D, D2H and both at once (raw ``copy_`` and the tiermem
  engine) at 64 KiB, 4 MiB, 64 MiB; UVA and CPU-staged gathers of 64 B..4 KiB rows; GPU latency;
- always: host-to-host copies between every NUMA node and the other host tiers (emulated CXL where
  there is no CXL memory, labelled so); CPU pointer-chase latency from every node with CPUs.
"""

from __future__ import annotations

from tiermem.bench.copy import CopyRunner, CopySweep, Direction, Engine, copy_points
from tiermem.bench.gather import GatherMethod, GatherRunner, GatherSweep, gather_points
from tiermem.bench.latency import LatencyRunner, LatencySweep, latency_points
from tiermem.bench.matrix import MatrixSweep, matrix_points
from tiermem.bench.memory import MemorySpec, parse_memory
from tiermem.bench.results import Cell
from tiermem.bench.session import Session
from tiermem.config import format_bytes

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
COPY_SIZES = (4 * KIB, 64 * KIB, MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB)
ROW_BYTES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LATENCY_MIN_BUFFER_BYTES = 256 * MIB
LLC_MULTIPLE = 4  # a chain this many times the last-level cache is (almost) never in it

QUICK_COPY_SIZES = (64 * KIB, 4 * MIB, 64 * MIB)
QUICK_H2H_SIZES = (MIB, 64 * MIB)
QUICK_ROW_BYTES = (64, 256, 1024, 4096)
QUICK_GATHER_BYTES = 8 * MIB
QUICK_TABLE_BYTES = 256 * MIB
QUICK_LATENCY_MIN_BUFFER_BYTES = 64 * MIB


def run_copy(session: Session, sweep: CopySweep, suite: str = "copy") -> list[Cell]:
    points = copy_points(sweep)
    runner = CopyRunner(session.memory, session.method, points)
    try:
        return session.measure(points, lambda p: runner.measure(p, suite), suite,
                               lambda p: f"{p.name(False)} {format_bytes(p.nbytes)}")
    finally:
        runner.close()


def run_matrix(session: Session, sweep: MatrixSweep) -> list[Cell]:
    points = matrix_points(sweep)
    runner = CopyRunner(session.memory, session.method, points)
    try:
        return session.measure(points, lambda p: runner.measure(p, "matrix"), "matrix",
                               lambda p: f"{p.src.label} -> {p.dst.label}")
    finally:
        runner.close()


def run_gather(session: Session, sweep: GatherSweep) -> list[Cell]:
    runner = GatherRunner(session.memory, session.method, sweep)
    return session.measure(gather_points(sweep), runner.measure, "gather",
                           lambda p: f"{p.name(False)} {p.row_bytes} B x {p.rows}")


def run_latency(session: Session, sweep: LatencySweep) -> list[Cell]:
    runner = LatencyRunner(session.memory, session.method, sweep)
    return session.measure(latency_points(sweep), runner.measure, "latency", lambda p: p.name(False))


def latency_buffer_bytes(session: Session, minimum: int = LATENCY_MIN_BUFFER_BYTES) -> int:
    """At least ``minimum`` and ``LLC_MULTIPLE`` x the last-level cache, a whole number of MiB."""
    llc = session.env["cpu"]["llc_bytes"] or 0
    return max(minimum, -(-LLC_MULTIPLE * llc // MIB) * MIB)


def host_memories(session: Session) -> list[MemorySpec]:
    """Every distinct host memory: each NUMA node, plus configured tiers other than ``dram`` (which is on a
    node already); just the configured tiers where libnuma is unusable."""
    nodes = session.node_memories()
    tiers = session.tier_memories()
    return nodes + [t for t in tiers if t.label != "dram"] if nodes else tiers


def gpu_host_memory(session: Session) -> MemorySpec:
    """The tier GPU copies use: ``dram`` (on the GPU's node by default), else the first configured tier."""
    tiers = session.tier_memories()
    return next((t for t in tiers if t.label == "dram"), tiers[0])


def quick_cells(session: Session) -> list[Cell]:
    host = host_memories(session)
    device = session.device_spec
    cells: list[Cell] = []
    if device is not None:
        pinned, pageable, tier = parse_memory("pinned"), parse_memory("pageable"), gpu_host_memory(session)
        cells += run_copy(session, CopySweep(
            directions=(Direction.H2D, Direction.D2H, Direction.BIDIR), memories=(pinned, pageable, tier),
            peers=(), sizes=QUICK_COPY_SIZES, engines=(Engine.TORCH, Engine.TIERMEM), device=device))
        cells += run_gather(session, GatherSweep(
            memories=(tier,), methods=(GatherMethod.UVA, GatherMethod.CPU_STAGED), row_bytes=QUICK_ROW_BYTES,
            gather_bytes=QUICK_GATHER_BYTES, table_bytes=QUICK_TABLE_BYTES, device=device))
    cells += run_copy(session, CopySweep(
        directions=(Direction.H2H,), memories=tuple(host), peers=tuple(host), sizes=QUICK_H2H_SIZES,
        engines=(Engine.TORCH, Engine.TIERMEM)))
    cells += run_latency(session, LatencySweep(
        memories=tuple(host) + ((device,) if device is not None else ()), cpu_nodes=session.cpu_reader_nodes(),
        device=device, buffer_bytes=latency_buffer_bytes(session, QUICK_LATENCY_MIN_BUFFER_BYTES)))
    return cells
