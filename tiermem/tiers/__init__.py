"""WHERE bytes live: the Tier protocol and every registered tier kind.

| module   | kind     | what                                                         |
|----------|----------|--------------------------------------------------------------|
| base     |          | Tier protocol, Block, TIERS registry, ArenaTier              |
| arena    |          | offset allocator (best fit, alignment, coalescing)           |
| hostmem  |          | mmap + mbind + first touch + cudaHostRegister                |
| hbm      | hbm      | GPU memory                                                   |
| dram     | dram     | host DRAM on a NUMA node                                     |
| cxl      | cxl      | CXL node, devdax, or emulated CXL (labelled emulated)        |
| sim      | sim      | modelled bandwidth/latency, for tests and simulation         |
| faulty   | faulty   | wraps a tier, injects failures and delays                    |
| rdma     | rdma     | a pool server's objects on a peer host, read one-sidedly     |

Add a tier: a module with a frozen config and a factory registered in ``TIERS``; import it here.
"""

from tiermem.tiers import cxl, dram, faulty, hbm, rdma, sim  # noqa: F401  (registration)
from tiermem.tiers.base import TIERS, Block, BuildContext, Tier, TierStats

__all__ = ["TIERS", "Block", "BuildContext", "Tier", "TierStats"]
