"""The pool server: exports objects held in this host's tier memory to authenticated peers.

The caller allocates each object on a host tier (dram or cxl, page-aligned) and hands the tensors over;
the server registers every object as its own transport registration (and nothing else), publishes the
object directory (key -> nbytes) on a TCP control channel, and answers grant requests. Reads are then
one-sided: bytes flow from the registered objects to the client without this process taking part.

Security invariants (see ``wire`` for the handshake and ``nixl`` for what the engine enforces):
- nothing but the challenge is sent before a peer proved it holds the secret;
- every requested span is bounds-checked here (known object, ``0 <= offset``, ``offset + nbytes <=
  object size``) before the client gets the transport metadata it needs; the grant covers exactly the
  registrations of the checked objects;
- write grants exist only when the server was started ``writable``;
- a wrong secret, an unknown object or an out-of-bounds span is refused with an ``error`` message and
  logged (warning, with the peer's address); the connection and every other client keep being served;
- a peer must authenticate within ``auth_timeout_s`` and may send at most 4 KiB before it has; at most
  ``max_connections`` connections are served at once.

Threads: ``tiermem-pool-accept`` accepts; one ``tiermem-pool-conn-N`` per connection; ``close()`` stops
accepting, shuts every connection down, joins every thread, deregisters every object.
"""

from __future__ import annotations

import base64
import itertools
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tiermem.config import format_bytes, option, require
from tiermem.errors import ConfigError, TransferError
from tiermem.rdma.backends import make_transport
from tiermem.rdma.transport import SERVER_TRANSPORT, Registration, Transport, TransportConfig, TransportKind
from tiermem.rdma.wire import (
    MAX_UNAUTHENTICATED_BYTES, PROTOCOL, Channel, Kind, Refusal, Role, key_from_wire, key_to_wire, new_nonce,
    parse_address, proof, proof_matches,
)
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.rdma")

ACCEPT_POLL_S = 0.5  # how often accept() checks for close() where shutdown() does not wake it


@dataclass(frozen=True)
class PoolServerConfig:
    """How the pool server listens and what it lets clients do."""

    listen: str = option("127.0.0.1:0", help="host:port of the control channel; port 0 picks a free port.")
    writable: bool = option(False, help="Let clients write into exported objects (read-only otherwise).")
    auth_timeout_s: float = option(5.0, help="A connection must authenticate within this time.")
    max_connections: int = option(128, help="Connections served at once (a client holds two: data and watch); "
                                             "more are refused as busy.")
    max_request_bytes: int = option(1 << 20, help="Largest request accepted from an authenticated client.",
                                    unit="bytes")
    transport: TransportConfig = option(SERVER_TRANSPORT, help="Transfer engine of the exports.")

    def __post_init__(self) -> None:
        parse_address(self.listen)
        require(self.auth_timeout_s > 0, self, f"auth_timeout_s must be > 0, got {self.auth_timeout_s}")
        require(self.max_connections >= 2, self, f"max_connections must be >= 2, got {self.max_connections}")
        require(self.transport.kind is not TransportKind.NIXL or self.transport.progress_interval_us > 0, self,
                "a NIXL pool server needs transport.progress_interval_us > 0: TCP peers read only while the server "
                f"progresses UCX ({SERVER_TRANSPORT.progress_interval_us} us is a good value)")
        require(self.max_request_bytes >= MAX_UNAUTHENTICATED_BYTES, self,
                f"max_request_bytes must be >= {MAX_UNAUTHENTICATED_BYTES}, got {self.max_request_bytes}")


