"""Rich tables of a ``Topology`` for ``tiermem topo``: one table per section, "none found" where empty.

Invariant: pure presentation; everything shown comes from the ``Topology`` given, nothing is read here.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tiermem.config import format_bytes
from tiermem.topology import PcieLink, Topology


def render(topology: Topology) -> Group:
    """All sections, in the order a reader needs them: host, NUMA, tiers, GPUs, memory devices."""
    host = "a virtual machine" if topology.vm.is_vm else "no virtual machine detected"
    return Group(
        Text(f"Host (read from {topology.sysfs_root}): {host} (best-effort: {topology.vm.evidence})"),
        _numa_table(topology),
        _tiers_table(topology),
        _gpu_table(topology),
        _cxl_table(topology),
        _dax_table(topology),
        _rdma_table(topology),
    )


def format_id_list(ids: Iterable[int]) -> str:
    """The kernel's compact list form: ``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    ranges: list[list[int]] = []
    for i in sorted(set(ids)):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _numa_table(topology: Topology) -> RenderableType:
    if not topology.nodes:
        return _none_found("NUMA nodes", "kernel without NUMA support?")
    node_ids = [node.node_id for node in topology.nodes]
    distance_header = f"distance to {' '.join(map(str, node_ids))}"
    table = _table("NUMA nodes", "node", "cpus", "total", "free", distance_header, "CXL?")
    for node in topology.nodes:
        table.add_row(
            str(node.node_id),
            format_id_list(node.cpus) or "(none)",
            format_bytes(node.memory_total_bytes),
            format_bytes(node.memory_free_bytes),
            " ".join(str(node.distances.get(i, "?")) for i in node_ids),
            "candidate" if node.is_cxl_candidate else "",
        )
    if topology.cxl_candidate_nodes():
        table.caption = "CXL candidate: a CPU-less node with memory, as CXL memory in system-RAM mode appears"
    return table


def _tiers_table(topology: Topology) -> RenderableType:
    if not topology.memory_tiers:
        return _none_found("Memory tiers", "no /sys/devices/virtual/memory_tiering")
    table = _table("Memory tiers", "tier (lower = faster)", "nodes")
    for tier in topology.memory_tiers:
        table.add_row(str(tier.tier_id), format_id_list(tier.node_ids))
    return table


def _gpu_table(topology: Topology) -> RenderableType:
    if not topology.gpus:
        return _none_found("GPUs", "no NVIDIA/AMD display-class PCI device")
    table = _table("GPUs (PCI order)", "#", "PCI", "GPU", "NUMA", "link now", "link max", "GB/s")
    for index, gpu in enumerate(topology.gpus):
        bandwidth_gbps = gpu.max_link.bandwidth_gbps if gpu.max_link else None
        table.add_row(
            str(index), gpu.pci_address, f"{gpu.vendor.name} {gpu.device_id}",
            _node(gpu.numa_node),
            _link(gpu.current_link), _link(gpu.max_link),
            "?" if bandwidth_gbps is None else f"{bandwidth_gbps:.1f}",
        )
    table.caption = ("GB/s: theoretical, one direction, at the max link (an idle GPU often runs its link "
                     "slower). An unknown NUMA node is common in VMs.")
    return table


def _cxl_table(topology: Topology) -> RenderableType:
    if not topology.cxl_devices:
        return _none_found("CXL devices", "no /sys/bus/cxl/devices")
    table = _table("CXL devices", "device", "ram", "pmem", "NUMA")
    for device in topology.cxl_devices:
        table.add_row(device.name, _size(device.ram_size_bytes), _size(device.pmem_size_bytes),
                      _node(device.numa_node))
    return table


def _dax_table(topology: Topology) -> RenderableType:
    if not topology.dax_devices:
        return _none_found("devdax devices", "no /sys/bus/dax/devices/dax*")
    table = _table("devdax devices", "device", "size", "target node", "NUMA", "/dev node")
    for device in topology.dax_devices:
        table.add_row(device.name, format_bytes(device.size_bytes), _node(device.target_node),
                      _node(device.numa_node), "present" if device.char_device_present else "absent")
    return table


def _rdma_table(topology: Topology) -> RenderableType:
    if not topology.rdma_devices:
        return _none_found("RDMA devices", "no /sys/class/infiniband")
    table = _table("RDMA devices", "device", "NUMA", "port", "state", "rate", "link layer")
    for device in topology.rdma_devices:
        if not device.ports:
            table.add_row(device.name, _node(device.numa_node), "-", "-", "-", "-")
        for port in device.ports:
            rate = "?" if port.rate_gbit_s is None else f"{port.rate_gbit_s:g} Gb/s"
            table.add_row(device.name, _node(device.numa_node), str(port.port), port.state or "?", rate,
                          port.link_layer or "?")
    return table


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", caption_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


def _none_found(section: str, reason: str) -> Text:
    return Text(f"{section}: none found ({reason})", style="dim")


def _link(link: PcieLink | None) -> str:
    if link is None:
        return "?"
    generation = "?" if link.generation is None else str(link.generation)
    return f"Gen{generation} x{link.width}"


def _size(nbytes: int | None) -> str:
    return "-" if nbytes is None else format_bytes(nbytes)


def _node(node_id: int | None) -> str:
    return "unknown" if node_id is None else str(node_id)
