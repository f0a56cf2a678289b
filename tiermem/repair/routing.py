"""Degraded-mode routing: which physical replica serves each logical expert, with gaps dropped.

Readers (the serving step) take ``table.snapshot()`` and route with it without any lock; writers
build a new immutable snapshot and swap one reference under a lock, so a reader sees either the old
or the new table, never a mix. A landed repair changes exactly one entry (``restore``): tokens for
that expert go to the new replica from the next snapshot on.

Design note (state table):
| event                              | call                           | dispatch change                     |
|------------------------------------|--------------------------------|-------------------------------------|
| membership changes (epoch e)       | ``rebuild(placement, live, e)``| every expert -> its first live      |
|                                    |                                | replica; gaps -> ``NOT_DISPATCHED`` |
| a repair copy landed on this rank  | ``restore(layer, expert, p)``  | that gap expert -> slot p           |
| a slot is about to be overwritten  | ``retire(layer, p)``           | its expert -> another live replica  |
An expert is dispatched to its *first* live replica (lowest physical slot), which the repair planner
never evicts; ``retire`` keeps that true for callers that dispatch otherwise.

Gap policy: tokens routed to a gap expert lose that top-k entry. ``DROP_RENORMALIZE`` (the default)
rescales the token's remaining top-k weights to their original sum, so the token is served by its
other experts at the scale the model expects, as when a capacity-limited router drops an assignment;
``DROP`` leaves the remaining weights as they are. A token whose every expert is a gap gets no MoE
output (the residual carries it). No "similar" expert is substituted: nothing in the weights says
which expert is similar, and a wrong expert's output is worse than a missing one.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Collection
from dataclasses import dataclass

import torch

from tiermem.errors import RepairError
from tiermem.repair.coverage import live_replicas
from tiermem.repair.placement import EpPlacement

NOT_DISPATCHED = -1  # the value DeepEP and SGLang use for a masked top-k entry


class GapPolicy(str, enum.Enum):
    """What a token routed to a gap expert gets (see the module docstring)."""

    DROP_RENORMALIZE = "drop_renormalize"
    DROP = "drop"


@dataclass(frozen=True)
class RoutingSnapshot:
    """An immutable dispatch table: per layer, int64 ``[num_logical]`` -> physical slot or NOT_DISPATCHED."""

    epoch: int
    version: int  # grows by one on every change within an epoch
    dispatch: tuple[torch.Tensor, ...]
    policy: GapPolicy

    def gaps(self, layer: int) -> tuple[int, ...]:
        return tuple(torch.nonzero(self.dispatch[layer] == NOT_DISPATCHED).flatten().tolist())

    def route(self, layer: int, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map logical ``topk_ids [T, k]`` to physical slots and apply the gap policy to ``topk_weights``.

        Returns ``(physical_ids, weights)``; a gap entry has physical id NOT_DISPATCHED and weight 0.
        """
        physical = self.dispatch[layer][topk_ids]
        missing = physical == NOT_DISPATCHED
        weights = topk_weights.masked_fill(missing, 0)
        if self.policy is GapPolicy.DROP_RENORMALIZE and bool(missing.any()):
            kept = weights.sum(dim=-1, keepdim=True)
            scale = torch.where(kept > 0, topk_weights.sum(dim=-1, keepdim=True) / kept.clamp_min(1e-30), 0)
            weights = weights * scale.to(weights.dtype)
        return physical, weights


class RoutingTable:
    """The current ``RoutingSnapshot`` of one rank, swapped atomically on every change."""

    def __init__(self, placement: EpPlacement, live_ranks: Collection[int], epoch: int,
                 policy: GapPolicy = GapPolicy.DROP_RENORMALIZE) -> None:
        self._lock = threading.Lock()
        self._policy = policy
        self._slots_per_rank = placement.slots_per_rank
        self._rows = [list(row) for row in placement.slots]  # what each slot holds, kept current by restore
        self._live = frozenset(live_ranks)
        self._snapshot = self._build(placement, self._live, epoch)

    def snapshot(self) -> RoutingSnapshot:
        return self._snapshot  # one reference read: atomic

    def rebuild(self, placement: EpPlacement, live_ranks: Collection[int], epoch: int) -> RoutingSnapshot:
        """A fresh table for a new membership epoch."""
        with self._lock:
            self._rows, self._live = [list(row) for row in placement.slots], frozenset(live_ranks)
            self._slots_per_rank = placement.slots_per_rank
            self._snapshot = self._build(placement, self._live, epoch)
            return self._snapshot

    def restore(self, layer: int, expert: int, physical: int, *, epoch: int) -> RoutingSnapshot:
        """A copy of ``expert`` landed in ``physical``: if the expert is a gap, its tokens go there from now on.

        An expert that is already dispatched keeps its replica (a reintegration copy lands on a rank that
        does not serve yet; the next epoch's ``rebuild`` takes it in).
        """
        with self._lock:
            current = self._snapshot
            if epoch != current.epoch:
                raise RepairError(
                    f"routing: a repair for epoch {epoch} landed layer {layer} expert {expert}, but the table is at "
                    f"epoch {current.epoch}; the plan is stale, re-plan for the current membership"
                )
            self._rows[layer][physical] = expert
            if int(current.dispatch[layer][expert]) != NOT_DISPATCHED:
                return current
            return self._swap(layer, expert, physical)

    def retire(self, layer: int, physical: int) -> RoutingSnapshot:
        """Stop dispatching to ``physical`` (about to be overwritten); its expert moves to another live replica."""
        with self._lock:
            row = self._rows[layer]
            expert = row[physical]
            current = self._snapshot
            if expert is None or int(current.dispatch[layer][expert]) != physical:
                return current
            others = [p for p, e in enumerate(row)
                      if e == expert and p != physical and p // self._slots_per_rank in self._live]
            if not others:
                raise RepairError(
                    f"routing: slot {physical} of layer {layer} holds the last live replica of expert {expert}; "
                    "overwriting it would open a gap (the plan must not evict it)"
                )
            return self._swap(layer, expert, others[0])

    def _swap(self, layer: int, expert: int, physical: int) -> RoutingSnapshot:
        current = self._snapshot
        row = current.dispatch[layer].clone()
        row[expert] = physical
        dispatch = current.dispatch[:layer] + (row,) + current.dispatch[layer + 1:]
        self._snapshot = RoutingSnapshot(current.epoch, current.version + 1, dispatch, current.policy)
        return self._snapshot

    def _build(self, placement: EpPlacement, live: frozenset[int], epoch: int) -> RoutingSnapshot:
        rows = []
        for layer in range(placement.num_layers):
            row = torch.full((placement.num_logical_experts,), NOT_DISPATCHED, dtype=torch.int64)
            for expert in range(placement.num_logical_experts):
                replicas = live_replicas(placement, live, layer, expert)
                if replicas:
                    row[expert] = replicas[0]
            rows.append(row)
        return RoutingSnapshot(epoch, 0, tuple(rows), self._policy)
