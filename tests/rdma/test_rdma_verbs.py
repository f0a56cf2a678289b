"""The pyverbs backend where no RDMA device exists (every machine this project runs on)."""

from __future__ import annotations

import pytest

from tiermem.errors import TopologyError
from tiermem.rdma import TransportConfig, TransportKind, make_transport
from tiermem.topology import discover


def test_verbs_transport_without_a_device_refuses_with_the_reason_and_the_alternative():
    if discover().rdma_devices:
        pytest.skip("this host has an RDMA device; the refusal path does not apply")
    with pytest.raises(TopologyError, match=r"(pyverbs is not importable|no RDMA device).*nixl"):
        make_transport(TransportConfig(kind=TransportKind.VERBS), "test")
