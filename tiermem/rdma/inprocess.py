"""``inprocess``: a transport whose peers live in the same process and whose transfers are memcpy.

It exists so that the pool protocol (authentication, grants, bounds checks, faults, fallback) can be
tested without NIXL and without a second process. It enforces what a NIC would: a transfer is
refused unless the remote span lies inside a registration the peer granted to this endpoint, and a
WRITE is refused unless that registration is writable. Copies run inside ``post`` (host memory only),
so the returned handle is already complete.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import threading
from typing import Sequence

import torch

from tiermem.errors import TransferError
from tiermem.rdma.transport import (
    MemoryKind, Operation, Registration, Span, Transfer, TransportHandle, TransportKind, check_granted,
    completed_handle,
)

log = logging.getLogger("tiermem.rdma")

_ENDPOINTS: dict[str, "InProcessTransport"] = {}
_ENDPOINTS_LOCK = threading.Lock()
_NAMES = itertools.count()


class InProcessTransport:
    """memcpy between endpoints of one process, with the access checks of a real transport."""

    kind = TransportKind.INPROCESS

    def __init__(self, name: str) -> None:
        self.name = f"{name}-{next(_NAMES)}"
        self._lock = threading.Lock()
        self._registrations: list[Registration] = []
        self._grants: dict[str, list[tuple[Span, bool]]] = {}  # peer -> spans it granted us, writable
        self._closed = False
        with _ENDPOINTS_LOCK:
            _ENDPOINTS[self.name] = self

    def register(self, tensor: torch.Tensor, *, writable: bool = False) -> Registration:
        span = Span.of(tensor)
        if span.memory is not MemoryKind.HOST:
            raise TransferError(f"rdma inprocess transport {self.name!r}: only host memory can be registered, "
                                f"got a tensor on {tensor.device}; use the nixl transport for GPU memory")
        registration = Registration(span, writable, tensor)
        with self._lock:
            self._check_open()
            self._registrations.append(registration)
        return registration

    def deregister(self, registration: Registration) -> None:
        with self._lock:
            self._registrations = [r for r in self._registrations if r is not registration]

    def hello(self) -> bytes:
        return self.name.encode()

    def accept(self, hello: bytes) -> str:
        return hello.decode()

    def export(self, registrations: Sequence[Registration], peer: str) -> bytes:
        with self._lock:
            self._check_open()
            unknown = [r.span for r in registrations if r not in self._registrations]
        if unknown:
            raise TransferError(f"rdma inprocess transport {self.name!r}: cannot export unregistered spans {unknown}")
        spans = [[*r.span.to_wire(), r.writable] for r in registrations]
        return json.dumps({"endpoint": self.name, "spans": spans}).encode()

    def attach(self, grant: bytes) -> str:
        body = json.loads(grant)
        peer = body["endpoint"]
        with self._lock:
            self._check_open()
            granted = self._grants.setdefault(peer, [])
            granted.extend((Span.from_wire(s[:4]), bool(s[4])) for s in body["spans"])
        return peer

    def detach(self, peer: str) -> None:
        with self._lock:
            self._grants.pop(peer, None)

    def post(self, operation: Operation, peer: str, transfers: Sequence[Transfer]) -> TransportHandle:
        with self._lock:
            self._check_open()
            granted = list(self._grants.get(peer, ()))
            local = list(self._registrations)
        with _ENDPOINTS_LOCK:
            remote = _ENDPOINTS.get(peer)
        if remote is None or remote._closed:
            raise TransferError(f"rdma inprocess transport {self.name!r}: peer {peer!r} is gone (closed); "
                                "its memory can no longer be read")
        for transfer in transfers:
            self._check_transfer(operation, peer, transfer, granted, local)
            remote._check_registered(transfer.remote)
        for transfer in transfers:
            src, dst = (transfer.remote, transfer.local) if operation is Operation.READ else \
                (transfer.local, transfer.remote)
            ctypes.memmove(dst.address, src.address, src.nbytes)
        return completed_handle(sum(t.local.nbytes for t in transfers))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._registrations.clear()
            self._grants.clear()
        with _ENDPOINTS_LOCK:
            _ENDPOINTS.pop(self.name, None)

    def _check_transfer(self, operation: Operation, peer: str, transfer: Transfer,
                        granted: list[tuple[Span, bool]], local: list[Registration]) -> None:
        if not any(r.span.covers(transfer.local) for r in local):
            raise TransferError(f"rdma inprocess transport {self.name!r}: local span {transfer.local} is not "
                                "registered with this transport; register the destination first")
        check_granted(f"rdma inprocess transport {self.name!r}", peer, operation, transfer.remote, granted)

    def _check_registered(self, span: Span) -> None:
        with self._lock:
            if not any(r.span.covers(span) for r in self._registrations):
                raise TransferError(f"rdma inprocess transport {self.name!r}: span {span} is no longer "
                                    "registered (the object was withdrawn)")

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"rdma inprocess transport {self.name!r} is closed")