class PoolServer:
    """Serves one set of objects until ``close()``."""

    def __init__(self, config: PoolServerConfig, secret: bytes, objects: Mapping[ObjectKey, torch.Tensor],
                 transport: Transport | None = None) -> None:
        _check_objects(objects)
        self.config = config
        self._secret = secret
        self._owns_transport = transport is None
        self.transport = transport or make_transport(config.transport, "tiermem-pool")
        self._lock = threading.Lock()
        self._connections: dict[int, tuple[Channel, threading.Thread]] = {}
        self._ids = itertools.count()
        self._closed = False
        self.refusals = 0
        self.grants = 0
        self._exports: dict[ObjectKey, Registration] = {}
        self._listener: socket.socket | None = None
        try:
            for key, tensor in objects.items():
                self._exports[key] = self.transport.register(tensor.reshape(-1).view(torch.uint8),
                                                             writable=config.writable)
            host, port = parse_address(config.listen)
            self._listener = socket.create_server((host, port), reuse_port=False)
        except BaseException:
            self._release()
            raise
        self._listener.settimeout(ACCEPT_POLL_S)
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="tiermem-pool-accept", daemon=True)
        self._acceptor.start()
        log.info("rdma pool: serving %d objects (%s) on %s through %s", len(objects),
                 format_bytes(self.exported_bytes), self.address, self.transport.kind.value)

    @property
    def exported_bytes(self) -> int:
        return sum(r.span.nbytes for r in self._exports.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"address": self.address, "objects": len(self._exports), "exported_bytes": self.exported_bytes,
                    "connections": len(self._connections), "grants": self.grants, "refusals": self.refusals}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux; elsewhere it polls
        except OSError:
            pass
        self._acceptor.join()  # after this, no connection thread is created or left unstarted
        with self._lock:
            connections = list(self._connections.values())
        for channel, _ in connections:
            channel.close()
        for _, thread in connections:
            thread.join()
        self._release()
        log.info("rdma pool: %s closed", self.address)

    def __enter__(self) -> "PoolServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        for registration in self._exports.values():
            self.transport.deregister(registration)
        self._exports.clear()
        if self._owns_transport:
            self.transport.close()
        if self._listener is not None:
            self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            channel = Channel(sock, f"{address[0]}:{address[1]}")
            with self._lock:
                busy = len(self._connections) >= self.config.max_connections or self._closed
                if not busy:
                    number = next(self._ids)
                    thread = threading.Thread(target=self._serve, args=(number, channel),
                                              name=f"tiermem-pool-conn-{number}", daemon=True)
                    self._connections[number] = (channel, thread)
            if busy:
                log.warning("rdma pool: refused %s: %d connections already open", channel.peer,
                            self.config.max_connections)
                self._refuse(channel, Refusal.BUSY, "too many clients; retry later")
                channel.close()
                continue
            thread.start()

    def _serve(self, number: int, channel: Channel) -> None:
        peer = None
        try:
            channel.sock.settimeout(self.config.auth_timeout_s)
            admitted = self._authenticate(channel)
            if admitted is None:
                return
            role, peer = admitted
            channel.sock.settimeout(None)
            if role is Role.WATCH:
                while channel.sock.recv(1):  # held open and silent until either side goes away
                    pass
                return
            while True:
                channel.send(self._answer(channel, peer, channel.receive(self.config.max_request_bytes)))
        except (TransferError, OSError) as exc:
            log.debug("rdma pool: connection %s ended: %s", channel.peer, exc)
        finally:
            channel.close()
            if peer is not None:
                self.transport.detach(peer)
            with self._lock:
                self._connections.pop(number, None)

    def _authenticate(self, channel: Channel) -> tuple[Role, str | None] | None:
        server_nonce = new_nonce()
        channel.send({"type": Kind.CHALLENGE, "protocol": PROTOCOL, "nonce": server_nonce})
        message = channel.receive(MAX_UNAUTHENTICATED_BYTES)
        client_nonce = message.get("nonce")
        if message["type"] != Kind.AUTH or not isinstance(client_nonce, str) or \
                not proof_matches(proof(self._secret, "client", server_nonce, client_nonce), message.get("proof")):
            log.warning("rdma pool: refused %s: authentication failed (wrong secret, or not a tiermem client)",
                        channel.peer)
            self._refuse(channel, Refusal.AUTH_FAILED, "authentication failed: the secrets differ")
            return None
        try:
            role = Role(message.get("role"))
            peer = self.transport.accept(base64.b64decode(message["hello"])) if role is Role.DATA else None
        except (KeyError, ValueError, TypeError, TransferError) as exc:
            log.warning("rdma pool: refused %s: bad authentication message: %s", channel.peer, exc)
            self._refuse(channel, Refusal.BAD_REQUEST, f"bad authentication message: {exc}")
            return None
        channel.send({"type": Kind.WELCOME, "proof": proof(self._secret, "server", client_nonce, server_nonce),
                      "backend": self.transport.kind.value, "writable": self.config.writable})
        log.info("rdma pool: %s authenticated (%s connection)", channel.peer, role.value)
        return role, peer

    def _answer(self, channel: Channel, peer: str, request: dict[str, Any]) -> dict[str, Any]:
        if request["type"] == Kind.DIRECTORY:
            objects = [[key_to_wire(k), r.span.nbytes] for k, r in self._exports.items()]
            return {"type": Kind.DIRECTORY, "objects": objects}
        if request["type"] != Kind.GRANT:
            return self._refusal(channel, Refusal.BAD_REQUEST, f"unknown request type {request['type']!r}")
        write = request.get("write") is True
        if write and not self.config.writable:
            return self._refusal(channel, Refusal.READ_ONLY,
                                 "this pool exports read-only; start it with --writable to allow writes")
        try:
            spans = [(key_from_wire(k), offset, nbytes) for k, offset, nbytes in request.get("spans", [])]
        except (TransferError, TypeError, ValueError) as exc:
            return self._refusal(channel, Refusal.BAD_REQUEST, f"malformed grant request: {exc}")
        granted = []
        for key, offset, nbytes in spans:
            registration = self._exports.get(key)
            if registration is None:
                return self._refusal(channel, Refusal.UNKNOWN_OBJECT, f"object {key} is not exported here")
            size = registration.span.nbytes
            if not (isinstance(offset, int) and isinstance(nbytes, int) and 0 <= offset and 0 < nbytes
                    and offset + nbytes <= size):
                return self._refusal(channel, Refusal.OUT_OF_BOUNDS,
                                     f"span [{offset}, {offset} + {nbytes}) of object {key} is outside its "
                                     f"{size} bytes")
            granted.append([key_to_wire(key), offset, nbytes, registration.span.narrow(offset, nbytes).to_wire()])
        registrations = list({id(r): r for r in (self._exports[k] for k, _, _ in spans)}.values())
        try:
            blob = self.transport.export(registrations, peer)
        except TransferError as exc:
            return self._refusal(channel, Refusal.BAD_REQUEST, str(exc))
        with self._lock:
            self.grants += 1
        return {"type": Kind.GRANT, "grant": base64.b64encode(blob).decode(), "spans": granted}

    def _refusal(self, channel: Channel, code: Refusal, message: str) -> dict[str, Any]:
        with self._lock:
            self.refusals += 1
        log.warning("rdma pool: refused a request of %s: %s", channel.peer, message)
        return {"type": Kind.ERROR, "code": code.value, "message": message}

    def _refuse(self, channel: Channel, code: Refusal, message: str) -> None:
        with self._lock:
            self.refusals += 1
        try:
            channel.send({"type": Kind.ERROR, "code": code.value, "message": message})
        except TransferError:
            pass


def _check_objects(objects: Mapping[ObjectKey, torch.Tensor]) -> None:
    for key, tensor in objects.items():
        if not isinstance(key, ObjectKey):
            raise ConfigError(f"rdma pool: object keys must be ObjectKey, got {key!r}")
        if tensor.is_cuda or not tensor.is_contiguous() or tensor.numel() == 0:
            raise ConfigError(f"rdma pool: object {key} must be a non-empty contiguous host tensor (allocate it "
                              f"on a dram or cxl tier); got shape {tuple(tensor.shape)} on {tensor.device}")
