"""Decode steps of a batch of sequences, and the ``RouteContext`` a predictor sees at each layer.

A step holds one token of each sequence still running, step-aligned: step ``t`` of a batch holds the
``t``-th decode token of every member that has one (sequences that finish leave the batch). With
prefill warming, the prompt tokens come first, token by token, as uncounted steps.

Invariant: a context never shows the future: layers after the routed one are ``-1``, and the
activation counts cover only tokens before the step. Contexts list the traced layers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiermem.predict.base import RouteContext
from tiermem.simulate.trace import Phase, SimTrace


@dataclass(frozen=True, eq=False)
class Step:
    """One batched forward pass of single tokens."""

    seqs: tuple[int, ...]  # sequence of each batch entry
    rows: tuple[int, ...]  # trace row of each batch entry
    experts: np.ndarray  # int16 [B, L, K]
    previous: np.ndarray  # int16 [B, L, K]: each sequence's token before this one (-1 for none)
    counted: bool  # False for prefill warm-up steps
    routed: tuple[tuple[tuple[int, int], ...], ...]  # per layer: (expert, tokens routed to it), by expert id


def build_steps(trace: SimTrace, group: tuple[int, ...], warm_with_prefill: bool) -> list[Step]:
    """The steps of the static batch ``group``: optional prefill warm-up, then decode."""
    prefill = {seq: trace.rows(seq, Phase.PREFILL) for seq in group}
    decode = {seq: trace.rows(seq, Phase.DECODE) for seq in group}
    blank = np.full(trace.experts.shape[1:], -1, dtype=np.int16)
    steps: list[Step] = []

    def add(rows_by_seq: dict[int, np.ndarray], counted: bool) -> None:
        for t in range(max((len(r) for r in rows_by_seq.values()), default=0)):
            members = [seq for seq in group if len(rows_by_seq[seq]) > t]
            rows = [int(rows_by_seq[seq][t]) for seq in members]
            previous = [row - 1 if row > 0 and trace.seq_id[row - 1] == seq else None for seq, row in zip(members, rows)]
            steps.append(Step(
                seqs=tuple(members),
                rows=tuple(rows),
                experts=trace.experts[rows],
                previous=np.stack([blank if p is None else trace.experts[p] for p in previous]),
                counted=counted,
                routed=_routed(trace.experts[rows]),
            ))

    if warm_with_prefill:
        add(prefill, counted=False)
    add(decode, counted=True)
    return steps


def prediction_context(trace: SimTrace, step: Step, slot: int, activation: np.ndarray) -> RouteContext:
    """What a serving engine knows right after traced layer ``slot`` (= ``trace.layers[slot]``) is routed.

    The context covers the traced layers only, as consecutive MoE layers (the view of a trace
    restricted to its layers with data), so a predictor's distances count traced layers.
    ``activation`` is the per-sequence count table [sequences, L, E] of tokens before this step.
    """
    layers = list(trace.layers)
    current = step.experts[:, layers]
    current[:, slot + 1 :, :] = -1
    return RouteContext(
        num_experts=trace.num_experts,
        layer=slot,
        current=current,
        previous=step.previous[:, layers],
        activation=activation[np.ix_(list(step.seqs), layers)],
    )


def _routed(experts: np.ndarray) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per layer, the distinct experts of a batch [B, L, K] with how many tokens chose each (``-1`` ignored)."""
    per_layer = []
    for ids in experts.transpose(1, 0, 2).reshape(experts.shape[1], -1).tolist():
        uses: dict[int, int] = {}
        for e in ids:
            if e >= 0:
                uses[e] = uses.get(e, 0) + 1
        per_layer.append(tuple(sorted(uses.items())))
    return tuple(per_layer)
