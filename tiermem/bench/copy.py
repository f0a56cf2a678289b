"""``copy`` suite: bandwidth of whole-object copies by direction x memory x size x engine (x chunk x streams).

Engines, measured side by side in the same run so that ratios between them mean something:
| engine       | what runs                                                                       |
|--------------|---------------------------------------------------------------------------------|
| torch        | ``dst.copy_(src, non_blocking=True)``: cudaMemcpyAsync on one stream (one per    |
|              | direction for bidir); on the host, torch's parallel memcpy. The raw baseline.   |
| tiermem      | ``TierManager.copy`` (the transfer engine: chunks over per-direction streams or  |
|              | host threads); ``chunk_bytes``/``streams`` build an engine with those settings   |
| sm           | a Triton load/store kernel: GPU threads read/write host memory through UVA       |
| plain-loop   | the reference for the harness itself: copy_ of one buffer pair in a loop timed  |
|              | with perf_counter and torch.cuda.synchronize (H2D/D2H only)                     |
Invalid combinations (pageable memory with tiermem or sm, sm on the host...) are not generated.
Every point is verified after timing: each destination slot used must equal its source slot.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from tiermem.bench import kernels
from tiermem.bench.memory import BenchMemory, MemoryKind, MemorySpec, poison, pool_bytes, slots, verify_equal
from tiermem.bench.method import Clock, Method, measure
from tiermem.bench.results import Cell, bandwidth_cell
from tiermem.config import format_bytes
from tiermem.errors import ConfigError, TopologyError
from tiermem.transfer import TransferConfig, TransferEngine, TransferHandle

Pair = tuple[torch.Tensor, torch.Tensor]


class Direction(str, enum.Enum):
    H2D = "h2d"
    D2H = "d2h"
    D2D = "d2d"
    H2H = "h2h"
    BIDIR = "bidir"  # H2D and D2H at once

    @property
    def needs_gpu(self) -> bool:
        return self is not Direction.H2H


class Engine(str, enum.Enum):
    TORCH = "torch"
    TIERMEM = "tiermem"
    SM = "sm"
    PLAIN_LOOP = "plain-loop"


@dataclass(frozen=True)
class CopySweep:
    """What the copy suite measures: the cross product, minus combinations that cannot run."""

    directions: tuple[Direction, ...]
    memories: tuple[MemorySpec, ...]  # the host side (H2H: the sources)
    peers: tuple[MemorySpec, ...]  # H2H destinations
    sizes: tuple[int, ...]
    engines: tuple[Engine, ...]
    chunk_bytes: tuple[int | None, ...] = (None,)  # tiermem engine only; None: the manager's settings
    streams: tuple[int | None, ...] = (None,)
    device: MemorySpec | None = None  # the GPU side

    def __post_init__(self) -> None:
        if not (self.directions and self.sizes and self.engines):
            raise ConfigError("bench copy: give at least one direction, size and engine")
        if any(s < 16 or s % 16 for s in self.sizes):
            raise ConfigError(f"bench copy: sizes must be multiples of 16 bytes, >= 16; got {list(self.sizes)}")
        if any(d.needs_gpu for d in self.directions) and self.device is None:
            raise TopologyError(
                f"bench copy: directions {[d.value for d in self.directions if d.needs_gpu]} need a CUDA GPU, "
                "which is not available here; use --direction h2h on this host")


@dataclass(frozen=True)
class CopyPoint:
    """One copy of ``nbytes`` from ``src`` to ``dst`` (bidir: and from ``dst`` back to ``src`` at once)."""

    direction: Direction
    engine: Engine
    nbytes: int
    src: MemorySpec
    dst: MemorySpec
    chunk_bytes: int | None = None
    streams: int | None = None

    @property
    def moved_bytes(self) -> int:
        return 2 * self.nbytes if self.direction is Direction.BIDIR else self.nbytes

    def params(self) -> dict:
        return {"direction": self.direction.value, "engine": self.engine.value, "bytes": self.nbytes,
                "src": self.src.label, "dst": self.dst.label, "chunk_bytes": self.chunk_bytes,
                "streams": self.streams}

    def name(self, emulated: bool) -> str:
        """The mode: direction, memory (the host side, or src->dst) and engine; the size is not part of it."""
        host = self.dst if self.direction is Direction.D2H else self.src
        where = (f"{self.src.label}->{self.dst.label}" if self.direction in (Direction.H2H, Direction.D2D)
                 else host.label)
        parts = [self.direction.value, where, self.engine.value]
        if self.chunk_bytes is not None or self.streams is not None:
            chunk = format_bytes(self.chunk_bytes) if self.chunk_bytes else "default chunk"
            parts.append(f"{chunk} x{self.streams or 'default'}")
        return " ".join(parts) + (" [emulated]" if emulated else "")


def direction_between(src: MemorySpec, dst: MemorySpec) -> Direction:
    if src.is_host:
        return Direction.H2H if dst.is_host else Direction.H2D
    return Direction.D2H if dst.is_host else Direction.D2D


def copy_points(sweep: CopySweep) -> list[CopyPoint]:
    """Every valid point of the sweep, sizes innermost (one plot line per mode)."""
    points = []
    for direction in sweep.directions:
        for src, dst in _ends(direction, sweep):
            for engine in sweep.engines:
                if not supported(direction, engine, src, dst):
                    continue
                tunings = ([(c, s) for c in sweep.chunk_bytes for s in sweep.streams]
                           if engine is Engine.TIERMEM else [(None, None)])
                for chunk, streams in tunings:
                    points += [CopyPoint(direction, engine, size, src, dst, chunk, streams) for size in sweep.sizes]
    return points


def _ends(direction: Direction, sweep: CopySweep) -> list[tuple[MemorySpec, MemorySpec]]:
    device = sweep.device
    if direction is Direction.H2H:
        return [(src, dst) for src in sweep.memories for dst in sweep.peers]
    if direction is Direction.D2D:
        return [(device, device)]
    if direction is Direction.D2H:
        return [(device, host) for host in sweep.memories]
    return [(host, device) for host in sweep.memories]


def supported(direction: Direction, engine: Engine, src: MemorySpec, dst: MemorySpec) -> bool:
    if direction_between(src, dst) is not (Direction.H2D if direction is Direction.BIDIR else direction):
        return False  # e.g. a GPU named among the host memories
    pageable = MemoryKind.PAGEABLE in (src.kind, dst.kind)
    if engine is Engine.PLAIN_LOOP:
        return direction in (Direction.H2D, Direction.D2H)
    if engine is Engine.SM:
        return direction in (Direction.H2D, Direction.D2H, Direction.D2D) and not pageable
    if engine is Engine.TIERMEM:
        return not pageable
    return True


class CopyRunner:
    """Measures copy points on one BenchMemory; owns the extra transfer engines of chunk/streams points."""

    def __init__(self, memory: BenchMemory, method: Method, points: Sequence[CopyPoint]) -> None:
        self.memory = memory
        self.method = method
        self._pool_bytes = pool_bytes(max((p.nbytes for p in points), default=16), method.rotations)
        self._engines: dict[tuple[int, int], TransferEngine] = {}
        for point in points:  # fail on a bad memory name before measuring anything
            memory.check(point.src)
            memory.check(point.dst)

    def measure(self, point: CopyPoint, suite: str = "copy") -> Cell:
        lanes = self._lanes(point)
        emulated = self.memory.emulated(point.src) or self.memory.emulated(point.dst)
        workload, clock = self._workload(point, lanes)
        poison([dst for lane in lanes for _, dst in lane])
        timing = measure(workload, self.method, clock)
        verify_equal([pair for lane in lanes for pair in lane[:timing.iterations]], f"copy {point.name(emulated)} "
                     f"{format_bytes(point.nbytes)}")
        cell = bandwidth_cell(suite=suite, name=point.name(emulated), params=point.params(),
                              nbytes=point.moved_bytes, timing=timing, quick=self.method.quick, emulated=emulated,
                              verified=True)
        if point.engine is not Engine.TIERMEM:
            return cell
        config = self._engine_config(point)  # params keep None for "the manager's setting"; extra says which
        return replace(cell, extra={"chunk_bytes": config.chunk_bytes, "streams": config.streams_per_direction})

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def _pairs(self, src: MemorySpec, dst: MemorySpec, nbytes: int) -> list[Pair]:
        count = self.method.rotations
        sources = slots(self.memory.pool(src, "src", self._pool_bytes, fill=True), nbytes, count)
        targets = slots(self.memory.pool(dst, "dst", self._pool_bytes, fill=False), nbytes, count)
        count = min(len(sources), len(targets))
        return list(zip(sources[:count], targets[:count]))

    def _lanes(self, point: CopyPoint) -> list[list[Pair]]:
        """Slot pairs per concurrent copy; the plain loop uses (and so is verified on) its first pair only."""
        lanes = [self._pairs(point.src, point.dst, point.nbytes)]
        if point.engine is Engine.PLAIN_LOOP:
            return [lanes[0][:1]]
        if point.direction is Direction.BIDIR:
            lanes.append(self._pairs(point.dst, point.src, point.nbytes))
        return lanes

    def _workload(self, point: CopyPoint, lanes: list[list[Pair]]):
        gpu = point.direction.needs_gpu
        clock = Clock.CUDA_EVENTS if gpu else Clock.PERF_COUNTER
        if point.engine is Engine.TORCH:
            return TorchCopies(lanes, gpu), clock
        if point.engine is Engine.TIERMEM:
            return EngineCopies(self._submitter(point), lanes, gpu), clock
        if point.engine is Engine.SM:
            return KernelCopies(lanes[0]), clock
        return PlainLoop(lanes[0][0]), Clock.PERF_COUNTER

    def _engine_config(self, point: CopyPoint) -> TransferConfig:
        default = self.memory.manager.engine.config
        return TransferConfig(
            chunk_bytes=point.chunk_bytes or default.chunk_bytes,
            streams_per_direction=point.streams or default.streams_per_direction,
            host_threads=default.host_threads, host_chunk_bytes=default.host_chunk_bytes,
        )

    def _submitter(self, point: CopyPoint) -> Callable[[list[Pair]], TransferHandle]:
        manager = self.memory.manager
        if point.chunk_bytes is None and point.streams is None:
            return manager.copy
        config = self._engine_config(point)
        key = (config.chunk_bytes, config.streams_per_direction)
        if key not in self._engines:
            self._engines[key] = TransferEngine(config)
        engine = self._engines[key]

        return lambda pairs: engine.submit(manager.plan(pairs))  # TierManager.copy's plan, on this engine


class TorchCopies:
    """``copy_`` per lane; GPU lanes beyond one run on their own streams (bidir: both directions at once)."""

    def __init__(self, lanes: list[list[Pair]], gpu: bool) -> None:
        self.lanes = lanes
        self.streams = [torch.cuda.Stream() for _ in lanes] if gpu and len(lanes) > 1 else []

    def begin(self) -> None:
        for stream in self.streams:
            stream.wait_stream(torch.cuda.current_stream())

    def run(self, iteration: int) -> None:
        if not self.streams:
            src, dst = self.lanes[0][iteration % len(self.lanes[0])]
            dst.copy_(src, non_blocking=True)
            return
        for lane, stream in zip(self.lanes, self.streams):
            src, dst = lane[iteration % len(lane)]
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)

    def fence(self) -> None:
        for stream in self.streams:
            torch.cuda.current_stream().wait_stream(stream)


class EngineCopies:
    """One transfer-engine plan per operation holding one copy per lane."""

    def __init__(self, submit: Callable[[list[Pair]], TransferHandle], lanes: list[list[Pair]], gpu: bool) -> None:
        self.submit = submit
        self.lanes = lanes
        self.gpu = gpu
        self.handles: list[TransferHandle] = []

    def begin(self) -> None:
        """Nothing: every submit makes the engine's streams wait for the current stream."""

    def run(self, iteration: int) -> None:
        self.handles.append(self.submit([lane[iteration % len(lane)] for lane in self.lanes]))

    def fence(self) -> None:
        for handle in self.handles:
            if self.gpu:
                handle.wait_on()
            else:
                handle.wait()
        self.handles.clear()


class KernelCopies:
    """The Triton SM copy on the current stream."""

    def __init__(self, pairs: list[Pair]) -> None:
        kernels.require_triton()
        self.pairs = pairs

    def begin(self) -> None:
        """Nothing: the kernel runs on the current stream."""

    def run(self, iteration: int) -> None:
        kernels.sm_copy(*self.pairs[iteration % len(self.pairs)])

    def fence(self) -> None:
        """Nothing: the kernel runs on the current stream."""


class PlainLoop:
    """The harness reference: one buffer pair, ``copy_`` in a loop, then ``torch.cuda.synchronize()``."""

    def __init__(self, pair: Pair) -> None:
        self.src, self.dst = pair

    def begin(self) -> None:
        """Nothing: the previous run ended with a synchronize."""

    def run(self, iteration: int) -> None:
        self.dst.copy_(self.src, non_blocking=True)

    def fence(self) -> None:
        torch.cuda.synchronize()

