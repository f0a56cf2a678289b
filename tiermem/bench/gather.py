"""``gather`` suite: scattered rows of a host table into contiguous memory, by method x row bytes x rows.

This is the access pattern of Engram tables and of small experts: many independent rows at random
places. Methods:
| method      | what runs                                                                         |
|-------------|-----------------------------------------------------------------------------------|
| uva         | a Triton kernel on the GPU reads each row of the host table through its UVA       |
|             | pointer (zero-copy; the table must be pinned or a tiermem host tier)              |
| cpu-staged  | ``torch.index_select`` (torch's CPU threads) into pinned staging chunks, each     |
|             | copied to the GPU while the next chunk is gathered (a ring of staging slots)      |
| naive       | ``table[index]`` into a new pageable tensor, then ``copy_`` to the GPU            |
| host        | ``index_select`` into host memory, no GPU (e.g. CXL or a remote node -> DRAM)     |
Bandwidth counts the gathered bytes (rows x row bytes) per second. Indices are uniform random over the
whole table, drawn from a seeded generator; every slot is verified against ``index_select`` on the CPU.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tiermem.bench import kernels
from tiermem.bench.memory import BenchMemory, MemoryKind, MemorySpec, poison, pool_bytes, slots, verify_equal
from tiermem.bench.method import Clock, Method, measure
from tiermem.bench.results import Cell, bandwidth_cell
from tiermem.errors import ConfigError, TopologyError

STAGING_SLOTS = 3
PAGEABLE = MemorySpec("pageable", MemoryKind.PAGEABLE)
PINNED = MemorySpec("pinned", MemoryKind.PINNED)


class GatherMethod(str, enum.Enum):
    UVA = "uva"
    CPU_STAGED = "cpu-staged"
    NAIVE = "naive"
    HOST = "host"

    @property
    def needs_gpu(self) -> bool:
        return self is not GatherMethod.HOST


@dataclass(frozen=True)
class GatherSweep:
    """Tables x methods x row sizes x row counts."""

    memories: tuple[MemorySpec, ...]
    methods: tuple[GatherMethod, ...]
    row_bytes: tuple[int, ...]
    rows: tuple[int, ...] = ()  # rows per gather; () means gather_bytes // row_bytes
    gather_bytes: int = 16 << 20
    table_bytes: int = 1 << 30
    staging_chunk_bytes: int = 4 << 20
    device: MemorySpec | None = None
    destination: MemorySpec = PAGEABLE  # where the host method puts rows
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.memories and self.methods and self.row_bytes):
            raise ConfigError("bench gather: give at least one memory, method and row size")
        if not all(m.is_host for m in (*self.memories, self.destination)):
            raise ConfigError("bench gather: tables and the host method's destination live in host memory; "
                              f"got {[m.label for m in (*self.memories, self.destination) if not m.is_host]}")
        bad = [b for b in self.row_bytes if b < 16 or b % 16 or b > self.table_bytes]
        if bad:
            raise ConfigError(f"bench gather: row bytes {bad} are not multiples of 16 between 16 and the table "
                              f"size ({self.table_bytes} bytes); e.g. 64, 160 (80 bf16), 1024")
        if any(r < 1 for r in self.rows) or self.gather_bytes < 16 or self.staging_chunk_bytes < 16:
            raise ConfigError("bench gather: rows, gather bytes and staging chunk bytes must be positive")
        if any(m.needs_gpu for m in self.methods) and self.device is None:
            raise TopologyError(
                f"bench gather: methods {[m.value for m in self.methods if m.needs_gpu]} need a CUDA GPU, which "
                "is not available here; use --method host on this host")


@dataclass(frozen=True)
class GatherPoint:
    memory: MemorySpec
    method: GatherMethod
    row_bytes: int
    rows: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def name(self, emulated: bool) -> str:
        return f"gather {self.memory.label} {self.method.value}" + (" [emulated]" if emulated else "")


def gather_points(sweep: GatherSweep) -> list[GatherPoint]:
    points = []
    for memory in sweep.memories:
        for method in sweep.methods:
            if method is GatherMethod.UVA and memory.kind is MemoryKind.PAGEABLE:
                continue  # a kernel cannot read pageable memory
            for row_bytes in sweep.row_bytes:
                counts = sweep.rows or (max(1, sweep.gather_bytes // row_bytes),)
                points += [GatherPoint(memory, method, row_bytes, rows) for rows in counts]
    return points


class GatherRunner:
    """Measures gather points; the table is one pool per memory, viewed as rows of each size."""

    def __init__(self, memory: BenchMemory, method: Method, sweep: GatherSweep) -> None:
        self.memory = memory
        self.method = method
        self.sweep = sweep
        for spec in (*sweep.memories, sweep.destination, *([sweep.device] if sweep.device else [])):
            memory.check(spec)

    def measure(self, point: GatherPoint) -> Cell:
        sweep = self.sweep
        table_rows = sweep.table_bytes // point.row_bytes
        table = (self.memory.pool(point.memory, "table", sweep.table_bytes, fill=True)
                 .narrow(0, 0, table_rows * point.row_bytes).view(table_rows, point.row_bytes))
        generator = torch.Generator().manual_seed(sweep.seed)
        indices = [torch.randint(0, table_rows, (point.rows,), generator=generator)
                   for _ in range(self.method.rotations)]
        out_spec = sweep.destination if point.method is GatherMethod.HOST else sweep.device
        out_pool = self.memory.pool(out_spec, "gather-out", pool_bytes(point.nbytes, self.method.rotations), fill=False)
        outs = [s.view(point.rows, point.row_bytes) for s in slots(out_pool, point.nbytes, self.method.rotations)]
        indices = indices[:len(outs)]
        workload = self._workload(point, table, indices, outs)
        clock = Clock.PERF_COUNTER if point.method is GatherMethod.HOST else Clock.CUDA_EVENTS
        poison(outs)
        timing = measure(workload, self.method, clock)
        emulated = self.memory.emulated(point.memory)
        used = min(len(outs), timing.iterations)
        verify_equal([(table.index_select(0, indices[k]), outs[k]) for k in range(used)],
                     f"{point.name(emulated)} {point.row_bytes} B rows")
        params = {
            "memory": point.memory.label, "method": point.method.value, "row_bytes": point.row_bytes,
            "rows": point.rows, "table_bytes": table_rows * point.row_bytes,
            "device": sweep.device.label if point.method.needs_gpu else None,
            "destination": sweep.destination.label if point.method is GatherMethod.HOST else None,
            "cpu_threads": torch.get_num_threads() if point.method is not GatherMethod.UVA else None,
            "staging_chunk_bytes": sweep.staging_chunk_bytes if point.method is GatherMethod.CPU_STAGED else None,
        }
        return bandwidth_cell(suite="gather", name=point.name(emulated), params=params, nbytes=point.nbytes,
                              timing=timing, quick=self.method.quick, emulated=emulated, verified=True)

    def _workload(self, point: GatherPoint, table: torch.Tensor, indices: list[torch.Tensor],
                  outs: list[torch.Tensor]):
        if point.method is GatherMethod.UVA:
            kernels.require_triton()
            return UvaGather(table, [i.to(outs[0].device) for i in indices], outs)
        if point.method is GatherMethod.CPU_STAGED:
            chunk_rows = max(1, self.sweep.staging_chunk_bytes // point.row_bytes)
            staging_bytes = chunk_rows * point.row_bytes
            pool = self.memory.pool(PINNED, "staging", pool_bytes(staging_bytes, STAGING_SLOTS), fill=False)
            staging = [s.view(chunk_rows, point.row_bytes) for s in slots(pool, staging_bytes, STAGING_SLOTS)]
            return StagedGather(table, indices, outs, staging)
        if point.method is GatherMethod.NAIVE:
            return NaiveGather(table, indices, outs)
        return HostGather(table, indices, outs)


class UvaGather:
    """The Triton UVA gather kernel on the current stream."""

    def __init__(self, table: torch.Tensor, indices: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        self.table, self.indices, self.outs = table, indices, outs

    def begin(self) -> None:
        """Nothing: the kernel runs on the current stream."""

    def run(self, iteration: int) -> None:
        slot = iteration % len(self.outs)
        kernels.uva_gather(self.table, self.indices[slot], self.outs[slot])

    def fence(self) -> None:
        """Nothing: the kernel runs on the current stream."""


class StagedGather:
    """CPU gather into a ring of pinned staging chunks; each chunk's copy overlaps the next chunk's gather.

    A staging slot is reused only after the copy that read it has completed (its event).
    """

    def __init__(self, table: torch.Tensor, indices: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                 staging: Sequence[torch.Tensor]) -> None:
        self.table, self.indices, self.outs, self.staging = table, indices, outs, staging
        self.events = [torch.cuda.Event() for _ in staging]
        self.stream = torch.cuda.Stream()
        self._next = 0

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())

    def run(self, iteration: int) -> None:
        slot = iteration % len(self.outs)
        index, out = self.indices[slot], self.outs[slot]
        chunk_rows = self.staging[0].shape[0]
        for start in range(0, index.numel(), chunk_rows):
            rows = min(chunk_rows, index.numel() - start)
            ring = self._next % len(self.staging)
            self._next += 1
            self.events[ring].synchronize()
            stage = self.staging[ring].narrow(0, 0, rows)
            torch.index_select(self.table, 0, index.narrow(0, start, rows), out=stage)
            with torch.cuda.stream(self.stream):
                out.narrow(0, start, rows).copy_(stage, non_blocking=True)
                self.events[ring].record(self.stream)

    def fence(self) -> None:
        torch.cuda.current_stream().wait_stream(self.stream)


class NaiveGather:
    """``table[index]`` (a new pageable tensor), then a pageable copy to the GPU."""

    def __init__(self, table: torch.Tensor, indices: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        self.table, self.indices, self.outs = table, indices, outs

    def begin(self) -> None:
        """Nothing: copies run on the current stream."""

    def run(self, iteration: int) -> None:
        slot = iteration % len(self.outs)
        self.outs[slot].copy_(self.table[self.indices[slot]])

    def fence(self) -> None:
        """Nothing: copies run on the current stream."""


class HostGather:
    """``index_select`` into host memory (torch's CPU threads)."""

    def __init__(self, table: torch.Tensor, indices: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        self.table, self.indices, self.outs = table, indices, outs

    def begin(self) -> None:
        """Nothing: the gather is synchronous."""

    def run(self, iteration: int) -> None:
        slot = iteration % len(self.outs)
        torch.index_select(self.table, 0, self.indices[slot], out=self.outs[slot])

    def fence(self) -> None:
        """Nothing: the gather is synchronous."""

