"""What this host has for tiered memory: NUMA nodes, memory tiers, GPUs, CXL, devdax and RDMA devices.

Invariants:
- ``discover`` reads plain files under a sysfs root (and checks device nodes under a dev root); it runs
  no subprocess, so fixture trees in tests describe hosts exactly.
- The result is an immutable tree of frozen dataclasses. "Unknown" is ``None``, never ``-1``.
- A malformed file costs only its item: that node/GPU/device is skipped with a warning on the
  ``tiermem.topology`` logger. A missing optional attribute is ``None`` without a warning. Only a sysfs
  root that does not exist raises.
- GPUs are listed in PCI-address order; that is CUDA's ordinal order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
- A CXL *candidate* is a CPU-less NUMA node with memory. That is how a CXL expander in system-RAM mode
  appears, but other memory-only nodes (e.g. GPU memory on Grace Hopper) look the same.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from tiermem.errors import TopologyError
from tiermem.sysfs import (
    VmGuess,
    children,
    guess_vm,
    node_or_none,
    parse_each,
    parse_id_list,
    read_optional,
    trailing_index,
)

# GT/s per lane -> (PCIe generation, GB/s per lane per direction after line encoding).
_PCIE_GENERATIONS: dict[float, tuple[int, float]] = {
    2.5: (1, 0.25), 5.0: (2, 0.5), 8.0: (3, 0.985), 16.0: (4, 1.969),
    32.0: (5, 3.938), 64.0: (6, 7.563), 128.0: (7, 15.125),
}
# PCI class prefixes of GPUs: VGA, 3D controller, display controller (AMD Instinct reports 0x0380).
_GPU_CLASS_PREFIXES = ("0x0300", "0x0302", "0x0380")
_hex_or_decimal = functools.partial(int, base=0)  # CXL sizes are "0x..." hex, dax sizes decimal



class GpuVendor(str, enum.Enum):
    """GPU vendors recognised by their PCI vendor id."""

    NVIDIA = "0x10de"
    AMD = "0x1002"


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node. ``distances`` maps every online node id to the kernel's distance (10 = local)."""

    node_id: int
    cpus: tuple[int, ...]
    memory_total_bytes: int
    memory_free_bytes: int
    distances: Mapping[int, int] = dataclasses.field(hash=False)
    _JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("has_cpus", "is_cxl_candidate")

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)

    @property
    def is_cxl_candidate(self) -> bool:
        """CPU-less with memory: how a CXL expander in system-RAM mode appears (see module docstring)."""
        return not self.cpus and self.memory_total_bytes > 0


@dataclass(frozen=True)
class MemoryTier:
    """One Linux memory tier (``memory_tierN``); a lower id is a faster tier."""

    tier_id: int
    node_ids: tuple[int, ...]


@dataclass(frozen=True)
class PcieLink:
    """A PCIe link as sysfs reports it, with its generation and theoretical one-direction bandwidth."""

    speed_gts: float
    width: int
    _JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("generation", "bandwidth_gbps")

    @property
    def generation(self) -> int | None:
        entry = _PCIE_GENERATIONS.get(self.speed_gts)
        return entry[0] if entry else None

    @property
    def bandwidth_gbps(self) -> float | None:
        """GB/s in one direction after line encoding, before protocol overhead (~87% is reachable)."""
        entry = _PCIE_GENERATIONS.get(self.speed_gts)
        return round(entry[1] * self.width, 3) if entry else None


@dataclass(frozen=True)
class Gpu:
    """A GPU found on the PCI bus. ``current_link`` may run slower than ``max_link`` while idle."""

    pci_address: str
    vendor: GpuVendor
    device_id: str
    numa_node: int | None
    current_link: PcieLink | None
    max_link: PcieLink | None


@dataclass(frozen=True)
class CxlDevice:
    """A device on the CXL bus (memdev, port, decoder, region...); sizes exist only for memdevs."""

    name: str
    ram_size_bytes: int | None
    pmem_size_bytes: int | None
    numa_node: int | None


