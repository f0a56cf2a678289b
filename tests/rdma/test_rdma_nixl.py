"""Two processes on loopback through NIXL: a `tiermem pool serve` child and the rdma tier in this process.

Shared memory (UCX's default on one host) for correctness and security; TCP (``UCX_TLS=tcp``) for the
fault tests, because a TCP read needs both processes to make progress and so is really in flight when
the server stops or dies (a shared-memory read completes inside ``post``).
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch

import tiermem.tiers.rdma  # noqa: F401  (registers the rdma tier kind)
from tiermem.errors import CapacityError, OwnershipError, TransferError
from tiermem.manager import build_tier
from tiermem.rdma import FallbackReader, Operation, ReadRequest, Span, TensorSource, Transfer
from tiermem.rdma.nixl import nixl_available
from tiermem.rdma.synthetic import synthetic_bytes, synthetic_key
from tiermem.types import ObjectKey, TierKind

from .conftest import PoolProcess, synthetic_tensor

pytestmark = [
    pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed (pip install tiermem[rdma])"),
    pytest.mark.timeout(180),
]

SHM_OBJECTS = 4
SHM_OBJECT_BYTES = 1 << 20
TCP_OBJECT_BYTES = 64 << 20  # ~60 ms over loopback TCP: long enough to be in flight
READ_BYTES = 4096
OFFSET_BYTES = 12_345
TIMEOUT_S = 2.0
FAILURE_SLACK_S = 3.0


@pytest.fixture(scope="module")
def shm_pool(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    secret_path = directory / "secret"
    secret_path.write_text("shm-pool-secret-0123456789abcdef")
    secret_path.chmod(0o600)
    process = PoolProcess(secret_path, directory / "server.log", "--capacity", "16MiB",
                          "--synthetic", f"{SHM_OBJECTS}x{SHM_OBJECT_BYTES}")
    yield process, secret_path
    process.stop()


@pytest.fixture
def tcp_pool(tmp_path, secret_file, monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")  # read by UCX when this process's agent is created, too
    process = PoolProcess(secret_file, tmp_path / "server.log", "--capacity", "160MiB",
                          "--synthetic", f"2x{TCP_OBJECT_BYTES}", env={"UCX_TLS": "tcp"})
    yield process
    process.stop()


def rdma_tier(address: str, secret_path, **extra):
    return build_tier({"kind": "rdma", "address": address, "secret_file": str(secret_path),
                       "transfer_timeout_s": TIMEOUT_S, **extra})


def nixl_read(client, local: Span, remote: Span) -> None:
    """Post a READ straight through the NIXL agent, bypassing tiermem's checks (as a rogue client would)."""
    agent = client.transport._agent
    descs = [agent.get_xfer_descs(np.array([[s.address, s.nbytes, 0]], dtype=np.uint64), "DRAM")
             for s in (local, remote)]
    agent.initialize_xfer("READ", descs[0], descs[1], client.transport._peers[client._peer]).release()


def test_reads_across_processes_are_bit_exact(shm_pool):
    process, secret_path = shm_pool
    tier = rdma_tier(process.address, secret_path)
    try:
        assert tier.kind is TierKind.RDMA and tier.capacity_bytes == SHM_OBJECTS * SHM_OBJECT_BYTES
        whole = [torch.empty(SHM_OBJECT_BYTES, dtype=torch.uint8) for _ in range(SHM_OBJECTS)]
        part = torch.empty(READ_BYTES, dtype=torch.uint8)
        tier.register(whole[0])  # a long-lived destination; the others are registered per transfer
        requests = [ReadRequest(synthetic_key(i), dst) for i, dst in enumerate(whole)]
        handle = tier.submit([*requests, ReadRequest(synthetic_key(3), part, offset_bytes=OFFSET_BYTES)])
        handle.wait()
        assert handle.done()
        for index, dst in enumerate(whole):
            assert torch.equal(dst, synthetic_tensor(index, SHM_OBJECT_BYTES))
        assert torch.equal(part, synthetic_bytes(3, OFFSET_BYTES, READ_BYTES))
    finally:
        tier.close()


def test_rdma_tier_refuses_allocation_and_names_the_pool(shm_pool):
    process, secret_path = shm_pool
    tier = rdma_tier(process.address, secret_path)
    try:
        with pytest.raises(CapacityError, match=f"cannot allocate.*free 0 B.*{process.address}"):
            tier.allocate(READ_BYTES)
        with pytest.raises(OwnershipError):
            tier.free(None)
        assert tier.free_bytes == 0 and tier.stats().blocks == SHM_OBJECTS and not tier.contains(0)
    finally:
        tier.close()


def test_wrong_secret_is_refused_across_processes(shm_pool, tmp_path):
    process, secret_path = shm_pool
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-pool-secret-0123456789ab")
    wrong.chmod(0o600)
    with pytest.raises(TransferError, match="auth_failed"):
        rdma_tier(process.address, wrong)
    tier = rdma_tier(process.address, secret_path)  # the server keeps serving others
    tier.close()
    assert "authentication failed" in process.log()


