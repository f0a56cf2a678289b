"""Expert computation in the exact operation order of the transformers reference loop (bit-identical output).

The reference (transformers' ``*Experts.forward``, and the per-expert loop of older blocks) does, for
each hit expert in ascending id order: select its tokens with ``torch.where`` over the one-hot mask
(top-k position major), run gate/up/act/down, scale by the routing weight, and ``index_add_`` into a
zero tensor. Here each expert's scaled output is computed on its own, in any order (resident experts
first, while others are still being copied), and the ``index_add_`` calls run afterwards in ascending
expert order: every floating-point operation, and every addition order, is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class Routing:
    """Which tokens each hit expert serves, selected exactly as the reference does."""

    experts: tuple[int, ...]  # ascending ids with at least one routed token
    token_idx: Mapping[int, torch.Tensor]  # expert -> rows of the flattened hidden states
    top_k_pos: Mapping[int, torch.Tensor]  # expert -> top-k position of each of those rows


def route(top_k_index: torch.Tensor, num_experts: int, device: torch.device) -> Routing:
    """Group tokens by expert from the routing ``[T, K]`` (on any device); indices end up on ``device``.

    The grouping runs in numpy on the host (one small device-to-host copy of the routing, one stable
    sort, then one host-to-device copy of all indices) instead of one ``nonzero`` per expert; the
    indices, and their order, are exactly those ``torch.where`` gives the reference on the one-hot
    mask: top-k position major, then token, ascending.
    """
    index = top_k_index.to("cpu").numpy()
    num_tokens = index.shape[0]
    flat = np.ascontiguousarray(index.T).reshape(-1)  # [K * T]: position-major, as the reference's mask
    order = np.argsort(flat, kind="stable")  # by expert; within one, ascending (position, token)
    order = order[(flat[order] >= 0) & (flat[order] < num_experts)]
    if not len(order):
        return Routing((), {}, {})
    ids, sizes = np.unique(flat[order], return_counts=True)
    tokens, positions = torch.from_numpy(np.stack((order % num_tokens, order // num_tokens))).to(device)
    experts, counts = tuple(ids.tolist()), sizes.tolist()
    return Routing(experts, dict(zip(experts, tokens.split(counts))), dict(zip(experts, positions.split(counts))))


def expert_output(
    hidden: torch.Tensor, routing: Routing, expert: int, weights: Mapping[str, torch.Tensor],
    top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor], out_dtype: torch.dtype,
) -> torch.Tensor:
    """The scaled output rows of ``expert`` for its tokens (fused gate_up or separate gate/up weights)."""
    token_idx, top_k_pos = routing.token_idx[expert], routing.top_k_pos[expert]
    state = hidden[token_idx]
    if "gate_up" in weights:
        gate, up = F.linear(state, weights["gate_up"]).chunk(2, dim=-1)
    else:
        gate, up = F.linear(state, weights["gate"]), F.linear(state, weights["up"])
    out = F.linear(act_fn(gate) * up, weights["down"])
    out = out * top_k_weights[token_idx, top_k_pos, None]
    return out.to(out_dtype)


def combine(hidden: torch.Tensor, routing: Routing, outputs: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Sum the experts' rows into a zero tensor shaped like ``hidden``, in ascending expert order."""
    final = torch.zeros_like(hidden)
    for expert in routing.experts:
        final.index_add_(0, routing.token_idx[expert], outputs[expert])
    return final