@dataclass(frozen=True)
class DaxDevice:
    """A devdax device; ``target_node`` is the NUMA node its memory joins when onlined as system RAM."""

    name: str
    size_bytes: int
    target_node: int | None
    numa_node: int | None
    char_device_present: bool


@dataclass(frozen=True)
class RdmaPort:
    """One port of an RDMA device; ``rate_gbit_s`` is in gigabits per second, as the kernel reports it."""

    port: int
    state: str | None
    rate_gbit_s: float | None
    link_layer: str | None


@dataclass(frozen=True)
class RdmaDevice:
    """An RDMA device from ``/sys/class/infiniband``."""

    name: str
    numa_node: int | None
    ports: tuple[RdmaPort, ...]


@dataclass(frozen=True)
class Topology:
    """Everything ``discover`` found under one sysfs root."""

    sysfs_root: Path
    nodes: tuple[NumaNode, ...]
    memory_tiers: tuple[MemoryTier, ...]
    gpus: tuple[Gpu, ...]
    cxl_devices: tuple[CxlDevice, ...]
    dax_devices: tuple[DaxDevice, ...]
    rdma_devices: tuple[RdmaDevice, ...]
    vm: VmGuess

    def node(self, node_id: int) -> NumaNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise TopologyError(
            f"topology: NUMA node {node_id} does not exist under {self.sysfs_root}; "
            f"existing nodes: {', '.join(str(n.node_id) for n in self.nodes) or 'none'}. "
            f"Pick one of those (see `tiermem topo`)."
        )

    def gpu_numa_node(self, index: int = 0) -> int | None:
        """NUMA node of the ``index``-th GPU in PCI order; ``None`` where sysfs does not say (VMs)."""
        if not 0 <= index < len(self.gpus):
            raise TopologyError(
                f"topology: GPU index {index} requested but {len(self.gpus)} GPU(s) found under "
                f"{self.sysfs_root / 'bus/pci/devices'}; use an index below {len(self.gpus)}."
            )
        return self.gpus[index].numa_node

    def cxl_candidate_nodes(self) -> tuple[NumaNode, ...]:
        return tuple(node for node in self.nodes if node.is_cxl_candidate)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (derived flags included; mapping keys become strings)."""
        return _plain(self)


def discover(sysfs_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> Topology:
    """Read this host's topology from ``sysfs_root`` (``dev_root`` is only checked for dax nodes)."""
    sysfs_root, dev_root = Path(sysfs_root), Path(dev_root)
    if not sysfs_root.is_dir():
        raise TopologyError(
            f"topology: sysfs root {sysfs_root} does not exist or is not a directory; "
            f"pass the directory where sysfs is mounted (normally /sys)."
        )
    node_paths = children(sysfs_root / "devices/system/node", r"node(\d+)")  # one per online node
    online_ids = tuple(trailing_index(p) for p in node_paths)
    return Topology(
        sysfs_root=sysfs_root,
        nodes=parse_each(node_paths, "NUMA node", lambda p: _numa_node(p, online_ids)),
        memory_tiers=parse_each(
            children(sysfs_root / "devices/virtual/memory_tiering", r"memory_tier(\d+)"),
            "memory tier",
            lambda p: MemoryTier(trailing_index(p), parse_id_list((p / "nodelist").read_text())),
        ),
        # PCI addresses are fixed-width hex, so a plain sort is PCI bus order (not a natural sort).
        gpus=parse_each(sorted((sysfs_root / "bus/pci/devices").glob("*")), "PCI device", _gpu),
        cxl_devices=parse_each(children(sysfs_root / "bus/cxl/devices", r".+"), "CXL device", _cxl_device),
        dax_devices=parse_each(
            children(sysfs_root / "bus/dax/devices", r"dax\d+\.\d+"), "dax device",
            lambda p: _dax_device(p, dev_root),
        ),
        rdma_devices=parse_each(
            children(sysfs_root / "class/infiniband", r".+"), "RDMA device", _rdma_device,
        ),
        vm=guess_vm(sysfs_root),
    )


