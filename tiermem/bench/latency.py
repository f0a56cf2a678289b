"""``latency`` suite: idle load latency by pointer chasing (MLC-style), from CPUs and from the GPU.

The chain is a random cyclic permutation of the cache lines of a buffer much larger than the last-level
cache: line ``i`` holds the index of the next line, so every load depends on the previous one and the
prefetchers cannot guess the address. Readers:
| reader | who chases                                | engine                                       |
|--------|-------------------------------------------|----------------------------------------------|
| cpu    | one thread bound to a NUMA node's CPUs    | numba ``@njit`` loop; without numba a Python |
|        | (MLC's latency matrix: node x memory)     | loop minus the same loop on an L1-sized chain |
| gpu    | one GPU thread, uncached loads (``.cv``)  | Triton; host memory read through UVA         |
A point reports nanoseconds per load. Figures on an emulated tier are DRAM figures, labelled emulated.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from tiermem import numa
from tiermem.bench import kernels
from tiermem.bench.memory import BenchMemory, MemoryKind, MemorySpec
from tiermem.bench.method import Clock, Method, Timing, measure
from tiermem.bench.results import Cell, latency_cell
from tiermem.errors import ConfigError, TopologyError, TransferError

try:
    import numba
except ImportError:  # optional: the Python fallback measures latency less directly
    numba = None

log = logging.getLogger("tiermem.bench")

LINE_BYTES = 64
CPU_LOADS_PER_OP = 1 << 16
GPU_LOADS_PER_OP = 1 << 12
L1_CHAIN_BYTES = 4096  # the Python fallback's baseline chain: 64 lines, always in L1
VERIFY_LOADS = 1000  # links each reader follows once, checked against the host-side walk


class Reader(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class LatencySweep:
    """Memories x readers."""

    memories: tuple[MemorySpec, ...]
    cpu_nodes: tuple[int | None, ...]  # one CPU reader per entry (None: not bound); () for no CPU reader
    device: MemorySpec | None = None  # the GPU reader; None for no GPU reader
    buffer_bytes: int = 256 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.memories:
            raise ConfigError("bench latency: give at least one memory")
        if self.buffer_bytes < 2 * L1_CHAIN_BYTES or self.buffer_bytes % LINE_BYTES:
            raise ConfigError(f"bench latency: buffer bytes must be a multiple of {LINE_BYTES} and >= "
                              f"{2 * L1_CHAIN_BYTES}; got {self.buffer_bytes}")
        if not self.cpu_nodes and self.device is None:
            raise ConfigError("bench latency: no reader; give a CPU node or a GPU")


@dataclass(frozen=True)
class LatencyPoint:
    memory: MemorySpec
    reader: Reader
    cpu_node: int | None = None

    def name(self, emulated: bool) -> str:
        who = f"cpu node:{self.cpu_node}" if self.reader is Reader.CPU and self.cpu_node is not None else self.reader.value
        return f"{who} <- {self.memory.label}" + (" [emulated]" if emulated else "")


def latency_points(sweep: LatencySweep) -> list[LatencyPoint]:
    points = []
    for memory in sweep.memories:
        if memory.is_host:
            points += [LatencyPoint(memory, Reader.CPU, node) for node in sweep.cpu_nodes]
        if sweep.device is not None and memory.kind is not MemoryKind.PAGEABLE:
            points.append(LatencyPoint(memory, Reader.GPU))
    return points


def build_chain(nbytes: int, seed: int) -> np.ndarray:
    """int64 words of a random cyclic chain over the lines of ``nbytes``: word 0 starts it."""
    stride = LINE_BYTES // 8
    lines = nbytes // LINE_BYTES
    order = np.random.default_rng(seed).permutation(lines)
    chain = np.zeros(lines * stride, dtype=np.int64)
    chain[order * stride] = np.roll(order, -1) * stride
    return chain


class LatencyRunner:
    """Writes one chain per memory (once) and chases it with each reader."""

    def __init__(self, memory: BenchMemory, method: Method, sweep: LatencySweep) -> None:
        self.memory = memory
        self.method = method
        self.sweep = sweep
        self._chains: dict[str, torch.Tensor] = {}
        self._reference: np.ndarray | None = None  # the chain as built, shared by every memory
        for spec in sweep.memories:
            memory.check(spec)
        for node in sweep.cpu_nodes:
            if node is not None:
                numa.check_node(node)

    def measure(self, point: LatencyPoint) -> Cell:
        chain = self._chain(point.memory)
        emulated = self.memory.emulated(point.memory)
        if point.reader is Reader.GPU:
            kernels.require_triton()
            engine, loads = "triton", GPU_LOADS_PER_OP
            workload = GpuChase(chain, loads, torch.device(self.sweep.device.label))
            self._verify(point, workload.walk(VERIFY_LOADS))
            timing = measure(workload, self.method, Clock.CUDA_EVENTS)
            baseline_ns = 0.0
        else:
            engine, loads = ("numba" if numba is not None else "python"), CPU_LOADS_PER_OP
            self._verify(point, chase_cpu(chain.numpy(), 0, VERIFY_LOADS))
            with bound_to(point.cpu_node):
                timing = measure(CpuChase(chain.numpy(), loads), self.method, Clock.PERF_COUNTER)
                baseline_ns = 0.0 if numba is not None else self._python_loop_ns()
        if baseline_ns:  # the Python fallback: take the interpreter's share out of every trial
            timing = replace(timing, seconds_per_op=tuple(s - baseline_ns * 1e-9 * loads
                                                          for s in timing.seconds_per_op))
            _check_separable(timing, baseline_ns)
        cell = latency_cell(
            suite="latency", name=point.name(emulated), loads_per_op=loads, timing=timing, quick=self.method.quick,
            emulated=emulated, params={
                "reader": point.reader.value, "cpu_node": point.cpu_node, "memory": point.memory.label,
                "device": self.sweep.device.label if point.reader is Reader.GPU else None,
                "buffer_bytes": self.sweep.buffer_bytes, "line_bytes": LINE_BYTES, "engine": engine,
            })
        return replace(cell, extra={"python_loop_ns_subtracted": round(baseline_ns, 3)}) if baseline_ns else cell

    def _chain(self, spec: MemorySpec) -> torch.Tensor:
        if spec.label not in self._chains:
            if self._reference is None:
                self._reference = build_chain(self.sweep.buffer_bytes, self.sweep.seed)
            pool = self.memory.pool(spec, "chain", self.sweep.buffer_bytes, fill=False)
            words = pool.narrow(0, 0, self.sweep.buffer_bytes).view(torch.int64)
            words.copy_(torch.from_numpy(self._reference))
            self._chains[spec.label] = words
        return self._chains[spec.label]

    def _verify(self, point: LatencyPoint, reached: int) -> None:
        """The reader must land where the chain, walked on the host copy it was written from, leads."""
        expected = chase_python(self._reference, 0, VERIFY_LOADS)
        if reached != expected:
            raise TransferError(
                f"bench latency: {point.name(False)} reached word {reached} after {VERIFY_LOADS} loads, the chain "
                f"leads to word {expected}: the reader does not see the bytes written, so no latency is reported")

    def _python_loop_ns(self) -> float:
        """Per-load time of the Python loop on a chain that stays in L1: the interpreter's share."""
        chain = build_chain(L1_CHAIN_BYTES, self.sweep.seed)
        timing = measure(CpuChase(chain, CPU_LOADS_PER_OP), self.method, Clock.PERF_COUNTER)
        return min(timing.seconds_per_op) / CPU_LOADS_PER_OP * 1e9


