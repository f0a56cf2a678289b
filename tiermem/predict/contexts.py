"""Leak-free prediction contexts replayed from a trace: what an engine knows at each layer of each step.

For the token at row ``t`` and the anchor layer ``a`` (its last routed layer; -1 before the first):
- ``current`` holds row ``t``'s routing at layers ``<= a`` and -1 above;
- ``previous`` is the previous token of the same sequence (``pos - 1``). In decode it is a finished
  step, so all its layers are known; in prefill it runs in the same forward pass, so only layers
  ``<= a`` are known and the rest are -1;
- ``activation`` counts the sequence's experts over the tokens before ``t``; for prefill rows only at
  layers ``<= a`` (the earlier prompt tokens are in the same forward pass);
- ``token_ids`` is row ``t``'s token id;
- ``hidden`` is the input of layer ``a``'s router (``trace.hidden[t, a]``), where the trace records
  hidden states: the one hidden state an engine holds when layer ``a`` has just been routed (its
  experts have not run yet, so layer ``a + 1``'s router input does not exist). For ``a = -1`` it is
  the input of the first layer (the per-row extra ``embedding``) where the trace has one, else None.

The target at distance ``d`` is layer ``(a + d) % L`` of the token ``(a + d) // L`` steps later in the
same sequence (consecutive positions). A target in a later token counts only when that token is a
decode token: the next prompt token's layers run in the same pass as this one's, not after it.

Invariant: no context depends on a row after ``t`` or on row ``t``'s layers above ``a`` (routing or
hidden states); the tests perturb the future and check that every context stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace

EMBEDDING = "embedding"  # per-row trace extra, float16 [T, H]: the input of the first layer (anchor -1's hidden)


@dataclass(frozen=True, eq=False)
class AnchorBatch:
    """Contexts of many tokens at one anchor layer, with the routing that actually followed."""

    anchor_layer: int
    rows: np.ndarray  # int64 [B] trace rows of the tokens
    phase: np.ndarray  # uint8 [B]
    context: RouteContext
    targets: np.ndarray  # int16 [D, B, K] true experts at distances 1..D; -1 where there is no target


def anchor_batches(
    trace: RouteTrace,
    max_distance: int,
    *,
    anchors: range | None = None,
    max_batch_tokens: int = 2048,
    with_activation: bool = True,
) -> Iterator[AnchorBatch]:
    """Yield every (anchor layer, group of whole sequences) batch of ``trace``.

    ``anchors`` defaults to ``-1 .. L-2``: anchor ``L-1`` would repeat anchor ``-1`` of the next step.
    """
    num_layers = trace.num_layers
    anchors = range(-1, num_layers - 1) if anchors is None else anchors
    if max_distance < 1 or (len(anchors) and (anchors[0] < -1 or anchors[-1] >= num_layers)):
        raise TraceError(
            f"contexts: need max_distance >= 1 and anchors within -1..{num_layers - 1}; got "
            f"{max_distance} and {anchors}"
        )
    for rows in _sequence_groups(trace, max_batch_tokens):
        group = _Group(trace, rows, with_activation)
        for anchor in anchors:
            yield group.batch(anchor, max_distance)


def _sequence_groups(trace: RouteTrace, max_batch_tokens: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    size = 0
    for _, rows in trace.sequence_rows():
        if pending and size + rows.size > max_batch_tokens:
            yield np.concatenate(pending)
            pending, size = [], 0
        pending.append(rows)
        size += rows.size
    if pending:
        yield np.concatenate(pending)


class _Group:
    """Per-group arrays shared by every anchor: previous rows, phases, and activation before each row."""

    def __init__(self, trace: RouteTrace, rows: np.ndarray, with_activation: bool) -> None:
        self.trace = trace
        self.rows = rows
        self.experts = trace.experts[rows]
        self.seq_id = trace.seq_id[rows]
        self.pos = trace.pos[rows]
        self.phase = trace.phase[rows]
        self.prefill = self.phase == PREFILL
        local = np.arange(rows.size)
        self.has_previous = np.r_[False, (self.seq_id[1:] == self.seq_id[:-1]) & (self.pos[1:] == self.pos[:-1] + 1)]
        self.previous_experts = np.where(
            self.has_previous[:, None, None], self.experts[np.maximum(local - 1, 0)], np.int16(-1)
        )
        self.activation = self._activation_before() if with_activation else None

    def _activation_before(self) -> np.ndarray:
        num, layers, _ = self.experts.shape
        counts = np.zeros((num, layers, self.trace.num_experts), dtype=np.float32)
        token, layer, slot = np.nonzero(self.experts >= 0)
        np.add.at(counts, (token, layer, self.experts[token, layer, slot].astype(np.int64)), 1.0)
        before = np.cumsum(counts, axis=0) - counts
        first = np.r_[True, self.seq_id[1:] != self.seq_id[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(num), 0))
        return before - before[start]

    def batch(self, anchor: int, max_distance: int) -> AnchorBatch:
        num_layers = self.trace.num_layers
        future = np.arange(num_layers) > anchor  # [L]
        current = np.where(future[None, :, None], np.int16(-1), self.experts)
        hidden_pass = self.prefill[:, None] & future[None, :]  # [B, L]: same-pass layers not yet routed
        previous = np.where(hidden_pass[:, :, None], np.int16(-1), self.previous_experts)
        activation = None
        if self.activation is not None:
            activation = np.where(hidden_pass[:, :, None], np.float32(0.0), self.activation)
        context = RouteContext(
            num_experts=self.trace.num_experts, layer=anchor, current=current, previous=previous,
            activation=activation,
            token_ids=None if self.trace.token_ids is None else self.trace.token_ids[self.rows],
            hidden=anchor_hidden(self.trace, self.rows, anchor),
        )
        targets = targets_after(self.trace, self.rows, anchor, max_distance)
        return AnchorBatch(anchor, self.rows, self.phase, context, targets)


def anchor_hidden(trace: RouteTrace, rows: np.ndarray, anchor: int) -> torch.Tensor | None:
    """float32 ``[B, H]``: the input of layer ``anchor``'s router for ``rows`` (anchor -1: the embedding), or None."""
    if trace.hidden is None:
        return None
    if anchor >= 0:
        return torch.from_numpy(trace.hidden[rows, anchor].astype(np.float32))
    embedding = trace.extras.get(EMBEDDING)
    if embedding is None:
        return None
    if embedding.shape != (trace.num_tokens, trace.hidden.shape[2]):
        raise TraceError(f"contexts: the {EMBEDDING!r} extra has shape {embedding.shape}, expected one hidden "
                         f"state per token ({trace.num_tokens}, {trace.hidden.shape[2]})")
    return torch.from_numpy(embedding[rows].astype(np.float32))


