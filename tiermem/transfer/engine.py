"""The transfer engine: batched, asynchronous copies between tiers (``submit -> handle -> wait``).

Contract: ``submit(plan)`` validates nothing new (``make_plan`` did), enqueues every copy and returns a
``TransferHandle`` at once. The caller owns the buffers and must keep them alive and untouched until
``handle.done()`` (or ``wait()``/``wait_on(stream)``) says the bytes have landed. Blocking use is
``submit(plan).wait()``; there is no twin blocking API. ``handle.part(i)`` completes with copy ``i``
of the plan alone, so a batch of objects is submitted once and each object is still used as soon as
its own bytes have landed. ``submit(plan, background=True)`` puts GPU copies on streams of their
own: urgent copies never queue behind background ones in a stream (they share the link instead).

Design note (how bytes move):
| copy            | where it runs                                                | completion        |
|-----------------|--------------------------------------------------------------|-------------------|
| host -> GPU     | chunks round-robin over the device's H2D streams of the lane | CUDA events       |
| GPU -> host     | chunks round-robin over the device's D2H streams (own CEs)   | per copy and      |
| GPU -> GPU      | the destination device's H2D streams                         | per stream used   |
| host -> host    | chunks over the engine's named thread pool (torch copy_      | futures           |
|                 | releases the GIL, so chunks copy in parallel)                |                   |
| any copy with   | a named I/O thread calls the hooks, then moves the bytes and | a future          |
| tier I/O hooks  | waits for them (modelled time and injected faults serialise) |                   |
Every GPU stream first waits on the submitting thread's current stream, so a copy never reads bytes
that earlier kernels on that stream are still writing. H2D and D2H use separate streams, so both
directions overlap on separate copy engines. The round-robin turn persists across submits, so
back-to-back one-object submits alternate streams and one copy's setup hides behind another's bytes.
GPU chunks are enqueued with ``cudaMemcpyAsync`` on the validated raw pointers (``cudart``: a few
microseconds of host time instead of a ``copy_`` dispatch), or with ``copy_`` where no runtime is mapped.

``submit_direct(pairs)`` is the hot path of a slot cache: host-to-GPU copies between ``Endpoint``s
validated once (``plan.endpoint``), with the handle, parts, streams, chunks and start rule of
``submit``, but no plan, no tensors and no per-copy validation beyond comparing sizes and places
(about one ``cudaMemcpyAsync`` and one event of host time per copy).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tiermem.config import option, require
from tiermem.errors import TierMemError, TransferError
from tiermem.transfer import cudart
from tiermem.transfer.plan import Copy, Direction, Endpoint, TransferPlan, split_chunks

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

    def __init__(self, nbytes: int, events: list[torch.cuda.Event], futures: list[Future],
                 parts: list[TransferHandle] | None = None) -> None:
        self.nbytes = nbytes
        self._events = events
        self._futures = futures
        self._parts = parts
        self._submitted_s = time.perf_counter()
        self._done = False  # latched: a plan that completed stays complete

    def part(self, index: int) -> TransferHandle:
        """The completion of copy ``index`` of the submitted plan alone; the whole submit's where it kept no
        per-copy completions (a one-copy plan, or ``submit_direct(parts=False)``), which covers copy ``index``."""
        return self if self._parts is None else self._parts[index]

    def done(self) -> bool:
        """True once every byte has landed (or a host-side part failed: ``wait`` then raises)."""
        if not self._done:
            self._done = all(f.done() for f in self._futures) and all(e.query() for e in self._events)
        return self._done

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
        self._streams: dict[tuple[int, Direction, bool], tuple[list[torch.cuda.Stream], itertools.count]] = {}
        self._lock = threading.Lock()
        self._bytes_by_direction = {d.value: 0 for d in Direction}
        self._closed = False

    def submit(self, plan: TransferPlan, *, background: bool = False,
               after: torch.cuda.Stream | None = None) -> TransferHandle:
        """Start every copy of ``plan``; returns at once. ``background`` copies use their own GPU streams.

        GPU copies start after the work queued so far on ``after`` (default: the device's current stream).
        """
        if self._closed:
            raise TransferError("transfer: engine is closed; create a new TierManager")
        directions = [copy.direction for copy in plan.copies]
        with self._lock:
            for copy, direction in zip(plan.copies, directions):
                self._bytes_by_direction[direction.value] += copy.nbytes
        parts: list[tuple[list[torch.cuda.Event], list[Future]]] = []
        gpu_events: dict[int, torch.cuda.Event] = {}  # stream -> its last event: the whole plan
        start = _StartAfter(after)
        futures: list[Future] = []
        for copy, direction in zip(plan.copies, directions):
            if copy.hooks:
                future = self._io_pool.submit(self._run_hooked, copy, direction, _StartAfter(after))
                parts.append(([], [future]))
                futures.append(future)
            elif direction is Direction.H2H:
                pieces = self._enqueue_host(copy)
                parts.append(([], pieces))
                futures += pieces
            else:
                events = self._enqueue_gpu(copy, direction, background, start)
                parts.append((list(events.values()), []))
                gpu_events.update(events)
        nbytes = plan.nbytes
        if len(parts) == 1:
            return TransferHandle(nbytes, *parts[0])
        handles = [TransferHandle(c.nbytes, e, f) for c, (e, f) in zip(plan.copies, parts)]
        return TransferHandle(nbytes, list(gpu_events.values()), futures, handles)

    @property
    def direct_available(self) -> bool:
        """Whether ``submit_direct`` can run here (a CUDA runtime is mapped for raw-pointer copies)."""
        return cudart.available()

    def submit_direct(self, pairs: Sequence[tuple[Endpoint, Endpoint]], *, background: bool = False,
                      after: torch.cuda.Stream | None = None, parts: bool = True) -> TransferHandle:
        """Copy each ``(host source, GPU destination)`` pair of validated endpoints; returns at once.

        As ``submit``: one handle for the whole batch, ``part(i)`` for pair ``i`` alone; copies start after
        the work queued so far on ``after`` (default: the device's current stream), on the streams ``submit``
        would use, and the caller keeps both buffers alive until the handle completes. ``parts=False``
        records no completion per pair, only the batch's (one event per stream used): for a caller that
        always waits for the whole batch, since recording an event costs the host about 9 us on the H100
        VM (``bench/results/h100/sync-micro``); ``part(i)`` is then the whole batch.
        """
        if self._closed:
            raise TransferError("transfer: engine is closed; create a new TierManager")
        if not cudart.available():
            raise TransferError("transfer: submit_direct needs the CUDA runtime fast path, which this process "
                                "lacks (direct_available is False); submit a plan instead")
        for src, dst in pairs:
            if src.device is not None or dst.device is None or src.nbytes != dst.nbytes:
                raise TransferError(
                    f"transfer: a direct copy goes from pinned host memory to a GPU buffer of the same size; got "
                    f"{src.nbytes} bytes on {src.device or 'host'} -> {dst.nbytes} bytes on {dst.device or 'host'}"
                )
        start = _StartAfter(after)
        handles = []
        used: dict[int, torch.cuda.Stream] = {}
        last: dict[int, torch.cuda.Event] = {}  # stream -> its last event: the whole batch
        for src, dst in pairs:
            streams = self._enqueue_chunks(dst.device, Direction.H2D, background, start, src.nbytes,
                                           functools.partial(_memcpy_at, dst.address, src.address))
            if parts:
                events = _record(streams)
                handles.append(TransferHandle(src.nbytes, list(events.values()), []))
                last.update(events)
            used.update(streams)
        if not parts:
            last = _record(used)
        nbytes = sum(src.nbytes for src, _ in pairs)
        with self._lock:
            self._bytes_by_direction[Direction.H2D.value] += nbytes
        if len(handles) == 1:
            return handles[0]
        return TransferHandle(nbytes, list(last.values()), [], handles or None)

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

    def _streams_for(self, device: torch.device, direction: Direction,
                     background: bool) -> tuple[list[torch.cuda.Stream], itertools.count]:
        key = (device.index, direction, background)
        lane = self._streams.get(key)
        if lane is None:
            with self._lock:
                lane = self._streams.get(key)
                if lane is None:
                    streams = [torch.cuda.Stream(device=device) for _ in range(self.config.streams_per_direction)]
                    lane = self._streams[key] = (streams, itertools.count())
        return lane

    def _enqueue_gpu(self, copy: Copy, direction: Direction, background: bool,
                     start: _StartAfter) -> dict[int, torch.cuda.Event]:
        """Enqueue one copy's chunks; returns one event per stream used, recorded after its last chunk."""
        device = copy.dst.device if copy.dst.is_cuda else copy.src.device
        lane = Direction.H2D if direction is Direction.D2D else direction
        if cudart.available():  # the plan validated the pair: the raw runtime call is safe
            enqueue = functools.partial(_memcpy_at, copy.dst.data_ptr(), copy.src.data_ptr())
        else:
            enqueue = functools.partial(_copy_at, copy.dst, copy.src)
        return _record(self._enqueue_chunks(device, lane, background, start, copy.nbytes, enqueue))

    def _enqueue_chunks(self, device: torch.device, lane: Direction, background: bool, start: _StartAfter,
                        nbytes: int, enqueue: Callable[[int, int, torch.cuda.Stream], None],
                        ) -> dict[int, torch.cuda.Stream]:
        """``enqueue(offset, size, stream)`` each chunk of ``nbytes`` on the lane's streams in turn; returns the
        streams used (``_record`` marks their ends)."""
        streams, turn = self._streams_for(device, lane, background)
        used: dict[int, torch.cuda.Stream] = {}
        for offset, size in split_chunks(nbytes, self.config.chunk_bytes):
            stream = streams[next(turn) % len(streams)]
            used[id(stream)] = stream
            start.hold(stream, device)
            try:
                enqueue(offset, size, stream)
            except RuntimeError as exc:
                raise TransferError(f"transfer: enqueueing a {size}-byte {lane.value} copy failed: {exc}") from exc
        return used

    def _enqueue_host(self, copy: Copy) -> list[Future]:
        return [self._host_pool.submit(_copy_bytes, copy.dst.narrow(0, offset, size), copy.src.narrow(0, offset, size))
                for offset, size in split_chunks(copy.nbytes, self.config.host_chunk_bytes)]

    def _run_hooked(self, copy: Copy, direction: Direction, start: _StartAfter) -> None:
        for hook in copy.hooks:
            hook(copy.nbytes)
        if direction is Direction.H2H:
            _copy_bytes(copy.dst, copy.src)
            return
        for event in self._enqueue_gpu(copy, direction, False, start).values():
            event.synchronize()


class _StartAfter:
    """The copy streams of one submit start after the work queued on ``after`` (default: each device's current
    stream): one event recorded there per device, waited on once by each stream the submit uses."""

    def __init__(self, after: torch.cuda.Stream | None) -> None:
        self.after = after
        self._events: dict[int, torch.cuda.Event] = {}
        self._held: set[int] = set()

    def hold(self, stream: torch.cuda.Stream, device: torch.device) -> None:
        if id(stream) in self._held:
            return
        event = self._events.get(device.index)
        if event is None:
            event = self._events[device.index] = (self.after or torch.cuda.current_stream(device)).record_event()
        stream.wait_event(event)
        self._held.add(id(stream))


def _record(streams: dict[int, torch.cuda.Stream]) -> dict[int, torch.cuda.Event]:
    """One event per stream, recorded after the work queued on it so far."""
    events = {}
    for key, stream in streams.items():
        events[key] = torch.cuda.Event()
        events[key].record(stream)
    return events


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _memcpy_at(dst_ptr: int, src_ptr: int, offset: int, size: int, stream: torch.cuda.Stream) -> None:
    cudart.memcpy_async(dst_ptr + offset, src_ptr + offset, size, stream.cuda_stream)


def _copy_at(dst: torch.Tensor, src: torch.Tensor, offset: int, size: int, stream: torch.cuda.Stream) -> None:
    with torch.cuda.stream(stream):
        dst.narrow(0, offset, size).copy_(src.narrow(0, offset, size), non_blocking=True)
