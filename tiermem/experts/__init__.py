"""MoE experts: packed host homes, HBM slots, and modules that run experts out of them.

| module       | what                                                                           |
|--------------|--------------------------------------------------------------------------------|
| layout       | ``ExpertLayout``: one expert = one contiguous block; views back to tensors     |
| sources      | ``ExpertSource`` protocol; ``ModuleExperts`` reads in-memory experts modules   |
| checkpoint   | ``CheckpointExperts``: safetensors (Qwen/DeepSeek/OLMoE, Mixtral, fused names) |
| placement    | ``place_experts``: which host tier is each expert's home (hot ones nearer)     |
| store        | ``ExpertStore``: the homes, on TierManager host tiers                          |
| cache        | ``ExpertCache``: HBM slot pool + residency directory + eviction policy         |
| compute      | reference-order expert computation (bit-identical to transformers)             |
| routes       | ``RouteTracker``: the live ``RouteContext`` for predictors                     |
| runtime      | ``ExpertRuntime``, ``OffloadConfig``: one layer = demand, prefetch, compute    |
| moe          | ``OffloadedExperts``, ``OffloadedMoE``: drop-in modules                        |
| offload      | ``offload(model, ...)`` for transformers MoE models, ``OffloadHandle``         |

A new checkpoint naming scheme goes in ``checkpoint`` (a regex and its canonical names); a new
in-memory module layout in ``sources``; a new way to combine shared experts in ``moe.SharedExperts``.
Copies and their scheduling live in ``tiermem.prefetch.prefetcher``, not here.
"""

from tiermem.experts.cache import ExpertCache
from tiermem.experts.checkpoint import CheckpointExperts
from tiermem.experts.layout import ExpertLayout, Projections
from tiermem.experts.moe import OffloadedExperts, OffloadedMoE, SharedExperts
from tiermem.experts.offload import OffloadHandle, find_moe_blocks, offload
from tiermem.experts.placement import Placement, place_experts, single_tier
from tiermem.experts.runtime import ExpertRuntime, OffloadConfig
from tiermem.experts.sources import ExpertSource, ModuleExperts
from tiermem.experts.store import ExpertStore

__all__ = [
    "CheckpointExperts", "ExpertCache", "ExpertLayout", "ExpertRuntime", "ExpertSource", "ExpertStore",
    "ModuleExperts", "OffloadConfig", "OffloadHandle", "OffloadedExperts", "OffloadedMoE", "Placement",
    "Projections", "SharedExperts", "find_moe_blocks", "offload", "place_experts", "single_tier",
]