def with_row_extras(part: RouteTrace, whole: RouteTrace) -> RouteTrace:
    """``part`` (whole sequences of ``whole``) with ``whole``'s per-row ``embedding`` carried along.

    ``RouteTrace.select_sequences`` drops extras; the embedding is per row, so it can follow its rows.
    """
    embedding = whole.extras.get(EMBEDDING)
    if embedding is None or embedding.shape[:1] != (whole.num_tokens,):
        return part
    rows = np.flatnonzero(np.isin(whole.seq_id, part.sequence_ids))
    return replace(part, extras={**part.extras, EMBEDDING: embedding[rows]})


def targets_after(trace: RouteTrace, rows: np.ndarray, anchor: int, max_distance: int) -> np.ndarray:
    """int16 ``[D, B, K]``: the experts that ``rows`` (at anchor layer ``anchor``) meet at distances 1..D.

    -1 where the target token is past the sequence's end, not at the next consecutive position, a
    prefill token of a later step (it runs in the same pass), or where the trace has no data.
    """
    num_tokens, num_layers = trace.num_tokens, trace.num_layers
    targets = np.full((max_distance, rows.size, trace.top_k), -1, dtype=np.int16)
    for distance in range(1, max_distance + 1):
        steps, layer = divmod(anchor + distance, num_layers)
        later = rows + steps
        inside = later < num_tokens
        later = np.where(inside, later, 0)
        valid = inside & (trace.seq_id[later] == trace.seq_id[rows]) & (trace.pos[later] == trace.pos[rows] + steps)
        if steps > 0:
            valid &= trace.phase[later] == DECODE
        targets[distance - 1] = np.where(valid[:, None], trace.experts[later, layer], np.int16(-1))
    return targets
