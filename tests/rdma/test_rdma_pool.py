"""The pool protocol end to end in one process (inprocess transport): reads, security refusals, faults."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch

from tiermem.errors import ConfigError, TransferError
from tiermem.rdma import (
    FallbackReader, Operation, PoolClient, PoolClientConfig, PoolServer, PoolServerConfig, ReadRequest, Span,
    TensorSource, Transfer, WriteRequest, measure_read_bandwidth,
)
from tiermem.rdma.nixl import nixl_available
from tiermem.rdma.synthetic import synthetic_bytes, synthetic_key
from tiermem.types import ObjectKey

from .conftest import INPROCESS_OBJECT_BYTES

SMALL_READ_BYTES = 1000
OFFSET_BYTES = 777
LOST_NOTICE_S = 2.0
AUTH_TIMEOUT_S = 0.3


def attach(pool, secret, **overrides) -> PoolClient:
    config = PoolClientConfig(address=pool.server.address, transport=pool.transport, **overrides)
    return PoolClient(config, secret=secret)


def test_whole_objects_and_ranges_read_bit_exact(inprocess_pool, secret):
    with attach(inprocess_pool, secret) as client:
        assert client.directory == {synthetic_key(i): n for i, n in enumerate(INPROCESS_OBJECT_BYTES)}
        whole = [torch.empty(n, dtype=torch.uint8) for n in INPROCESS_OBJECT_BYTES]
        part = torch.empty(SMALL_READ_BYTES, dtype=torch.uint8)
        requests = [ReadRequest(synthetic_key(i), dst) for i, dst in enumerate(whole)]
        requests.append(ReadRequest(synthetic_key(2), part, offset_bytes=OFFSET_BYTES))
        client.submit(requests).wait()
    for index, dst in enumerate(whole):
        assert torch.equal(dst, inprocess_pool.objects[synthetic_key(index)])
    assert torch.equal(part, synthetic_bytes(2, OFFSET_BYTES, SMALL_READ_BYTES))


def test_wrong_secret_is_refused_logged_and_others_keep_being_served(inprocess_pool, secret, caplog):
    with caplog.at_level(logging.WARNING, logger="tiermem.rdma"):
        with pytest.raises(TransferError, match="auth_failed"):
            attach(inprocess_pool, b"not-the-pool-secret-at-all-0000")
    assert "authentication failed" in caplog.text
    assert inprocess_pool.server.stats()["refusals"] == 1
    with attach(inprocess_pool, secret) as client:
        dst = torch.empty(SMALL_READ_BYTES, dtype=torch.uint8)
        client.submit([ReadRequest(synthetic_key(0), dst)]).wait()
    assert torch.equal(dst, synthetic_bytes(0, 0, SMALL_READ_BYTES))


def test_out_of_bounds_grant_is_refused_by_the_server_and_logged(inprocess_pool, secret, caplog):
    size = INPROCESS_OBJECT_BYTES[1]
    with attach(inprocess_pool, secret) as client, caplog.at_level(logging.WARNING, logger="tiermem.rdma"):
        for offset, nbytes in ((0, size + 1), (size - 10, 11), (-1, 10), (0, 0)):
            with pytest.raises(TransferError, match="out_of_bounds"):
                client.grant_spans([(synthetic_key(1), offset, nbytes)])
        with pytest.raises(TransferError, match="unknown_object"):
            client.grant_spans([(ObjectKey("expert", "w", 0, 99), 0, 1)])
        assert client.grant_spans([(synthetic_key(1), size - 10, 10)])[0].nbytes == 10
    assert caplog.text.count("outside its") >= 4
    assert inprocess_pool.server.stats()["refusals"] == 5


def test_out_of_bounds_read_is_refused_before_any_io(inprocess_pool, secret):
    size = INPROCESS_OBJECT_BYTES[0]
    with attach(inprocess_pool, secret) as client:
        dst = torch.zeros(SMALL_READ_BYTES, dtype=torch.uint8)
        with pytest.raises(TransferError, match="outside its"):
            client.submit([ReadRequest(synthetic_key(0), dst, offset_bytes=size - SMALL_READ_BYTES + 1)])
        with pytest.raises(TransferError, match="holds no object"):
            client.submit([ReadRequest(ObjectKey("expert", "w", 0, 99), dst)])
        assert inprocess_pool.server.stats()["grants"] == 0
    assert not dst.any()


def test_transport_refuses_a_remote_span_outside_what_was_granted(inprocess_pool, secret):
    with attach(inprocess_pool, secret) as client:
        granted = client.grant_spans([(synthetic_key(0), 0, INPROCESS_OBJECT_BYTES[0])])[0]
        dst = torch.zeros(2 * INPROCESS_OBJECT_BYTES[0], dtype=torch.uint8)
        client.register(dst)
        beyond = Span(granted.address, granted.nbytes + 1)
        with pytest.raises(TransferError, match="outside every span"):
            client.transport.post(Operation.READ, client._peer, [Transfer(Span(dst.data_ptr(), beyond.nbytes), beyond)])
        other = inprocess_pool.objects[synthetic_key(1)]
        with pytest.raises(TransferError, match="outside every span"):
            client.transport.post(Operation.READ, client._peer,
                                  [Transfer(Span(dst.data_ptr(), 16), Span(other.data_ptr(), 16))])
    assert not dst.any()


def test_writes_need_a_writable_pool(inprocess_pool, secret, manager):
    source = torch.full((SMALL_READ_BYTES,), 7, dtype=torch.uint8)
    with attach(inprocess_pool, secret) as client:
        assert not client.writable
        with pytest.raises(TransferError, match="read-only"):
            client.submit_write([WriteRequest(synthetic_key(0), source)])
        with pytest.raises(TransferError, match="read_only"):
            client.grant_spans([(synthetic_key(0), 0, 1)], write=True)
    target = manager.empty(SMALL_READ_BYTES, tier="dram").zero_()
    config = PoolServerConfig(writable=True, transport=inprocess_pool.transport)
    with PoolServer(config, secret, {synthetic_key(0): target}) as server:
        client = PoolClient(PoolClientConfig(address=server.address, transport=inprocess_pool.transport),
                            secret=secret)
        with client:
            client.submit_write([WriteRequest(synthetic_key(0), source)]).wait()
    assert torch.equal(target, source)


def test_silent_unauthenticated_peer_is_dropped_and_others_are_served(secret, manager, inprocess_pool):
    config = PoolServerConfig(auth_timeout_s=AUTH_TIMEOUT_S, transport=inprocess_pool.transport)
    objects = {synthetic_key(0): inprocess_pool.objects[synthetic_key(0)]}
    with PoolServer(config, secret, objects) as server:
        host, port = server.address.split(":")
        silent = socket.create_connection((host, int(port)), timeout=5)
        silent.recv(4096)  # the challenge; then say nothing
        client = PoolClient(PoolClientConfig(address=server.address, transport=inprocess_pool.transport),
                            secret=secret)
        with client:
            assert client.holds(synthetic_key(0))
        silent.settimeout(5)
        assert silent.recv(4096) == b""  # dropped after auth_timeout_s
        silent.close()


def test_client_fails_fast_once_the_server_is_gone(inprocess_pool, secret):
    client = attach(inprocess_pool, secret)
    inprocess_pool.server.close()
    deadline = time.monotonic() + LOST_NOTICE_S
    while client.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.lost is not None
    with pytest.raises(TransferError, match="is gone"):
        client.submit([ReadRequest(synthetic_key(0), torch.empty(16, dtype=torch.uint8))])
    client.close()


def test_fallback_reads_a_local_copy_when_the_pool_is_gone(inprocess_pool, secret, manager):
    local = {key: tensor.clone() for key, tensor in inprocess_pool.objects.items()}
    client = attach(inprocess_pool, secret)
    reader = FallbackReader([client, TensorSource("dram copy", local, manager.copy)])
    first = torch.empty(SMALL_READ_BYTES, dtype=torch.uint8)
    handle = reader.submit([ReadRequest(synthetic_key(1), first)])
    handle.wait()
    assert handle.served_by == [client.name]
    inprocess_pool.server.close()
    second = torch.empty(SMALL_READ_BYTES, dtype=torch.uint8)
    handle = reader.submit([ReadRequest(synthetic_key(1), second, offset_bytes=OFFSET_BYTES)])
    handle.wait()
    assert handle.served_by == ["dram copy"]
    assert torch.equal(second, synthetic_bytes(1, OFFSET_BYTES, SMALL_READ_BYTES))
    client.close()


def test_fallback_raises_when_no_source_holds_the_object(inprocess_pool, secret, manager):
    with attach(inprocess_pool, secret) as client:
        reader = FallbackReader([client, TensorSource("empty", {}, manager.copy)])
        with pytest.raises(TransferError, match="no source left"):
            reader.submit([ReadRequest(ObjectKey("expert", "w", 0, 99), torch.empty(4, dtype=torch.uint8))])


def test_transport_mismatch_is_refused_at_attach(inprocess_pool, secret):
    if not nixl_available():
        pytest.skip("NIXL is not installed (pip install tiermem[rdma])")
    with pytest.raises(ConfigError, match="same transport"):
        PoolClient(PoolClientConfig(address=inprocess_pool.server.address), secret=secret)


def test_bandwidth_figures_carry_an_honest_path_label(inprocess_pool, secret):
    with attach(inprocess_pool, secret) as client:
        result = measure_read_bandwidth(client, sum(INPROCESS_OBJECT_BYTES), trials=3)
        with pytest.raises(ConfigError, match="fewer than"):
            measure_read_bandwidth(client, sum(INPROCESS_OBJECT_BYTES) + 1, trials=1)
    assert "not RDMA" in result["path"] and result["loopback"]
    assert result["objects"] == len(INPROCESS_OBJECT_BYTES) and len(result["seconds"]) == 3
    assert result["bandwidth_gbps_best"] >= result["bandwidth_gbps_median"] > 0


def test_connections_beyond_the_limit_are_refused_as_busy(inprocess_pool, secret):
    config = PoolServerConfig(max_connections=2, transport=inprocess_pool.transport)
    objects = {synthetic_key(0): inprocess_pool.objects[synthetic_key(0)]}
    with PoolServer(config, secret, objects) as server:
        client_config = PoolClientConfig(address=server.address, transport=inprocess_pool.transport)
        with PoolClient(client_config, secret=secret):  # its data and watch connections
            with pytest.raises(TransferError, match="busy"):
                PoolClient(client_config, secret=secret)
        deadline = time.monotonic() + LOST_NOTICE_S
        while server.stats()["connections"] and time.monotonic() < deadline:
            time.sleep(0.01)
        PoolClient(client_config, secret=secret).close()  # served again once the first one left
