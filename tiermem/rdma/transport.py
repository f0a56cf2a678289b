"""The transport protocol: register memory, grant a peer exactly some of it, move bytes one-sidedly.

A transport is one endpoint of a one-sided transfer engine (NIXL over UCX, raw verbs, or in-process
memcpy for tests). The pool server registers each exported object as its own registration and
``export``s a grant blob covering exactly the objects a client asked for; the client ``attach``es
that blob and then ``post``s batched READs (or WRITEs, where the export is writable) between its own
registered memory and the granted spans, without the server's CPU taking part.

Invariants every backend keeps:
- a ``post`` touches only local memory that is registered with this transport and remote memory that
  a loaded grant covers; anything else is refused with ``TransferError`` before any byte moves;
- ``post`` returns at once with a ``TransportHandle``; the caller keeps both sides' memory alive and
  untouched until ``done()`` is true or ``wait()`` returned or raised. A handle that times out is
  cancelled before ``wait`` raises, and ``cancel()`` returns only once no byte can land any more, so
  the buffers may be reused after either (a backend that cannot guarantee it raises instead);
- ``close()`` is idempotent and releases every registration and peer.

Extension: implement ``Transport`` in a module of this package, add a member to ``TransportKind`` and
its constructor to ``backends.make_transport``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from tiermem.config import option, require
from tiermem.errors import TransferError


class TransportKind(str, enum.Enum):
    """Which engine moves the bytes."""

    INPROCESS = "inprocess"  # memcpy between transports of one process: tests only
    NIXL = "nixl"  # NIXL over UCX: RDMA/GPUDirect on NICs, shared memory or TCP on one host
    VERBS = "verbs"  # raw ibverbs through pyverbs: RC queue pairs, needs an RDMA device


class Operation(str, enum.Enum):
    """Direction of a one-sided transfer, seen from the initiator."""

    READ = "read"  # remote -> local
    WRITE = "write"  # local -> remote


class MemoryKind(str, enum.Enum):
    """Where a span's bytes live."""

    HOST = "host"
    GPU = "gpu"