class CpuChase:
    """Chase ``loads`` links per operation, continuing where the previous operation stopped."""

    def __init__(self, chain: np.ndarray, loads: int) -> None:
        self.chain = chain
        self.loads = loads
        self.position = 0

    def begin(self) -> None:
        """Nothing: the chase is synchronous."""

    def run(self, iteration: int) -> None:
        self.position = chase_cpu(self.chain, self.position, self.loads)

    def fence(self) -> None:
        """Nothing: the chase is synchronous."""


class GpuChase:
    """One GPU thread chasing ``loads`` links per operation, continuing where the previous one stopped."""

    def __init__(self, chain: torch.Tensor, loads: int, device: torch.device) -> None:
        self.chain = chain
        self.loads = loads
        self.state = torch.zeros(1, dtype=torch.int64, device=device)

    def begin(self) -> None:
        """Nothing: the kernel runs on the current stream."""

    def run(self, iteration: int) -> None:
        kernels.chase(self.chain, self.loads, self.state)

    def walk(self, loads: int) -> int:
        """Chase ``loads`` links from word 0 and return where the GPU landed (for verification)."""
        self.state.zero_()
        kernels.chase(self.chain, loads, self.state)
        return int(self.state.item())

    def fence(self) -> None:
        """Nothing: the kernel runs on the current stream."""


def chase_cpu(chain: np.ndarray, start: int, loads: int) -> int:
    """Follow ``loads`` links from word ``start``; returns where it stopped (numba, else Python)."""
    if numba is not None:
        return int(_chase_numba(chain, start, loads))
    return chase_python(chain, start, loads)


def chase_python(chain: np.ndarray, start: int, loads: int) -> int:
    words = memoryview(chain)
    index = start
    for _ in range(loads):
        index = words[index]
    return index


if numba is not None:

    @numba.njit(nogil=True, cache=False)
    def _chase_numba(chain, start, loads):
        index = start
        for _ in range(loads):
            index = chain[index]
        return index


@contextlib.contextmanager
def bound_to(node: int | None) -> Iterator[None]:
    """Run the calling thread on ``node``'s CPUs inside the block (no binding when ``node`` is None)."""
    if node is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    numa.run_on_node(node)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _check_separable(timing: Timing, baseline_ns: float) -> None:
    if min(timing.seconds_per_op) <= 0:
        raise TopologyError(
            f"bench latency: the Python fallback could not separate memory latency from interpreter time "
            f"({baseline_ns:.1f} ns per load in L1 alone); install numba (pip install numba) and rerun")