def _numa_node(path: Path, online_ids: tuple[int, ...]) -> NumaNode:
    meminfo = {
        m.group(1): int(m.group(2)) * 1024
        for m in re.finditer(r"^Node \d+ (\w+):\s+(\d+) kB$", (path / "meminfo").read_text(), re.MULTILINE)
    }
    distances = tuple(int(d) for d in (path / "distance").read_text().split())
    if len(distances) != len(online_ids):
        raise ValueError(f"{len(distances)} distances for {len(online_ids)} nodes: {online_ids}")
    return NumaNode(
        node_id=trailing_index(path),
        cpus=parse_id_list((path / "cpulist").read_text()),
        memory_total_bytes=meminfo["MemTotal"],
        memory_free_bytes=meminfo["MemFree"],
        distances=MappingProxyType(dict(zip(online_ids, distances))),
    )


def _gpu(path: Path) -> Gpu | None:
    vendor, pci_class = ((path / name).read_text().strip() for name in ("vendor", "class"))
    if vendor not in {v.value for v in GpuVendor} or not pci_class.startswith(_GPU_CLASS_PREFIXES):
        return None
    return Gpu(
        pci_address=path.name,
        vendor=GpuVendor(vendor),
        device_id=(path / "device").read_text().strip(),
        numa_node=read_optional(path / "numa_node", node_or_none),
        current_link=_pcie_link(path, "current"),
        max_link=_pcie_link(path, "max"),
    )


def _pcie_link(path: Path, which: str) -> PcieLink | None:
    speed = read_optional(path / f"{which}_link_speed", str.strip)
    width = read_optional(path / f"{which}_link_width", str.strip)
    if speed is None or width is None or speed.startswith("Unknown"):
        return None
    match = re.match(r"^(\d+(?:\.\d+)?) GT/s", speed)
    if match is None:
        raise ValueError(f"cannot parse {which}_link_speed {speed!r}")
    return PcieLink(speed_gts=float(match.group(1)), width=int(width))


def _cxl_device(path: Path) -> CxlDevice:
    return CxlDevice(
        name=path.name,
        ram_size_bytes=read_optional(path / "ram/size", _hex_or_decimal),
        pmem_size_bytes=read_optional(path / "pmem/size", _hex_or_decimal),
        numa_node=read_optional(path / "numa_node", node_or_none),
    )


def _dax_device(path: Path, dev_root: Path) -> DaxDevice:
    return DaxDevice(
        name=path.name,
        size_bytes=_hex_or_decimal((path / "size").read_text()),
        target_node=read_optional(path / "target_node", node_or_none),
        numa_node=read_optional(path / "numa_node", node_or_none),
        char_device_present=(dev_root / path.name).exists(),
    )


def _rdma_device(path: Path) -> RdmaDevice:
    return RdmaDevice(
        name=path.name,
        numa_node=read_optional(path / "device/numa_node", node_or_none),
        ports=parse_each(children(path / "ports", r"\d+"), "RDMA port", _rdma_port),
    )


def _rdma_port(path: Path) -> RdmaPort:
    state = read_optional(path / "state", str.strip)  # e.g. "4: ACTIVE"
    rate = read_optional(path / "rate", str.split)  # e.g. "200 Gb/sec (4X HDR)"
    return RdmaPort(
        port=int(path.name),
        state=state.rpartition(": ")[2] if state else None,
        rate_gbit_s=float(rate[0]) if rate else None,
        link_layer=read_optional(path / "link_layer", str.strip),
    )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        names = [f.name for f in dataclasses.fields(value)] + list(getattr(value, "_JSON_PROPERTIES", ()))
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
