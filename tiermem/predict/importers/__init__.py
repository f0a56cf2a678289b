"""Importers: turn the routing that engines and frameworks expose into ``RouteTrace``s.

- ``sglang``: expert distribution recorder dumps (``per_token``) and ``return_routed_experts`` answers;
- ``vllm``: ``--enable-return-routed-experts`` outputs (offline objects or server JSON);
- ``transformers``: ``output_router_logits`` tuples;
- ``recorder``: ``TraceRecorder``, fed layer by layer by models run through ``tiermem.offload``.

Extension: a new source gets its own module that collects rows with ``rows.RowBuilder`` (and
``rows.blank_unrouted`` for zero-filled layers) and returns ``builder.build(...)``.
"""

from tiermem.predict.importers.recorder import TraceRecorder
from tiermem.predict.importers.sglang import (
    from_sglang_per_token,
    from_sglang_routed_experts,
    load_sglang_per_token_dump,
)
from tiermem.predict.importers.transformers import from_router_logits
from tiermem.predict.importers.vllm import from_vllm_outputs

__all__ = [
    "TraceRecorder",
    "from_router_logits",
    "from_sglang_per_token",
    "from_sglang_routed_experts",
    "from_vllm_outputs",
    "load_sglang_per_token_dump",
]
