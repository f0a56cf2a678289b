"""Importer for transformers ``output_router_logits=True``: per-layer router logits -> top-k experts.

MoE models in transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) return ``router_logits``: a
tuple with one tensor per MoE layer, ``[batch * seq_len, num_experts]`` (some models give
``[batch, seq_len, num_experts]``; layers without experts may be ``None``).

Invariants: ids are the top-k of each row's logits (the order ``softmax`` gives too) and ``weights``
are the softmax probabilities of the chosen experts, not renormalised; padded positions
(``attention_mask == 0``) are dropped; batch row b becomes sequence ``seq_offset + b`` with positions
counted over its real tokens; tokens before ``prompt_lengths[b]`` are prefill, the rest decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.importers.rows import RowBuilder
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace


def from_router_logits(
    router_logits: Sequence[torch.Tensor | None], *, top_k: int, batch_size: int,
    attention_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | None = None, layer_ids: Sequence[int] | None = None,
    seq_offset: int = 0, model: str = "",
) -> RouteTrace:
    """Build a trace from one forward pass's ``router_logits`` (see the module docstring)."""
    present = [t for t in router_logits if t is not None]
    if not present:
        raise TraceError("transformers importer: router_logits holds no tensor; call the model with "
                         "output_router_logits=True")
    num_experts = present[0].shape[-1]
    tokens = present[0].numel() // num_experts
    if tokens % batch_size:
        raise TraceError(f"transformers importer: {tokens} router rows do not split into batch_size={batch_size}")
    seq_len = tokens // batch_size
    if not 1 <= top_k <= num_experts:
        raise TraceError(f"transformers importer: top_k={top_k} must be in 1..{num_experts}")
    experts = np.full((batch_size, seq_len, len(router_logits), top_k), -1, dtype=np.int16)
    weights = np.full(experts.shape, np.nan, dtype=np.float16)
    for layer, logits in enumerate(router_logits):
        if logits is None:
            continue
        if logits.numel() != tokens * num_experts:
            raise TraceError(
                f"transformers importer: layer {layer} logits have shape {tuple(logits.shape)}, expected "
                f"{tokens} rows x {num_experts} experts like layer 0"
            )
        probabilities = torch.softmax(logits.detach().float().reshape(batch_size, seq_len, num_experts), dim=-1)
        top = torch.topk(probabilities, top_k, dim=-1)
        experts[:, :, layer] = top.indices.cpu().numpy()
        weights[:, :, layer] = top.values.cpu().numpy()
    mask = np.ones((batch_size, seq_len), dtype=bool)
    if attention_mask is not None:
        mask = attention_mask.detach().cpu().numpy().reshape(batch_size, seq_len).astype(bool)
    ids = None if input_ids is None else input_ids.detach().cpu().numpy().reshape(batch_size, seq_len)
    prompts = np.full(batch_size, seq_len) if prompt_lengths is None else np.asarray(prompt_lengths)
    if prompts.shape != (batch_size,):
        raise TraceError(f"transformers importer: need one prompt length per batch row ({batch_size})")
    builder = RowBuilder(num_layers=len(router_logits), top_k=top_k)
    for row in range(batch_size):
        real = mask[row]
        positions = np.arange(int(real.sum()))
        builder.add(seq=np.full(positions.size, seq_offset + row), pos=positions, experts=experts[row, real],
                    phase=np.where(positions < prompts[row], PREFILL, DECODE), weights=weights[row, real],
                    token_ids=None if ids is None else ids[row, real])
    return builder.build(num_experts=num_experts, model=model, source="transformers output_router_logits",
                         layer_ids=None if layer_ids is None else np.asarray(layer_ids))
