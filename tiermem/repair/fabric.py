"""The fabric a repair moves bytes over: nodes of GPUs, their links, and the route each copy takes.

Every link is a queue with one ``LinkProfile``. A move occupies every link on its route at once, and
the links share their bandwidth between the moves on them (a fluid model): a set of moves completes in
``max over links of (sum over its moves of nbytes / bandwidth + latency)``. That time is reachable
(run every move at the rate that ends it exactly then) and no schedule beats it, so it is what the
planner minimises. Host-memory bandwidth and the PCIe switch are assumed not to be the bottleneck.

Routes, fastest source first (``d`` is the destination rank, ``n(r)`` the node of rank ``r``):
| route        | source                                   | links                                  |
|--------------|------------------------------------------|----------------------------------------|
| nvlink       | replica in HBM of rank s, n(s) = n(d)    | nvlink_out[s], nvlink_in[d]            |
| gpu_rdma     | replica in HBM of rank s, n(s) != n(d)   | nic_out[s], nic_in[d]                  |
| local_dram   | DRAM copy on n(d)                        | pcie_h2d[d]                            |
| local_cxl    | CXL expander copy on n(d)                | cxl[n(d)], pcie_h2d[d]                 |
| rdma_dram    | DRAM copy on another node m              | host_nic_out[m], nic_in[d]             |
| rdma_cxl     | CXL expander copy on another node m      | cxl[m], host_nic_out[m], nic_in[d]     |
| cxl_pool     | the CXL pool shared by every node        | cxl_pool, pcie_h2d[d]                  |
| disk         | the checkpoint on n(d)'s local disk      | disk[n(d)], pcie_h2d[d]                |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tiermem.config import option, require
from tiermem.types import LinkProfile


class LinkKind(str, enum.Enum):
    """A kind of link; each link of a fabric is one kind and one owner (a rank or a node)."""

    NVLINK_OUT = "nvlink_out"  # per rank: a GPU's HBM read by a peer GPU of its node
    NVLINK_IN = "nvlink_in"  # per rank
    PCIE_H2D = "pcie_h2d"  # per rank: host memory into this GPU
    NIC_OUT = "nic_out"  # per rank: GPUDirect RDMA out of a GPU
    NIC_IN = "nic_in"  # per rank: RDMA into a GPU
    HOST_NIC_OUT = "host_nic_out"  # per node: RDMA reads of a node's host memory (DRAM and CXL)
    CXL = "cxl"  # per node: the node's CXL expander(s)
    CXL_POOL = "cxl_pool"  # one: a CXL memory pool every node reaches through a switch
    DISK = "disk"  # per node: the checkpoint on local NVMe


class Route(str, enum.Enum):
    """How one move reaches its destination GPU (see the module table)."""

    NVLINK = "nvlink"
    GPU_RDMA = "gpu_rdma"
    LOCAL_DRAM = "local_dram"
    LOCAL_CXL = "local_cxl"
    RDMA_DRAM = "rdma_dram"
    RDMA_CXL = "rdma_cxl"
    CXL_POOL = "cxl_pool"
    DISK = "disk"

    @property
    def crosses_ranks(self) -> bool:
        """True when another rank must send the bytes (the destination cannot read them itself)."""
        return self in (Route.NVLINK, Route.GPU_RDMA, Route.RDMA_DRAM, Route.RDMA_CXL)


_PROFILE_FIELD = {
    LinkKind.NVLINK_OUT: "nvlink", LinkKind.NVLINK_IN: "nvlink", LinkKind.PCIE_H2D: "pcie", LinkKind.NIC_OUT: "nic",
    LinkKind.NIC_IN: "nic", LinkKind.HOST_NIC_OUT: "host_nic", LinkKind.CXL: "cxl", LinkKind.CXL_POOL: "cxl_pool",
    LinkKind.DISK: "disk",
}
_NODE_LINKS = frozenset({LinkKind.HOST_NIC_OUT, LinkKind.CXL, LinkKind.DISK})


@dataclass(frozen=True, order=True)
class Link:
    """One queue of the fabric: ``kind`` owned by a rank or a node (``owner`` 0 for the pool)."""

    kind: LinkKind
    owner: int

    def __str__(self) -> str:
        unit = "pool" if self.kind is LinkKind.CXL_POOL else ("node" if self.kind in _NODE_LINKS else "rank")
        return self.kind.value if unit == "pool" else f"{self.kind.value}[{unit} {self.owner}]"


@dataclass(frozen=True)
class FabricConfig:
    """Nodes of GPUs and the profile of every link kind (declared figures unless measured)."""

    gpus_per_node: int = option(8, help="GPUs (EP ranks) per node; rank r is on node r // gpus_per_node.")
    nvlink: LinkProfile = option(LinkProfile(400.0, 3.0),
                                 help="One GPU's NVLink to peers of its node, per direction (H100: ~400 GB/s).")
    pcie: LinkProfile = option(LinkProfile(55.0, 10.0), help="Pinned host-to-GPU PCIe Gen5 x16 (55 GB/s measured).")
    nic: LinkProfile = option(LinkProfile(50.0, 5.0), help="One GPU's RDMA NIC per direction (400 Gb/s = 50 GB/s).")
    host_nic: LinkProfile = option(LinkProfile(50.0, 5.0), help="The NIC serving RDMA reads of a node's host memory.")
    cxl: LinkProfile = option(LinkProfile(26.0, 0.4), help="A node's CXL expander read by DMA (26 GB/s published).")
    cxl_pool: LinkProfile = option(LinkProfile(26.0, 0.6), help="The shared CXL pool, aggregate over all nodes.")
    disk: LinkProfile = option(LinkProfile(5.0, 100.0), help="A node's NVMe holding the checkpoint.")

    def __post_init__(self) -> None:
        require(self.gpus_per_node >= 1, self, f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        for kind in LinkKind:
            profile = self.profile(kind)
            require(profile.bandwidth_gbps > 0 and profile.latency_us >= 0, self,
                    f"the {kind.value} link needs bandwidth_gbps > 0 and latency_us >= 0, got {profile}")

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def profile(self, kind: LinkKind) -> LinkProfile:
        return getattr(self, _PROFILE_FIELD[kind])

    def seconds(self, link: Link, nbytes: int) -> float:
        """Time ``nbytes`` occupy ``link``: its latency plus size over bandwidth."""
        return self.profile(link.kind).transfer_time_s(nbytes)

    def route_links(self, route: Route, holder: int | None, dst_rank: int) -> tuple[Link, ...]:
        """The links a move over ``route`` occupies; ``holder`` is the source rank (HBM routes) or node."""
        node = self.node_of(dst_rank)
        if route is Route.NVLINK:
            return Link(LinkKind.NVLINK_OUT, holder), Link(LinkKind.NVLINK_IN, dst_rank)
        if route is Route.GPU_RDMA:
            return Link(LinkKind.NIC_OUT, holder), Link(LinkKind.NIC_IN, dst_rank)
        if route is Route.LOCAL_DRAM:
            return (Link(LinkKind.PCIE_H2D, dst_rank),)
        if route is Route.LOCAL_CXL:
            return Link(LinkKind.CXL, node), Link(LinkKind.PCIE_H2D, dst_rank)
        if route is Route.RDMA_DRAM:
            return Link(LinkKind.HOST_NIC_OUT, holder), Link(LinkKind.NIC_IN, dst_rank)
        if route is Route.RDMA_CXL:
            return Link(LinkKind.CXL, holder), Link(LinkKind.HOST_NIC_OUT, holder), Link(LinkKind.NIC_IN, dst_rank)
        if route is Route.CXL_POOL:
            return Link(LinkKind.CXL_POOL, 0), Link(LinkKind.PCIE_H2D, dst_rank)
        return Link(LinkKind.DISK, node), Link(LinkKind.PCIE_H2D, dst_rank)
