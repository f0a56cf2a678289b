"""The ``rdma`` tier: built from a spec like every tier, attached to a pool, with its documented deviations."""

from __future__ import annotations

import socket

import pytest
import torch

import tiermem.tiers.rdma  # noqa: F401  (registers the rdma tier kind)
from tiermem.errors import CapacityError, ConfigError, OwnershipError, TransferError
from tiermem.manager import build_tier
from tiermem.rdma import ReadRequest
from tiermem.rdma.synthetic import synthetic_bytes, synthetic_key
from tiermem.tiers import Tier
from tiermem.types import TierKind

from .conftest import INPROCESS_OBJECT_BYTES

SECRET_ENV = "TIERMEM_TEST_POOL_SECRET"
READ_BYTES = 512


@pytest.fixture
def tier(inprocess_pool, secret, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, secret.decode())
    built = build_tier({"kind": "rdma", "address": inprocess_pool.server.address, "secret_env": SECRET_ENV,
                        "transport": {"kind": "inprocess"}, "name": "peer0"})
    yield built
    built.close()


def test_rdma_tier_is_a_tier_sized_by_what_the_pool_exports(tier):
    assert isinstance(tier, Tier)
    assert tier.kind is TierKind.RDMA and tier.name == "peer0" and not tier.emulated
    assert tier.capacity_bytes == tier.used_bytes == sum(INPROCESS_OBJECT_BYTES)
    assert tier.free_bytes == 0
    stats = tier.stats()
    assert stats.blocks == len(INPROCESS_OBJECT_BYTES) and stats.largest_free_bytes == 0
    assert sorted(tier.keys()) == [synthetic_key(i) for i in range(len(INPROCESS_OBJECT_BYTES))]


def test_rdma_tier_refuses_allocation_with_the_contract_message(tier):
    with pytest.raises(CapacityError, match=r"cannot allocate.*capacity .*free 0 B.*tiermem pool serve"):
        tier.allocate(READ_BYTES)
    with pytest.raises(OwnershipError, match="holds no blocks"):
        tier.free(None)
    assert tier.owner_of(0) is None and not tier.contains(0)


def test_rdma_tier_reads_into_local_tensors(tier):
    dst = torch.empty(READ_BYTES, dtype=torch.uint8)
    handle = tier.submit([ReadRequest(synthetic_key(2), dst, offset_bytes=100)])
    handle.wait()
    assert handle.done() and torch.equal(dst, synthetic_bytes(2, 100, READ_BYTES))


def test_rdma_tier_fails_at_start_up_when_the_pool_is_unreachable(secret, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, secret.decode())
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransferError, match="cannot connect"):
        build_tier({"kind": "rdma", "address": f"127.0.0.1:{port}", "secret_env": SECRET_ENV,
                    "transport": {"kind": "inprocess"}, "connect_timeout_s": 1.0})


def test_rdma_tier_config_is_validated():
    with pytest.raises(ConfigError, match="host:port"):
        build_tier({"kind": "rdma", "address": "nowhere"})
    with pytest.raises(ConfigError, match="unknown key"):
        build_tier({"kind": "rdma", "address": "127.0.0.1:1", "secret": "on-the-command-line"})
    with pytest.raises(ConfigError, match="transfer_timeout_s"):
        build_tier({"kind": "rdma", "address": "127.0.0.1:1", "transfer_timeout_s": 0})
