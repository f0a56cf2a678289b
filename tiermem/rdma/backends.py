"""Build the transport a ``TransportConfig`` names (NIXL and pyverbs are imported only when asked for)."""

from __future__ import annotations

from tiermem.rdma.inprocess import InProcessTransport
from tiermem.rdma.nixl import NixlTransport
from tiermem.rdma.transport import Transport, TransportConfig, TransportKind
from tiermem.rdma.verbs import VerbsTransport


def make_transport(config: TransportConfig, name: str) -> Transport:
    """A ready transport endpoint named after ``name``; TopologyError when its engine is missing here."""
    if config.kind is TransportKind.NIXL:
        return NixlTransport(name, config)
    if config.kind is TransportKind.VERBS:
        return VerbsTransport(name, config)
    return InProcessTransport(name)
