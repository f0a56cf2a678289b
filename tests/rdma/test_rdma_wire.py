"""The control channel: secrets, proofs, framing and addresses."""

from __future__ import annotations

import socket
import struct

import pytest

from tiermem.errors import ConfigError, TransferError
from tiermem.rdma.wire import (
    MIN_SECRET_BYTES, Channel, key_from_wire, key_to_wire, load_secret, parse_address, proof, proof_matches,
)
from tiermem.types import ObjectKey

SECRET = b"0123456789abcdef0123456789abcdef"
NONCE_A = "aa" * 32
NONCE_B = "bb" * 32


def test_secret_is_read_from_an_owner_only_file(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    assert load_secret(str(path), None) == SECRET


def test_secret_file_readable_by_others_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(str(path), None)


def test_secret_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_POOL_SECRET", SECRET.decode())
    assert load_secret(None, "MY_POOL_SECRET") == SECRET


def test_missing_or_short_secret_is_refused(monkeypatch):
    monkeypatch.delenv("MY_POOL_SECRET", raising=False)
    with pytest.raises(ConfigError, match="MY_POOL_SECRET"):
        load_secret(None, "MY_POOL_SECRET")
    monkeypatch.setenv("MY_POOL_SECRET", "x" * (MIN_SECRET_BYTES - 1))
    with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_BYTES}"):
        load_secret(None, "MY_POOL_SECRET")


def test_proofs_depend_on_secret_side_and_both_nonces():
    reference = proof(SECRET, "client", NONCE_A, NONCE_B)
    assert proof_matches(reference, proof(SECRET, "client", NONCE_A, NONCE_B))
    variants = [proof(SECRET[::-1], "client", NONCE_A, NONCE_B), proof(SECRET, "server", NONCE_A, NONCE_B),
                proof(SECRET, "client", NONCE_B, NONCE_A), proof(SECRET, "client", NONCE_A, NONCE_A)]
    assert not any(proof_matches(reference, v) for v in variants)
    assert not proof_matches(reference, None)


def test_channel_round_trips_messages_and_refuses_oversized_frames():
    left, right = socket.socketpair()
    sender, receiver = Channel(left, "left"), Channel(right, "right")
    sender.send({"type": "directory", "objects": [[["expert", "w", 1, 2], 7]]})
    assert receiver.receive(4096) == {"type": "directory", "objects": [[["expert", "w", 1, 2], 7]]}
    left.sendall(struct.pack(">I", 10_000) + b"x")
    with pytest.raises(TransferError, match="10000-byte message"):
        receiver.receive(4096)
    sender.close()
    receiver.close()


def test_channel_reports_a_closed_peer():
    left, right = socket.socketpair()
    left.close()
    with pytest.raises(TransferError, match="closed the connection"):
        Channel(right, "peer").receive(4096)
    right.close()


def test_addresses_and_keys_are_validated():
    assert parse_address("127.0.0.1:7450") == ("127.0.0.1", 7450)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:port", "host:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    key = ObjectKey("engram", "t", 2, 9)
    assert key_from_wire(key_to_wire(key)) == key
    with pytest.raises(TransferError):
        key_from_wire(["engram", "t", "2", 9])
