"""Object sources: anything that can read byte ranges of objects into local tensors, batch-first and async.

A source is the pool client (``PoolClient``, ``RdmaTier``) or a local copy (``TensorSource`` over
tensors on a host tier). ``FallbackReader`` reads from an ordered list of them. A request reads
``dst``'s byte count from object ``key`` starting at ``offset_bytes``; the caller owns ``dst`` until
the handle completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch

from tiermem.errors import TransferError
from tiermem.types import ObjectKey


@dataclass(frozen=True, eq=False)
class ReadRequest:
    """Read ``dst``'s bytes from object ``key``, starting at byte ``offset_bytes`` of the object."""

    key: ObjectKey
    dst: torch.Tensor
    offset_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.dst.numel() * self.dst.element_size()


@dataclass(frozen=True, eq=False)
class WriteRequest:
    """Write ``src``'s bytes into object ``key``, starting at byte ``offset_bytes`` of the object."""

    key: ObjectKey
    src: torch.Tensor
    offset_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()


class ReadHandle(Protocol):
    """Completion of a batch of reads: ``done()`` polls, ``wait()`` blocks and raises TransferError."""

    def done(self) -> bool: ...
    def wait(self, timeout_s: float | None = None) -> None: ...


class ObjectSource(Protocol):
    """A place objects can be read from."""

    name: str

    def holds(self, key: ObjectKey) -> bool: ...
    def submit(self, requests: Sequence[ReadRequest]) -> ReadHandle: ...


def check_range(source: str, key: ObjectKey, offset_bytes: int, nbytes: int, size_bytes: int) -> None:
    """Refuse a byte range outside an object before any I/O."""
    if offset_bytes < 0 or nbytes <= 0 or offset_bytes + nbytes > size_bytes:
        raise TransferError(
            f"{source}: bytes [{offset_bytes}, {offset_bytes + nbytes}) of object {key} are outside its "
            f"{size_bytes} bytes; read within the object (offset >= 0, offset + nbytes <= size)"
        )


class TensorSource:
    """Objects held as local tensors (e.g. a copy on a dram tier), read through ``copy``.

    ``copy`` moves ``(src, dst)`` pairs and returns a handle; pass ``TierManager.copy`` so that reads
    go through the transfer engine (pinned-memory rules, tier I/O hooks) like every other copy.
    """

    def __init__(self, name: str, objects: Mapping[ObjectKey, torch.Tensor],
                 copy: Callable[[Iterable[tuple[torch.Tensor, torch.Tensor]]], ReadHandle]) -> None:
        self.name = name
        self._objects = {key: tensor.reshape(-1).view(torch.uint8) for key, tensor in objects.items()}
        self._copy = copy

    def holds(self, key: ObjectKey) -> bool:
        return key in self._objects

    def submit(self, requests: Sequence[ReadRequest]) -> ReadHandle:
        pairs = []
        for request in requests:
            source = self._objects.get(request.key)
            if source is None:
                raise TransferError(f"source {self.name!r}: holds no object {request.key}")
            check_range(f"source {self.name!r}", request.key, request.offset_bytes, request.nbytes, source.numel())
            pairs.append((source.narrow(0, request.offset_bytes, request.nbytes), request.dst))
        return self._copy(pairs)
