"""The pool's control channel: length-prefixed JSON messages, mutual HMAC authentication, shared secrets.

Frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON (one object with a ``type``).
Bulk data never travels here: only the handshake, the object directory and grants (transport metadata).

Handshake (both sides prove they hold the secret; the secret itself never crosses the wire):
| step | from   | message                                                                  |
|------|--------|--------------------------------------------------------------------------|
| 1    | server | ``challenge``: protocol, server nonce (32 random bytes)                   |
| 2    | client | ``auth``: role (data/watch), client nonce, transport hello,               |
|      |        | proof = HMAC-SHA256(secret, "client" | server nonce | client nonce)      |
| 3    | server | checks the proof with ``hmac.compare_digest``; wrong: ``error`` + close   |
| 4    | server | ``welcome``: proof = HMAC-SHA256(secret, "server" | client nonce | server |
|      |        | nonce), backend, writable; the client checks it before trusting anything |
Fresh nonces on both sides make a recorded exchange useless for a later connection. The channel is
authenticated, not encrypted: run it on a trusted network (metadata and the directory are readable).
Before authentication a peer may send at most ``MAX_UNAUTHENTICATED_BYTES`` and must finish within the
server's ``auth_timeout_s``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from tiermem.errors import ConfigError, TransferError
from tiermem.types import ObjectKey

PROTOCOL = "tiermem-pool/1"
MAX_UNAUTHENTICATED_BYTES = 4096
MIN_SECRET_BYTES = 16
DEFAULT_SECRET_ENV = "TIERMEM_POOL_SECRET"
_HEADER = struct.Struct(">I")


class Kind(str, enum.Enum):
    """Message types."""

    CHALLENGE = "challenge"
    AUTH = "auth"
    WELCOME = "welcome"
    DIRECTORY = "directory"
    GRANT = "grant"
    ERROR = "error"


class Role(str, enum.Enum):
    """What a client connection is for."""

    DATA = "data"  # directory and grant requests
    WATCH = "watch"  # held open and silent, so that the client learns at once when the server dies


class Refusal(str, enum.Enum):
    """Why the server refused a request."""

    AUTH_FAILED = "auth_failed"
    OUT_OF_BOUNDS = "out_of_bounds"
    UNKNOWN_OBJECT = "unknown_object"
    READ_ONLY = "read_only"
    BAD_REQUEST = "bad_request"
    BUSY = "busy"


class Channel:
    """Length-prefixed JSON messages over one connected TCP socket."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_HEADER.pack(len(body)) + body)
        except OSError as exc:
            raise TransferError(f"rdma pool: sending to {self.peer} failed: {exc}; the peer is gone") from None

    def receive(self, max_bytes: int) -> dict[str, Any]:
        """The next message; TransferError on EOF, a frame over ``max_bytes`` or malformed JSON."""
        (length,) = _HEADER.unpack(self._exactly(_HEADER.size))
        if length > max_bytes:
            raise TransferError(f"rdma pool: {self.peer} sent a {length}-byte message; at most {max_bytes} "
                                "are accepted here")
        try:
            message = json.loads(self._exactly(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TransferError(f"rdma pool: {self.peer} sent a malformed message: {exc}") from None
        if not isinstance(message, dict) or "type" not in message:
            raise TransferError(f"rdma pool: {self.peer} sent a message without a type")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _exactly(self, nbytes: int) -> bytes:
        chunks, remaining = [], nbytes
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except socket.timeout:
                raise TransferError(f"rdma pool: {self.peer} did not answer in time") from None
            except OSError as exc:
                raise TransferError(f"rdma pool: connection to {self.peer} broke: {exc}") from None
            if not chunk:
                raise TransferError(f"rdma pool: {self.peer} closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


def new_nonce() -> str:
    return secrets.token_hex(32)


def proof(secret: bytes, side: str, first_nonce: str, second_nonce: str) -> str:
    """HMAC-SHA256 over the protocol, the proving side and both nonces."""
    message = f"{PROTOCOL}|{side}|{first_nonce}|{second_nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def proof_matches(expected: str, received: object) -> bool:
    """Constant-time comparison of a received proof with the expected one."""
    return isinstance(received, str) and hmac.compare_digest(expected.encode(), received.encode())


def load_secret(secret_file: str | None, secret_env: str | None) -> bytes:
    """The shared secret from a file (owner-only permissions) or else from an environment variable.

    Secrets are never taken from the command line, where other users can read them in ``ps``.
    """
    if secret_file is not None:
        path = Path(secret_file)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"rdma pool: cannot read secret file {str(path)!r}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"rdma pool: secret file {str(path)!r} is accessible by other users "
                              f"(mode {stat.filemode(mode)}); run: chmod 600 {path}")
        where = f"secret file {str(path)!r}"
    else:
        name = secret_env or DEFAULT_SECRET_ENV
        data = os.environ.get(name, "").strip().encode()
        if not data:
            raise ConfigError(f"rdma pool: no secret: give a secret file, or set the environment variable {name} "
                              "(e.g. to the output of: python -c 'import secrets; print(secrets.token_hex(32))')")
        where = f"environment variable {name}"
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(f"rdma pool: the secret in {where} has {len(data)} bytes; use at least "
                          f"{MIN_SECRET_BYTES} random bytes (e.g. secrets.token_hex(32))")
    return data


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> (host, port); ConfigError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"rdma pool: address {address!r} is not host:port (e.g. 127.0.0.1:7450)")
    return host.strip("[]"), int(port)


def key_to_wire(key: ObjectKey) -> list[Any]:
    return [key.kind, key.table, key.layer, key.index]


def key_from_wire(value: Any) -> ObjectKey:
    if not (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)
            and isinstance(value[1], str) and isinstance(value[2], int) and isinstance(value[3], int)):
        raise TransferError(f"rdma pool: {value!r} is not an object key [kind, table, layer, index]")
    return ObjectKey(*value)


def expect(message: dict[str, Any], kind: Kind, address: str) -> dict[str, Any]:
    """``message`` if it is of ``kind``; a refusal or an unexpected answer raises TransferError."""
    if message["type"] == Kind.ERROR:
        raise TransferError(f"rdma pool client: the pool server at {address} refused: {message.get('code')}: "
                            f"{message.get('message')}")
    if message["type"] != kind:
        raise TransferError(f"rdma pool client: {address} answered {message['type']!r} to a {kind.value!r} request")
    return message


def keepalive(sock: socket.socket) -> None:
    """Notice a vanished host within a few seconds (a dead process closes its sockets at once anyway)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option_name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option_name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option_name), value)
