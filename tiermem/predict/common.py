"""Helpers every predictor shares: which layers lie ahead, context checks and multi-hot encoding."""

from __future__ import annotations

import numpy as np

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext


def layers_ahead(layer: int, distance: int, num_layers: int) -> list[tuple[int, int]]:
    """``(steps, target_layer)`` for distances 1..``distance`` after ``layer`` (wrapping into later steps)."""
    return [divmod(layer + d, num_layers) for d in range(1, distance + 1)]


def check_context(context: RouteContext, distance: int, *, num_layers: int, num_experts: int, who: str) -> None:
    """Raise ``TraceError`` when ``context`` does not match the model the predictor was built for."""
    if context.num_layers != num_layers or context.num_experts != num_experts:
        raise TraceError(
            f"predict: {who} was built for {num_layers} MoE layers x {num_experts} experts, but the context "
            f"has {context.num_layers} layers x {context.num_experts} experts; fit it on a trace of this model "
            f"(restricted to the same layers)"
        )
    if not -1 <= context.layer < num_layers or distance < 1:
        raise TraceError(
            f"predict: {who} needs -1 <= context.layer < {num_layers} and distance >= 1; got layer "
            f"{context.layer} and distance {distance}"
        )


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """float32 ``[..., E]`` with 1 at every expert id of ``ids`` (``[..., K]``); -1 entries are ignored."""
    out = np.zeros(ids.shape[:-1] + (num_experts + 1,), dtype=np.float32)
    np.put_along_axis(out, np.where(ids >= 0, ids, num_experts).astype(np.int64), 1.0, axis=-1)
    return out[..., :num_experts]


def layer_popularity(experts: np.ndarray, num_experts: int, smoothing: float = 1.0) -> np.ndarray:
    """float32 ``[L, E]``: per-layer share of routed tokens per expert, with additive smoothing."""
    counts = multi_hot(experts, num_experts).sum(axis=0) + smoothing
    return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
