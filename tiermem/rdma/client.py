"""The pool client: attach to a pool server, authenticate, fetch its directory, read objects one-sidedly.

Connections: a *data* channel (directory and grant requests, serialised under a lock) and a *watch*
channel that the server holds open and silent. A named thread blocks on the watch channel; when the
server process dies its kernel closes the socket (TCP keepalive catches a vanished host), the client
is marked lost, and every handle still in flight is cancelled and fails with ``TransferError`` at its
next ``done()``/``wait()`` instead of hanging. ``wait()`` without a timeout uses
``transfer_timeout_s``, so no read waits forever.

Reads: ``submit([ReadRequest(key, dst, offset_bytes)])`` checks every range against the directory
(no I/O for a bad one), asks the server once for grants of objects not yet granted (the server
bounds-checks them too), and posts one batched one-sided READ. Destinations must be registered with
the transport: ``register(tensor)`` long-lived buffers (HBM slot pools, staging buffers) once;
anything else is registered for the duration of its transfer only.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tiermem.config import option, require
from tiermem.errors import ConfigError, TransferError
from tiermem.rdma.backends import make_transport
from tiermem.rdma.source import ReadRequest, WriteRequest, check_range
from tiermem.rdma.transport import (
    Operation, Registration, Span, Transfer, Transport, TransportConfig, TransportHandle, completed_handle,
)
from tiermem.rdma.wire import (
    DEFAULT_SECRET_ENV, MAX_UNAUTHENTICATED_BYTES, PROTOCOL, Channel, Kind, Role, expect, keepalive, key_from_wire,
    key_to_wire, load_secret, new_nonce, parse_address, proof, proof_matches,
)
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.rdma")

MAX_REPLY_BYTES = 256 << 20  # a directory of a million objects fits


@dataclass(frozen=True)
class PoolClientConfig:
    """Where the pool is and how long to wait for it."""

    address: str = option(help="host:port of the pool server's control channel.")
    secret_file: str | None = option(None, help="File holding the shared secret (owner-only permissions).")
    secret_env: str = option(DEFAULT_SECRET_ENV, help="Environment variable holding the secret when no "
                                                      "secret_file is given.")
    connect_timeout_s: float = option(5.0, help="Connecting and authenticating must finish within this time.")
    request_timeout_s: float = option(10.0, help="A directory or grant request must be answered within this time.")
    transfer_timeout_s: float = option(10.0, help="wait() without a timeout gives up (and cancels) after this.")
    transport: TransportConfig = option(TransportConfig(), help="Transfer engine; must match the server's.")

    def __post_init__(self) -> None:
        parse_address(self.address)
        for name in ("connect_timeout_s", "request_timeout_s", "transfer_timeout_s"):
            require(getattr(self, name) > 0, self, f"{name} must be > 0, got {getattr(self, name)}")


class PoolClient:
    """An attached pool: its directory, grants and one-sided reads (and writes, where exported writable)."""

    def __init__(self, config: PoolClientConfig, *, secret: bytes | None = None,
                 transport: Transport | None = None) -> None:
        self.config = config
        self.address = config.address
        self.name = f"rdma://{config.address}"
        secret = load_secret(config.secret_file, config.secret_env) if secret is None else secret
        self._owns_transport = transport is None
        self.transport = transport or make_transport(config.transport, "tiermem-client")
        self._lock = threading.RLock()
        self._granted: dict[tuple[ObjectKey, bool], Span] = {}
        self._registrations: list[Registration] = []
        self._peer: str | None = None
        self._lost: str | None = None
        self._closing = False
        self._data: Channel | None = None
        self._watch: Channel | None = None
        try:
            self._data, welcome = self._connect(secret, Role.DATA)
            self.backend = welcome["backend"]
            self.writable = welcome["writable"] is True
            if self.backend != self.transport.kind.value:
                raise ConfigError(f"rdma pool client: the pool at {self.address} exports through "
                                  f"{self.backend!r} but this client uses {self.transport.kind.value!r}; "
                                  "configure the same transport on both sides")
            reply = self._request({"type": Kind.DIRECTORY})
            self.directory: dict[ObjectKey, int] = {key_from_wire(k): int(n) for k, n in reply["objects"]}
            self._watch, _ = self._connect(secret, Role.WATCH)
        except BaseException:
            self._release()
            raise
        self._watcher = threading.Thread(target=self._watch_loop, name="tiermem-pool-watch", daemon=True)
        self._watcher.start()
        log.info("rdma pool client: attached %s (%d objects, %s)", self.address, len(self.directory), self.backend)

    @property
    def lost(self) -> str | None:
        """Why the server is gone, or None while it is there."""
        return self._lost

    def holds(self, key: ObjectKey) -> bool:
        return key in self.directory

    def register(self, tensor: torch.Tensor) -> None:
        """Register a long-lived destination (or write source) once, instead of once per transfer."""
        registration = self.transport.register(tensor)
        with self._lock:
            self._registrations.append(registration)

    def deregister(self, tensor: torch.Tensor) -> None:
        with self._lock:
            mine = [r for r in self._registrations if r.owner is tensor]
            self._registrations = [r for r in self._registrations if r.owner is not tensor]
        for registration in mine:
            self.transport.deregister(registration)

    def grant_spans(self, spans: Sequence[tuple[ObjectKey, int, int]], *, write: bool = False) -> list[Span]:
        """Ask the server to bounds-check ``(key, offset, nbytes)`` spans and grant access to their objects.

        Returns the remote span of each; a refusal (unknown object, out of bounds, read-only) raises.
        """
        reply = self._request({"type": Kind.GRANT, "write": write,
                               "spans": [[key_to_wire(k), offset, nbytes] for k, offset, nbytes in spans]})
        peer = self.transport.attach(base64.b64decode(reply["grant"]))
        with self._lock:
            self._peer = peer
        return [Span.from_wire(s[3]) for s in reply["spans"]]

    def grant(self, keys: Sequence[ObjectKey], *, write: bool = False) -> None:
        """Obtain grants for whole objects not granted yet, in one request (reads do this on demand).

        Granting up front keeps the control channel off the read path: a read of granted objects posts
        at once, even while the server's control thread is slow.
        """
        with self._lock:
            missing = sorted({key for key in keys if (key, write) not in self._granted})
        if missing:
            spans = self.grant_spans([(key, 0, self.directory[key]) for key in missing], write=write)
            with self._lock:
                self._granted.update({(key, write): span for key, span in zip(missing, spans, strict=True)})

    def forget_grants(self) -> None:
        """Drop cached grants, so that the next transfer asks the server (and reloads the transport peer)."""
        with self._lock:
            self._granted.clear()

    def submit(self, requests: Sequence[ReadRequest]) -> "PoolHandle":
        """Start one batched one-sided read of every request; returns at once."""
        return self._post(Operation.READ, [(r.key, r.dst, r.offset_bytes) for r in requests])

    def submit_write(self, requests: Sequence[WriteRequest]) -> "PoolHandle":
        """Start one batched one-sided write; only for pools served ``writable``."""
        if not self.writable:
            raise TransferError(f"rdma pool client: the pool at {self.address} is read-only; start it with "
                                "--writable to accept writes")
        return self._post(Operation.WRITE, [(r.key, r.src, r.offset_bytes) for r in requests])

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._watch is not None:
            self._watch.close()
            self._watcher.join()
        self._release()

    def __enter__(self) -> "PoolClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, operation: Operation, items: list[tuple[ObjectKey, torch.Tensor, int]]) -> "PoolHandle":
        self._check_alive()
        if not items:
            return PoolHandle(self, completed_handle(0), [], "empty batch")
        for key, tensor, offset in items:
            size = self.directory.get(key)
            if size is None:
                raise TransferError(f"rdma pool client: the pool at {self.address} holds no object {key}")
            check_range(f"rdma pool client ({self.address})", key, offset, tensor.numel() * tensor.element_size(),
                        size)
        write = operation is Operation.WRITE
        self.grant([key for key, _, _ in items], write=write)
        transient, transfers = [], []
        with self._lock:
            registered = [r.span for r in self._registrations]
            remote = {key: self._granted[(key, write)] for key, _, _ in items}
        try:
            for key, tensor, offset in items:
                local = Span.of(tensor)
                if not any(span.covers(local) for span in registered):
                    transient.append(self.transport.register(tensor))
                transfers.append(Transfer(local, remote[key].narrow(offset, local.nbytes)))
            inner = self.transport.post(operation, self._peer, transfers)
        except BaseException:
            for registration in transient:
                self.transport.deregister(registration)
            raise
        return PoolHandle(self, inner, transient, f"{operation.value} of {len(items)} object range(s)")

    def _connect(self, secret: bytes, role: Role) -> tuple[Channel, dict[str, Any]]:
        host, port = parse_address(self.address)
        try:
            sock = socket.create_connection((host, port), timeout=self.config.connect_timeout_s)
        except OSError as exc:
            raise TransferError(f"rdma pool client: cannot connect to {self.address}: {exc}; is `tiermem pool "
                                "serve` running there, and is the address right?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = Channel(sock, self.address)
        try:
            challenge = expect(channel.receive(MAX_UNAUTHENTICATED_BYTES), Kind.CHALLENGE, self.address)
            if challenge.get("protocol") != PROTOCOL:
                raise TransferError(f"rdma pool client: {self.address} speaks {challenge.get('protocol')!r}, "
                                    f"this client {PROTOCOL!r}; run the same tiermem version on both sides")
            nonce = new_nonce()
            message = {"type": Kind.AUTH, "role": role.value, "nonce": nonce,
                       "proof": proof(secret, "client", challenge["nonce"], nonce)}
            if role is Role.DATA:
                message["hello"] = base64.b64encode(self.transport.hello()).decode()
            channel.send(message)
            welcome = expect(channel.receive(MAX_UNAUTHENTICATED_BYTES), Kind.WELCOME, self.address)
            if not proof_matches(proof(secret, "server", nonce, challenge["nonce"]), welcome.get("proof")):
                raise TransferError(f"rdma pool client: {self.address} did not prove it holds the pool secret; "
                                    "refusing to trust it (wrong server, or the secrets differ)")
        except BaseException:
            channel.close()
            raise
        if role is Role.WATCH:
            keepalive(sock)
            sock.settimeout(None)
        else:
            sock.settimeout(self.config.request_timeout_s)
        return channel, welcome

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._check_alive()
            self._data.send(message)
            return expect(self._data.receive(MAX_REPLY_BYTES), message["type"], self.address)

    def _check_alive(self) -> None:
        if self._closing:
            raise TransferError(f"rdma pool client for {self.address} is closed")
        if self._lost is not None:
            raise TransferError(f"rdma pool client: the pool server at {self.address} is gone ({self._lost}); "
                                "read from another tier that holds a copy, or attach again once it is back")

    def _watch_loop(self) -> None:
        try:
            while self._watch.sock.recv(1):
                pass
            cause = "the server closed its connection"
        except OSError as exc:
            cause = f"connection error: {exc}"
        if not self._closing:
            self._lost = cause
            log.warning("rdma pool client: lost the pool server at %s: %s", self.address, cause)

    def _release(self) -> None:
        if self._data is not None:
            self._data.close()
        for registration in self._registrations:
            self.transport.deregister(registration)
        self._registrations.clear()
        if self._peer is not None:
            self.transport.detach(self._peer)
        if self._owns_transport:
            self.transport.close()


class PoolHandle:
    """Completion of one batch of pool reads or writes; fails fast when the server is lost."""

    def __init__(self, client: PoolClient, inner: TransportHandle, transient: list[Registration], what: str) -> None:
        self.nbytes = inner.nbytes
        self._client = client
        self._inner = inner
        self._transient = transient
        self._what = what
        self._error: TransferError | None = None
        self._finished = False
        self._submitted_s = time.perf_counter()

    def done(self) -> bool:
        """True once the bytes landed, or the batch failed (``wait`` then raises)."""
        if self._finished:
            return True
        try:
            finished = self._inner.done()
        except TransferError as exc:
            self._error, finished = exc, True
        if not finished and self._client.lost is not None:
            self._inner.cancel()
            self._error = TransferError(
                f"rdma pool client: the pool server at {self._client.address} went away ({self._client.lost}) "
                f"during a {self.nbytes}-byte {self._what}; the transfer was cancelled. Read the objects from "
                "another tier that holds a copy (FallbackReader)"
            )
            finished = True
        if finished:
            self._finish()
        return finished

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until done; TransferError on failure, or (after cancelling) once ``timeout_s`` passed."""
        timeout_s = self._client.config.transfer_timeout_s if timeout_s is None else timeout_s
        deadline = time.perf_counter() + timeout_s
        pause_s = 0.0
        while not self.done():
            if time.perf_counter() > deadline:
                self.cancel()
                raise TransferError(
                    f"rdma pool client: a {self.nbytes}-byte {self._what} from {self._client.address} did not "
                    f"complete within {timeout_s} s ({time.perf_counter() - self._submitted_s:.3f} s since "
                    "submit) and was cancelled; the server may be stalled. Read from another tier that holds a "
                    "copy (FallbackReader), or raise transfer_timeout_s"
                )
            if pause_s:
                time.sleep(pause_s)
            pause_s = min(max(pause_s * 2, 10e-6), 1e-3)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop the transfer; afterwards no byte lands in (or is read from) the local tensors."""
        if not self._finished:
            self._inner.cancel()
            self._client.forget_grants()  # cancelling may have disconnected the peer: grant again next time
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        transient, self._transient = self._transient, []
        for registration in transient:
            self._client.transport.deregister(registration)