def test_out_of_bounds_descriptors_are_refused_by_server_and_by_nixl(shm_pool):
    process, secret_path = shm_pool
    tier = rdma_tier(process.address, secret_path)
    client = tier.client
    try:
        with pytest.raises(TransferError, match="out_of_bounds"):
            client.grant_spans([(synthetic_key(0), SHM_OBJECT_BYTES - 8, 16)])
        assert "outside its" in process.log()
        granted = client.grant_spans([(synthetic_key(0), 0, SHM_OBJECT_BYTES)])[0]
        dst = torch.zeros(2 * SHM_OBJECT_BYTES, dtype=torch.uint8)
        client.register(dst)
        past_end = Span(granted.address + SHM_OBJECT_BYTES - 8, 16)
        not_granted = Span(granted.address + 2 * SHM_OBJECT_BYTES, 16)  # neighbouring memory of the server
        for remote in (past_end, not_granted):
            with pytest.raises(TransferError, match="outside every span"):  # the transport's own check
                client.transport.post(Operation.READ, client._peer, [Transfer(Span(dst.data_ptr(), 16), remote)])
            with pytest.raises(Exception, match="NIXL_ERR_NOT_FOUND"):  # and NIXL's, below it
                nixl_read(client, Span(dst.data_ptr(), 16), remote)
        assert not dst.any()
        ok = torch.empty(READ_BYTES, dtype=torch.uint8)
        tier.submit([ReadRequest(synthetic_key(1), ok)]).wait()  # the same client still reads
        assert torch.equal(ok, synthetic_bytes(1, 0, READ_BYTES))
    finally:
        tier.close()


def test_stalled_server_times_out_then_recovers(tcp_pool, secret_file):
    tier = rdma_tier(tcp_pool.address, secret_file)
    try:
        dst = torch.empty(TCP_OBJECT_BYTES, dtype=torch.uint8)
        tier.client.grant([synthetic_key(0), synthetic_key(1)])  # so that the read needs no control request
        tcp_pool.signal(signal.SIGSTOP)
        start = time.monotonic()
        handle = tier.submit([ReadRequest(synthetic_key(0), dst)])
        with pytest.raises(TransferError, match="did not complete within"):
            handle.wait(TIMEOUT_S)
        assert time.monotonic() - start < TIMEOUT_S + FAILURE_SLACK_S
        tcp_pool.signal(signal.SIGCONT)
        small = torch.empty(READ_BYTES, dtype=torch.uint8)
        tier.submit([ReadRequest(synthetic_key(1), small, offset_bytes=OFFSET_BYTES)]).wait()
        assert torch.equal(small, synthetic_bytes(1, OFFSET_BYTES, READ_BYTES))
    finally:
        tier.close()


def test_server_killed_mid_transfer_fails_within_the_timeout_and_falls_back(tcp_pool, secret_file, manager):
    tier = rdma_tier(tcp_pool.address, secret_file)
    key = synthetic_key(1)
    try:
        dst = torch.zeros(TCP_OBJECT_BYTES, dtype=torch.uint8)
        tier.register(dst)
        handle = tier.submit([ReadRequest(key, dst)])
        assert not handle.done()  # in flight: over TCP this process must progress the read
        tcp_pool.signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TransferError, match="went away|failed|did not complete"):
            handle.wait(TIMEOUT_S)
        assert time.monotonic() - start < TIMEOUT_S + FAILURE_SLACK_S
        local = {key: synthetic_tensor(1, TCP_OBJECT_BYTES)}
        reader = FallbackReader([tier, TensorSource("dram copy", local, manager.copy)], attempt_timeout_s=TIMEOUT_S)
        again = reader.submit([ReadRequest(key, dst)])
        again.wait()
        assert again.served_by == ["dram copy"] and torch.equal(dst, local[key])
        with pytest.raises(TransferError):
            tier.submit([ReadRequest(ObjectKey("synthetic", "pool", 0, 0), dst)])
    finally:
        tier.close()


@pytest.mark.gpu
def test_reads_land_in_hbm(shm_pool):
    process, secret_path = shm_pool
    dst = torch.empty(SHM_OBJECT_BYTES, dtype=torch.uint8, device="cuda")  # CUDA is up before UCX starts
    part = torch.empty(READ_BYTES, dtype=torch.uint8, device="cuda")
    tier = rdma_tier(process.address, secret_path)
    try:
        tier.submit([ReadRequest(synthetic_key(2), dst), ReadRequest(synthetic_key(0), part, OFFSET_BYTES)]).wait()
        assert torch.equal(dst.cpu(), synthetic_tensor(2, SHM_OBJECT_BYTES))
        assert torch.equal(part.cpu(), synthetic_bytes(0, OFFSET_BYTES, READ_BYTES))
    finally:
        tier.close()
