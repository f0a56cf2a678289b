"""Next-gate speculation: apply the routers of the layers ahead to the anchor layer's router input.

Residual streams change little from one layer to the next, so layer a+d's router applied to the input
of layer a's router (``RouteContext.hidden``, known as soon as layer a is routed) approximates layer
a+d's routing (the idea behind Pre-gated MoE and AdapMoE's gate look-ahead).

Invariants:
- Usable only where hidden states exist (inside ``tiermem.offload``, or a trace that recorded them):
  a context without ``hidden`` raises ``TraceError``.
- ``gates[slot]`` is the router weight ``[E, H]`` of MoE layer ``slot``, in the representation of
  ``context.hidden`` (``bench/moe_lm`` records unit-RMS hidden states and folds each norm's gain into
  its gate); scores are its softmax probabilities. Targets in a later step reuse this token's hidden state (a weak guess, reported as
  such by the evaluation's per-distance numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, layers_ahead


class NextGatePredictor:
    """Scores experts ahead with the real routers of those layers."""

    reads_hidden = True  # the router input, scored by the next routers (Predictor)

    def __init__(self, gates: Sequence[torch.Tensor]) -> None:
        if not gates:
            raise TraceError("predict: next-gate needs one router weight [E, H] per MoE layer, got none")
        shapes = {tuple(g.shape) for g in gates}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise TraceError(f"predict: next-gate router weights must all be [E, H]; got shapes {sorted(shapes)}")
        self.gates = torch.stack([g.detach().float() for g in gates])  # [L, E, H]

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        num_layers, num_experts, hidden_size = self.gates.shape
        check_context(context, distance, num_layers=num_layers, num_experts=num_experts, who="next-gate")
        if context.hidden is None:
            raise TraceError(
                "predict: next-gate speculation needs context.hidden (the input of layer "
                f"{context.layer}'s router; for layer -1 the first layer's input); it is only available inside "
                "tiermem.offload or from traces that recorded hidden states (and an `embedding` extra for -1)"
            )
        if context.hidden.shape != (context.batch_size, hidden_size):
            raise TraceError(
                f"predict: context.hidden has shape {tuple(context.hidden.shape)}, the routers expect "
                f"[{context.batch_size}, {hidden_size}]"
            )
        targets = [layer for _, layer in layers_ahead(context.layer, distance, num_layers)]
        gates = self.gates[targets].to(context.hidden.device)  # [D, E, H]
        with torch.inference_mode():
            logits = torch.einsum("bh,deh->dbe", context.hidden.float(), gates)
            return torch.softmax(logits, dim=-1).cpu().numpy()