@dataclass(frozen=True)
class Span:
    """A contiguous byte range: ``nbytes`` from ``address``, in host memory or on GPU ``device``."""

    address: int
    nbytes: int
    memory: MemoryKind = MemoryKind.HOST
    device: int = 0

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Span":
        """The bytes of a contiguous tensor."""
        if not tensor.is_contiguous():
            raise TransferError(
                f"rdma: tensor of shape {tuple(tensor.shape)} is not contiguous; one-sided transfers move "
                "contiguous byte ranges (copy it into a contiguous tiermem tensor first)"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_cuda:
            return cls(tensor.data_ptr(), nbytes, MemoryKind.GPU, tensor.device.index or 0)
        return cls(tensor.data_ptr(), nbytes)

    @property
    def end(self) -> int:
        return self.address + self.nbytes

    def covers(self, other: "Span") -> bool:
        """True when ``other`` lies entirely inside this span (same memory and device)."""
        return (self.memory, self.device) == (other.memory, other.device) and \
            self.address <= other.address and other.end <= self.end

    def narrow(self, offset_bytes: int, nbytes: int) -> "Span":
        """The sub-span ``[offset, offset + nbytes)``; internal callers check bounds first."""
        assert 0 <= offset_bytes and offset_bytes + nbytes <= self.nbytes, (offset_bytes, nbytes, self.nbytes)
        return Span(self.address + offset_bytes, nbytes, self.memory, self.device)

    def to_wire(self) -> list[Any]:
        return [self.address, self.nbytes, self.memory.value, self.device]

    @classmethod
    def from_wire(cls, value: Sequence[Any]) -> "Span":
        address, nbytes, memory, device = value
        return cls(int(address), int(nbytes), MemoryKind(memory), int(device))


@dataclass(frozen=True, eq=False)
class Registration:
    """Memory registered with a transport; ``owner`` keeps the registered tensor alive."""

    span: Span
    writable: bool
    owner: torch.Tensor
    backend: Any = None


@dataclass(frozen=True)
class Transfer:
    """Move ``local.nbytes`` bytes between a local span and a remote span of the same size."""

    local: Span
    remote: Span

    def __post_init__(self) -> None:
        if self.local.nbytes != self.remote.nbytes:
            raise TransferError(
                f"rdma: local span has {self.local.nbytes} bytes but remote span has {self.remote.nbytes}; "
                "a transfer moves equal byte counts"
            )


class TransportHandle(Protocol):
    """Completion of one posted batch (``done``/``wait`` as ``tiermem.transfer.TransferHandle``), cancellable."""

    nbytes: int

    def done(self) -> bool: ...
    def wait(self, timeout_s: float | None = None) -> None: ...
    def cancel(self) -> None: ...


class Transport(Protocol):
    """One endpoint of a one-sided transfer engine."""

    kind: TransportKind
    name: str

    def register(self, tensor: torch.Tensor, *, writable: bool = False) -> Registration: ...
    def deregister(self, registration: Registration) -> None: ...
    def hello(self) -> bytes: ...
    def accept(self, hello: bytes) -> str: ...
    def export(self, registrations: Sequence[Registration], peer: str) -> bytes: ...
    def attach(self, grant: bytes) -> str: ...
    def detach(self, peer: str) -> None: ...
    def post(self, operation: Operation, peer: str, transfers: Sequence[Transfer]) -> TransportHandle: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class TransportConfig:
    """Which transport a pool server or client uses, and its backend-specific settings."""

    kind: TransportKind = option(TransportKind.NIXL, help="Transfer engine: nixl, verbs, or inprocess (tests).")
    progress_interval_us: float = option(
        0.0, help="nixl: how often a background thread progresses UCX (0: no thread). A pool server over TCP "
                  "needs it (SERVER_TRANSPORT sets 200 us); clients progress while they poll their handles.")
    verbs_device: str | None = option(None, help="verbs: RDMA device name (e.g. mlx5_0); None takes the first.")
    verbs_port: int = option(1, help="verbs: device port number.")
    verbs_gid_index: int = option(0, help="verbs: GID table index (RoCE needs a routable GID).")
    verbs_max_outstanding: int = option(128, help="verbs: work requests in flight per queue pair.")

    def __post_init__(self) -> None:
        require(self.progress_interval_us >= 0, self,
                f"progress_interval_us must be >= 0, got {self.progress_interval_us}")
        require(self.verbs_port >= 1, self, f"verbs_port must be >= 1, got {self.verbs_port}")
        require(self.verbs_gid_index >= 0, self, f"verbs_gid_index must be >= 0, got {self.verbs_gid_index}")
        require(self.verbs_max_outstanding >= 1, self,
                f"verbs_max_outstanding must be >= 1, got {self.verbs_max_outstanding}")


SERVER_TRANSPORT = TransportConfig(progress_interval_us=200.0)


def check_granted(where: str, peer: str, operation: Operation, span: Span,
                  granted: Sequence[tuple[Span, bool]]) -> None:
    """Refuse a remote span no grant of ``peer`` covers, and a write into a read-only grant."""
    cover = [writable for region, writable in granted if region.covers(span)]
    if not cover:
        raise TransferError(f"{where}: remote span {span} lies outside every span peer {peer!r} granted; ask the "
                            "pool server for a grant of that object")
    if operation is Operation.WRITE and not any(cover):
        raise TransferError(f"{where}: peer {peer!r} exported {span} read-only; start the pool with --writable "
                            "to allow writes")


class PollingHandle:
    """A handle completed by polling ``poll() -> bool`` (which raises TransferError on failure).

    ``abort()`` runs on ``cancel()`` and when ``wait`` times out, so that no byte lands afterwards.
    """

    def __init__(self, nbytes: int, poll: Callable[[], bool], abort: Callable[[], None], what: str) -> None:
        self.nbytes = nbytes
        self._poll = poll
        self._abort = abort
        self._what = what
        self._submitted_s = time.perf_counter()
        self._finished = False
        self._cancelled = False

    def done(self) -> bool:
        if not self._finished:
            self._finished = self._poll()
        return self._finished

    def cancel(self) -> None:
        if not self._finished:
            self._finished = self._cancelled = True
            self._abort()

    def wait(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        pause_s = 0.0
        while not self.done():
            if deadline is not None and time.perf_counter() > deadline:
                self.cancel()
                waited = time.perf_counter() - self._submitted_s
                raise TransferError(
                    f"rdma: {self._what} of {self.nbytes} bytes did not complete within {timeout_s} s "
                    f"({waited:.3f} s since it was posted) and was cancelled; the peer may be stalled or gone. "
                    "Retry from another tier that holds a copy (FallbackReader) or raise the timeout."
                )
            if pause_s:
                time.sleep(pause_s)
            pause_s = min(max(pause_s * 2, 10e-6), 1e-3)
        if self._cancelled:
            raise TransferError(f"rdma: {self._what} of {self.nbytes} bytes was cancelled before it completed")


def completed_handle(nbytes: int) -> TransportHandle:
    """A handle for a batch that finished inside ``post`` (or an empty batch)."""
    return PollingHandle(nbytes, lambda: True, lambda: None, "transfer")
