"""The transfer engine: batched, asynchronous copies between tiers (``submit -> handle -> wait``).

Contract: ``submit(plan)`` validates nothing new (``make_plan`` did), enqueues every copy and returns a
``TransferHandle`` at once. The caller owns the buffers and must keep them alive and untouched until
``handle.done()`` (or ``wait()``/``wait_on(stream)``) says the bytes have landed. Blocking use is
``submit(plan).wait()``; there is no twin blocking API.

Design note (how bytes move):
| copy            | where it runs                                                | completion        |
|-----------------|--------------------------------------------------------------|-------------------|
| host -> GPU     | chunks round-robin over the device's H2D streams             | one CUDA event    |
| GPU -> host     | chunks round-robin over the device's D2H streams (own CEs)   | per stream used   |
| GPU -> GPU      | the destination device's H2D streams                         |                   |
| host -> host    | chunks over the engine's named thread pool (torch copy_      | futures           |
|                 | releases the GIL, so chunks copy in parallel)                |                   |
| any copy with   | a named I/O thread calls the hooks, then moves the bytes and | a future          |
| tier I/O hooks  | waits for them (modelled time and injected faults serialise) |                   |
Every GPU stream first waits on the submitting thread's current stream, so a copy never reads bytes
that earlier kernels on that stream are still writing. H2D and D2H use separate streams, so both
directions overlap on separate copy engines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tiermem.config import option, require
from tiermem.errors import TierMemError, TransferError
from tiermem.transfer.plan import Copy, Direction, TransferPlan, as_bytes, split_chunks

log = logging.getLogger("tiermem.transfer")


@dataclass(frozen=True)
class TransferConfig:
    """How the engine moves bytes."""

    chunk_bytes: int = option(64 << 20, help="GPU copies larger than this are split into chunks.", unit="bytes")
    streams_per_direction: int = option(2, help="CUDA streams per direction (H2D, D2H) per device.")
    host_threads: int = option(min(8, os.cpu_count() or 1), help="Threads for host-to-host copies.")
    host_chunk_bytes: int = option(8 << 20, help="Piece size for parallel host-to-host copies.", unit="bytes")

    def __post_init__(self) -> None:
        require(self.chunk_bytes >= 1 << 20, self, f"chunk_bytes must be >= 1 MiB, got {self.chunk_bytes}")
        require(self.host_chunk_bytes >= 1 << 16, self,
                f"host_chunk_bytes must be >= 64 KiB, got {self.host_chunk_bytes}")
        require(self.streams_per_direction >= 1, self,
                f"streams_per_direction must be >= 1, got {self.streams_per_direction}")
        require(self.host_threads >= 1, self, f"host_threads must be >= 1, got {self.host_threads}")


class TransferHandle:
    """Completion of one submitted plan: CUDA events and/or host futures."""

    def __init__(self, nbytes: int, events: list[torch.cuda.Event], futures: list[Future]) -> None:
        self.nbytes = nbytes
        self._events = events
        self._futures = futures
        self._submitted_s = time.perf_counter()

    def done(self) -> bool:
        """True once every byte has landed (or a host-side part failed: ``wait`` then raises)."""
        return all(f.done() for f in self._futures) and all(e.query() for e in self._events)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the plan completed; raise TransferError on failure or after ``timeout_s``."""
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        for future in self._futures:
            remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                future.result(timeout=remaining)
            except TimeoutError:
                raise self._timeout(timeout_s) from None
            except TierMemError:
                raise
            except Exception as exc:  # a torch/CUDA error inside a worker
                raise TransferError(f"transfer: a copy of this {self.nbytes}-byte plan failed: {exc}") from exc
        for event in self._events:
            if deadline is None:
                event.synchronize()
                continue
            while not event.query():
                if time.perf_counter() > deadline:
                    raise self._timeout(timeout_s)
                time.sleep(20e-6)

    def wait_on(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: current) wait for the GPU copies; host-side parts are waited for here."""
        if self._futures:
            self.wait()
        stream = stream or torch.cuda.current_stream()
        for event in self._events:
            stream.wait_event(event)

    def _timeout(self, timeout_s: float) -> TransferError:
        waited = time.perf_counter() - self._submitted_s
        return TransferError(
            f"transfer: a {self.nbytes}-byte plan did not complete within {timeout_s} s "
            f"({waited:.3f} s since submit); the source tier may be stalled or its peer gone"
        )


class TransferEngine:
    """Moves the bytes of a TransferPlan; knows no policy."""

    def __init__(self, config: TransferConfig | None = None) -> None:
        self.config = config or TransferConfig()
        self._host_pool = ThreadPoolExecutor(self.config.host_threads, thread_name_prefix="tiermem-copy")
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="tiermem-io")
        self._streams: dict[tuple[int, Direction], list[torch.cuda.Stream]] = {}
        self._lock = threading.Lock()
        self._bytes_by_direction = {d.value: 0 for d in Direction}
        self._closed = False

    def submit(self, plan: TransferPlan) -> TransferHandle:
        """Start every copy of ``plan``; returns at once."""
        if self._closed:
            raise TransferError("transfer: engine is closed; create a new TierManager")
        with self._lock:
            for copy in plan.copies:
                self._bytes_by_direction[copy.direction.value] += copy.nbytes
        hooked = [c for c in plan.copies if c.hooks]
        plain = [c for c in plan.copies if not c.hooks]
        events, futures = self._enqueue_gpu([c for c in plain if c.direction is not Direction.H2H])
        futures += self._enqueue_host([c for c in plain if c.direction is Direction.H2H])
        if hooked:
            futures.append(self._io_pool.submit(self._run_hooked, hooked))
        return TransferHandle(plan.nbytes, events, futures)

    def stats(self) -> dict[str, int]:
        """Bytes submitted per direction since the engine started."""
        with self._lock:
            return {f"{d}_bytes": n for d, n in self._bytes_by_direction.items()}

    def close(self) -> None:
        """Wait for running copies, then stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._io_pool.shutdown(wait=True)
        self._host_pool.shutdown(wait=True)

    def _streams_for(self, device: torch.device, direction: Direction) -> list[torch.cuda.Stream]:
        key = (device.index, direction)
        with self._lock:
            if key not in self._streams:
                self._streams[key] = [
                    torch.cuda.Stream(device=device) for _ in range(self.config.streams_per_direction)
                ]
            return self._streams[key]

    def _enqueue_gpu(self, copies: list[Copy]) -> tuple[list[torch.cuda.Event], list[Future]]:
        used: dict[int, torch.cuda.Stream] = {}
        turn: dict[tuple[int, Direction], int] = {}
        for copy in copies:
            device = copy.dst.device if copy.dst.is_cuda else copy.src.device
            direction = Direction.H2D if copy.direction is Direction.D2D else copy.direction
            streams = self._streams_for(device, direction)
            src, dst = as_bytes(copy.src), as_bytes(copy.dst)
            for offset, size in split_chunks(copy.nbytes, self.config.chunk_bytes):
                index = turn.get((device.index, direction), 0)
                turn[(device.index, direction)] = index + 1
                stream = streams[index % len(streams)]
                if id(stream) not in used:
                    stream.wait_stream(torch.cuda.current_stream(device))
                    used[id(stream)] = stream
                try:
                    with torch.cuda.stream(stream):
                        dst.narrow(0, offset, size).copy_(src.narrow(0, offset, size), non_blocking=True)
                except RuntimeError as exc:
                    raise TransferError(f"transfer: enqueueing a {size}-byte {copy.direction.value} copy failed: "
                                        f"{exc}") from exc
        events = []
        for stream in used.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events, []

    def _enqueue_host(self, copies: list[Copy]) -> list[Future]:
        futures = []
        for copy in copies:
            src, dst = as_bytes(copy.src), as_bytes(copy.dst)
            for offset, size in split_chunks(copy.nbytes, self.config.host_chunk_bytes):
                futures.append(self._host_pool.submit(_copy_bytes, dst.narrow(0, offset, size),
                                                      src.narrow(0, offset, size)))
        return futures

    def _run_hooked(self, copies: list[Copy]) -> None:
        for copy in copies:
            for hook in copy.hooks:
                hook(copy.nbytes)
            if copy.direction is Direction.H2H:
                _copy_bytes(as_bytes(copy.dst), as_bytes(copy.src))
                continue
            events, _ = self._enqueue_gpu([copy])
            for event in events:
                event.synchronize()


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)
