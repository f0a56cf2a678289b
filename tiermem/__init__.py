"""tiermem: a tiered-memory offloading runtime for LLM inference.

Places the sparse, huge, read-mostly state of modern models (MoE expert weights, Engram tables) across
HBM, host DRAM, CXL memory and RDMA peers, and brings each byte to the GPU just before it is needed.

Packages, lowest layer first (imports only flow downward; ``tests/test_layers.py`` enforces it):

| layer | modules                                   | role                                              |
|-------|-------------------------------------------|---------------------------------------------------|
| 0     | types, errors, config, registry           | keys, error hierarchy, frozen configs, registries  |
| 1     | numa, topology, defaults                  | what this host has; default tier layout           |
| 2     | tiers/, residency/, predict/, rdma/       | WHERE bytes live; WHAT is where; WHAT comes next; |
|       |                                           | peer-host pools read through NIXL                 |
| 3     | transfer/                                 | HOW bytes move (submit -> handle -> wait)         |
| 4     | manager                                   | TierManager: the allocator API over tiers+engine  |
| 5     | prefetch/, experts/, engram/, repair/,    | prediction-driven moves; MoE experts; Engram rows;|
|       | simulate/                                 | EP coverage repair; cost-model simulation         |
| 6     | bench/, cli/                              | ``tiermem bench``, the ``tiermem`` command        |

Public API: ``TierManager`` (allocator), ``ManagerConfig``, ``offload(model, ...)`` (MoE experts on host
tiers), ``ObjectKey``, the error classes.
"""

from tiermem.errors import (
    CapacityError, ConfigError, InjectedFault, OwnershipError, RegistryError, TierMemError, TopologyError,
    TransferError,
)
from tiermem.experts import offload
from tiermem.manager import ManagerConfig, TierManager
from tiermem.types import LinkProfile, ObjectKey, TierKind

__all__ = [
    "CapacityError", "ConfigError", "InjectedFault", "LinkProfile", "ManagerConfig", "ObjectKey", "OwnershipError",
    "RegistryError", "TierKind", "TierManager", "TierMemError", "TopologyError", "TransferError", "offload",
]
