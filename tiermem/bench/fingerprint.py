"""The environment a result was measured in, and a short stable id of it.

Invariants: the fingerprint holds only facts about the host and software (no timestamps, no results),
so two runs on the same unchanged host share one id; a fact that cannot be read is ``None``, never a
guess. Reading happens once per run, from files (``/proc``, sysfs through ``topology``) and library
calls; no subprocess is started.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tiermem.tiers import Tier
from tiermem.topology import Gpu, PcieLink, Topology

_OPTIONAL_PACKAGES = ("numba", "triton", "numpy")


def collect(topology: Topology, tiers: Iterable[Tier], *, device: torch.device | None,
            cpu_node: int | None) -> dict[str, Any]:
    """Every fact a reader needs to judge a figure: GPU, link, CPU, NUMA, kernel, VM, software, tiers."""
    return {
        "gpu": _gpu(topology, device),
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(), "bound_node": cpu_node,
                "torch_threads": torch.get_num_threads(), "llc_bytes": llc_bytes()},
        "numa": {str(n.node_id): {"cpus": len(n.cpus), "distances": {str(k): v for k, v in n.distances.items()}}
                 for n in topology.nodes},  # not memory sizes: in some VMs they grow as memory is touched
        "kernel": platform.release(),
        "transparent_hugepages": transparent_hugepages(),
        "vm": {"is_vm": topology.vm.is_vm, "evidence": topology.vm.evidence},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda_runtime": torch.version.cuda, **{p: _version(p) for p in _OPTIONAL_PACKAGES}},
        "tiers": {t.name: {"kind": t.kind.value, "emulated": bool(t.emulated), "numa_node": t.numa_node}
                  for t in tiers},
    }


def fingerprint_id(env: dict[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``env``."""
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


def theoretical_pcie_gbps(env: dict[str, Any]) -> float | None:
    """One-direction PCIe bandwidth of the measured GPU's link, from the fingerprint (None if unknown)."""
    gpu = env.get("gpu") or {}
    return (gpu.get("pcie") or {}).get("theoretical_gbps")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def llc_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the largest cache level of CPU 0 (the last-level cache), or None."""
    sizes = []
    for index in cache_dir.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes) if sizes else None


def transparent_hugepages(path: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> str | None:
    """The kernel's THP mode (``always``, ``madvise``, ``never``): host tiers ask for huge pages by madvise."""
    try:
        match = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def nvidia_driver_version(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    try:
        match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9.]+)", path.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _gpu(topology: Topology, device: torch.device | None) -> dict[str, Any] | None:
    if device is None or device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    sysfs_gpu = matching_gpu(topology, props, device.index or 0)
    return {
        "index": device.index, "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory, "sms": props.multi_processor_count,
        "driver": nvidia_driver_version(), "pci_address": sysfs_gpu.pci_address if sysfs_gpu else None,
        "numa_node": sysfs_gpu.numa_node if sysfs_gpu else None,
        "pcie": pcie_facts(sysfs_gpu) if sysfs_gpu else None,
    }


def matching_gpu(topology: Topology, props: Any, index: int) -> Gpu | None:
    """The sysfs GPU with the CUDA device's PCI address; by position when the address is not exposed."""
    bus, slot = getattr(props, "pci_bus_id", None), getattr(props, "pci_device_id", None)
    if bus is not None and slot is not None:
        domain = getattr(props, "pci_domain_id", 0) or 0
        prefix = f"{domain:04x}:{bus:02x}:{slot:02x}."
        return next((g for g in topology.gpus if g.pci_address.startswith(prefix)), None)
    return topology.gpus[index] if index < len(topology.gpus) else None


def pcie_facts(gpu: Gpu) -> dict[str, Any]:
    return {"current": _link(gpu.current_link), "max": _link(gpu.max_link),
            "theoretical_gbps": _theoretical(gpu.current_link, gpu.max_link)}


def _link(link: PcieLink | None) -> str | None:
    return f"Gen{link.generation or '?'} x{link.width}" if link else None


def _theoretical(current: PcieLink | None, maximum: PcieLink | None) -> float | None:
    """Lane rate of the fastest speed the link reports times its negotiated width.

    An idle GPU may train its link down in speed (not width) to save power, so ``current`` alone would
    understate what the link does under load.
    """
    links = [link for link in (current, maximum) if link is not None and link.bandwidth_gbps is not None]
    if not links:
        return None
    fastest = max(links, key=lambda link: link.speed_gts)
    width = current.width if current is not None else fastest.width
    return round(fastest.bandwidth_gbps / fastest.width * width, 3)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
