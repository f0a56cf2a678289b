"""``rdma``: objects held by a pool server on a peer host (``tiermem pool serve``), read one-sidedly.

The tier is a ``PoolClient`` (``tiermem.rdma``) behind the Tier protocol: construction attaches and
authenticates (or raises), ``close()`` detaches. Reads go through the configured transport (NIXL by
default) straight into local memory: ``tier.submit([ReadRequest(key, dst, offset_bytes)])`` returns a
handle with ``done()``/``wait(timeout_s)``; ``dst`` may live on any local tier, HBM included.

Contract deviations, on purpose (the Tier protocol describes local memory):
- ``allocate`` raises ``CapacityError``: the pool's memory is placed by its server, and remote memory
  cannot be a local tensor view; ``free_bytes`` is therefore 0 and no ``Block`` ever exists, so
  ``free`` refuses, ``owner_of`` is None and ``contains`` is False;
- ``capacity_bytes`` and ``used_bytes`` are the bytes the pool exports (``stats().blocks`` its objects);
- bytes move with ``submit`` (the ``ObjectSource`` protocol, usable by ``FallbackReader``), not with
  ``TierManager.copy``, because the source is an object key, not a local tensor.
``link`` is declared (a 200 Gb/s NIC by default) until a bench measures it; figures measured with the
pool on this host are loopback figures (``tiermem.rdma.bench``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tiermem.config import format_bytes, option, require
from tiermem.errors import CapacityError, OwnershipError
from tiermem.rdma.client import PoolClient, PoolClientConfig, PoolHandle
from tiermem.rdma.source import ReadRequest
from tiermem.tiers.base import TIERS, Block, BuildContext, TierStats
from tiermem.types import LinkProfile, ObjectKey, TierKind


@dataclass(frozen=True)
class RdmaTierConfig(PoolClientConfig):
    """A pool server to attach to (see ``PoolClientConfig`` for the connection keys)."""

    name: str = option("rdma", help="Name used to address this tier.")
    bandwidth_gbps: float = option(25.0, help="Declared bandwidth from the pool (GB/s) until measured; "
                                              "25 GB/s is one 200 Gb/s NIC.")
    latency_us: float = option(5.0, help="Declared per-read latency from the pool (us) until measured.")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.bandwidth_gbps > 0, self, f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        require(self.latency_us >= 0, self, f"latency_us must be >= 0, got {self.latency_us}")


class RdmaTier:
    """A pool server's objects, read through a transport into local memory."""

    def __init__(self, config: RdmaTierConfig, client: PoolClient | None = None) -> None:
        self.client = client or PoolClient(config)
        self.name = config.name
        self.kind = TierKind.RDMA
        self.emulated = False
        self.numa_node = None
        self.device = torch.device("cpu")
        self.link = LinkProfile(config.bandwidth_gbps, config.latency_us)
        self.io_hooked = False

    @property
    def capacity_bytes(self) -> int:
        return sum(self.client.directory.values())

    @property
    def used_bytes(self) -> int:
        return self.capacity_bytes

    @property
    def free_bytes(self) -> int:
        return 0

    def keys(self) -> list[ObjectKey]:
        return list(self.client.directory)

    def holds(self, key: ObjectKey) -> bool:
        return self.client.holds(key)

    def nbytes(self, key: ObjectKey) -> int:
        return self.client.directory[key]

    def submit(self, requests: Sequence[ReadRequest]) -> PoolHandle:
        """Start one batched one-sided read of every request (see ``PoolClient.submit``)."""
        return self.client.submit(requests)

    def register(self, tensor: torch.Tensor) -> None:
        """Register a long-lived local destination once (see ``PoolClient.register``)."""
        self.client.register(tensor)

    def deregister(self, tensor: torch.Tensor) -> None:
        self.client.deregister(tensor)

    def allocate(self, nbytes: int) -> Block:
        capacity = format_bytes(self.capacity_bytes)
        raise CapacityError(
            f"tier {self.name!r}: cannot allocate {format_bytes(nbytes)} ({nbytes} bytes): capacity {capacity}, "
            f"used {capacity}, free 0 B. An rdma tier is a client of the pool at {self.client.address}: the pool's "
            "memory is placed by its server (`tiermem pool serve`) and cannot be a local tensor. Allocate the "
            "destination on a local tier and read objects with tier.submit([ReadRequest(key, dst)])"
        )

    def free(self, block: Block) -> None:
        raise OwnershipError(f"tier {self.name!r}: holds no blocks (it only reads objects of the pool at "
                             f"{self.client.address}); free the tensor on the tier that allocated it")

    def owner_of(self, address: int) -> Block | None:
        return None

    def contains(self, address: int) -> bool:
        return False

    def on_io(self, nbytes: int) -> None:
        """No hook: reads of this tier do not go through the transfer engine."""

    def stats(self) -> TierStats:
        capacity = self.capacity_bytes
        return TierStats(self.name, self.kind.value, self.emulated, capacity, capacity, capacity,
                         len(self.client.directory), 0)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"<RdmaTier {self.name!r} {self.client.name} {format_bytes(self.capacity_bytes)}>"


def _build(config: RdmaTierConfig, context: BuildContext) -> RdmaTier:
    return RdmaTier(config)


TIERS.register(TierKind.RDMA.value, RdmaTierConfig, _build)
