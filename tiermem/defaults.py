"""The default tier layout for a host, derived from its topology (a pure function of what was found).

- ``hbm``: 1 GiB on GPU 0, when a GPU is usable;
- ``dram``: 1 GiB on the GPU's NUMA node (else the first node with CPUs);
- ``cxl``: 1 GiB on the first CPU-less (CXL candidate) node; else on the first devdax device whose
  /dev node exists; else *emulated*, backed by the dram node and labelled emulated everywhere.
Capacities are small on purpose: arenas are mapped on demand, and users size real deployments.
"""

from __future__ import annotations

from typing import Any

from tiermem.topology import Topology

DEFAULT_CAPACITY = "1GiB"


def default_tier_specs(topology: Topology, *, gpu_count: int, numa_usable: bool) -> list[dict[str, Any]]:
    """Tier tables (as a user would write them in TOML) for this host."""
    specs: list[dict[str, Any]] = []
    if gpu_count > 0:
        specs.append({"kind": "hbm", "capacity_bytes": DEFAULT_CAPACITY})
    dram_node = _dram_node(topology, gpu_count) if numa_usable else None
    specs.append({"kind": "dram", "capacity_bytes": DEFAULT_CAPACITY, "numa_node": dram_node})
    cxl_nodes = topology.cxl_candidate_nodes()
    dax = [d for d in topology.dax_devices if d.char_device_present]
    if cxl_nodes and numa_usable:
        specs.append({"kind": "cxl", "capacity_bytes": DEFAULT_CAPACITY, "backing": "numa",
                      "numa_node": cxl_nodes[0].node_id})
    elif dax:
        specs.append({"kind": "cxl", "capacity_bytes": DEFAULT_CAPACITY, "backing": "devdax",
                      "dax_path": f"/dev/{dax[0].name}"})
    else:
        specs.append({"kind": "cxl", "capacity_bytes": DEFAULT_CAPACITY, "backing": "emulated",
                      "numa_node": dram_node})
    return specs


def _dram_node(topology: Topology, gpu_count: int) -> int | None:
    if gpu_count > 0 and topology.gpus:
        node = topology.gpu_numa_node(0)
        if node is not None:
            return node
    with_cpus = [n.node_id for n in topology.nodes if n.has_cpus and n.memory_total_bytes > 0]
    return with_cpus[0] if with_cpus else None
