"""Engram tables on any tier: DeepSeek-compatible hashing, prefetching lookup and the Engram block.

Map of the package (imports flow down this list):
- ``hashing``: ``EngramHashConfig``, ``NgramHasher`` (token ids -> row indices per layer).
- ``compression``: the optional token-id compression table, rebuilt from a tokenizer's strings.
- ``table``: ``EngramTable`` (one layer's rows, bf16 or fp8 + scale, in a tensor on any tier),
  safetensors I/O, pattern fill.
- ``rowmap``: ``RowMap``, the open-addressing row id -> slot map a cache is probed through.
- ``cache``: ``HotRowCache``, an optional HBM copy of the most frequent rows with measured hits.
- ``plan``: ``plan_fetch`` (batch de-duplication and cache hits, as a frozen ``FetchPlan``).
- ``gather``: the fused hash + gather and the UVA zero-copy gather (Triton kernels in ``uva_kernel``,
  loaded on first use), and the CPU gather into pinned staging.
- ``handle``: ``LookupHandle`` (one layer's rows of one submit; ``wait()``) and ``LayerLookupStats``.
- ``lookup``: ``EngramLookup.submit(token_ids) -> {layer: LookupHandle}``; ``handle.wait()``.
- ``module``: ``EngramModule.forward(hidden, rows)``, the block that fuses rows into the residual.

To add a gather method: a function in ``gather`` with the same contract (caller-owned buffers,
current stream), a ``GatherMethod`` member, and its branch in ``EngramLookup._gather``.
"""

from tiermem.engram.cache import CacheStats, HotRowCache
from tiermem.engram.compression import build_compression_table
from tiermem.engram.handle import LayerLookupStats, LookupHandle
from tiermem.engram.hashing import EngramHashConfig, NgramHasher
from tiermem.engram.lookup import EngramLookup, EngramLookupConfig, GatherMethod, StreamPriority
from tiermem.engram.module import EngramModule, EngramModuleConfig
from tiermem.engram.plan import FetchPlan, plan_fetch
from tiermem.engram.table import EngramTable, RowFormat, TableLayout

__all__ = [
    "CacheStats", "EngramHashConfig", "EngramLookup", "EngramLookupConfig", "EngramModule", "EngramModuleConfig",
    "EngramTable", "FetchPlan", "GatherMethod", "HotRowCache", "LayerLookupStats", "LookupHandle", "NgramHasher",
    "RowFormat", "StreamPriority", "TableLayout", "build_compression_table", "plan_fetch",
]
