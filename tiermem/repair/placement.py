"""Expert placement: which logical expert each physical slot of each rank holds, per MoE layer.

Physical slots are numbered rank-major, exactly as SGLang's ``ExpertLocationMetadata`` numbers them:
physical expert ``p`` lives on rank ``p // slots_per_rank`` in local slot ``p % slots_per_rank``, and
``physical_to_logical_map`` has shape ``[num_layers, num_ranks * slots_per_rank]``. A placement
describes the slots whatever the ranks' health; liveness is the membership's business
(``tiermem.repair.coverage`` combines the two).

Invariants: every layer has ``num_ranks * slots_per_rank`` slots; a slot holds a logical expert in
``[0, num_logical_experts)`` or is free (``None``); a rank holds at most one replica of an expert per
layer. An ``EpPlacement`` is immutable: ``with_slots`` returns a new one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tiermem.errors import RepairError

SlotRef = tuple[int, int]  # (layer, physical slot)


@dataclass(frozen=True)
class EpPlacement:
    """Logical expert (or ``None`` for a free slot) per layer and physical slot."""

    num_ranks: int
    slots_per_rank: int
    num_logical_experts: int
    slots: tuple[tuple[int | None, ...], ...]  # [layer][physical slot]

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.slots_per_rank < 1 or self.num_logical_experts < 1:
            raise RepairError(
                f"placement: num_ranks, slots_per_rank and num_logical_experts must be >= 1, got "
                f"{self.num_ranks}, {self.slots_per_rank}, {self.num_logical_experts}"
            )
        for layer, row in enumerate(self.slots):
            if len(row) != self.num_physical:
                raise RepairError(
                    f"placement: layer {layer} has {len(row)} slots but {self.num_ranks} ranks x "
                    f"{self.slots_per_rank} slots per rank = {self.num_physical}"
                )
            for physical, expert in enumerate(row):
                if expert is not None and not 0 <= expert < self.num_logical_experts:
                    raise RepairError(
                        f"placement: layer {layer} slot {physical} holds expert {expert}, outside "
                        f"[0, {self.num_logical_experts})"
                    )
            for rank in range(self.num_ranks):
                held = [e for e in self._rank_row(row, rank) if e is not None]
                if len(held) != len(set(held)):
                    raise RepairError(
                        f"placement: rank {rank} holds a logical expert twice in layer {layer} ({held}); a "
                        "second replica on the same rank adds no coverage, place it on another rank"
                    )

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def num_physical(self) -> int:
        return self.num_ranks * self.slots_per_rank

    def rank_of(self, physical: int) -> int:
        return physical // self.slots_per_rank

    def physical(self, rank: int, local_slot: int) -> int:
        return rank * self.slots_per_rank + local_slot

    def experts_on(self, layer: int, rank: int) -> tuple[int | None, ...]:
        """What each local slot of ``rank`` holds in ``layer``."""
        return tuple(self._rank_row(self.slots[layer], rank))

    def replicas(self, layer: int, expert: int) -> tuple[int, ...]:
        """Physical slots holding ``expert`` in ``layer``, ascending."""
        return self._replica_index[layer].get(expert, ())

    def free_slots(self, layer: int) -> tuple[int, ...]:
        return tuple(p for p, e in enumerate(self.slots[layer]) if e is None)

    def with_slots(self, updates: Mapping[SlotRef, int | None]) -> EpPlacement:
        """A new placement with ``(layer, physical) -> expert or None`` applied."""
        rows = [list(row) for row in self.slots]
        for (layer, physical), expert in updates.items():
            rows[layer][physical] = expert
        return EpPlacement(self.num_ranks, self.slots_per_rank, self.num_logical_experts,
                         tuple(tuple(row) for row in rows))

    def to_physical_to_logical_map(self) -> torch.Tensor:
        """SGLang's ``physical_to_logical_map``: int64 ``[num_layers, num_physical]``, every slot filled.

        SGLang has no value for an empty slot, so a placement with free slots is refused; fill them
        first (``replicate_hottest``) or export the placement the repair produced.
        """
        free = [(layer, p) for layer in range(self.num_layers) for p in self.free_slots(layer)]
        if free:
            raise RepairError(
                f"placement: {len(free)} slot(s) are free (first: layer {free[0][0]} slot {free[0][1]}); SGLang's "
                "physical_to_logical_map has no value for an empty slot. Fill them with redundant replicas "
                "(tiermem.repair.placement.replicate_hottest) before exporting"
            )
        return torch.tensor(self.slots, dtype=torch.int64).reshape(self.num_layers, self.num_physical)

    @classmethod
    def from_physical_to_logical_map(
        cls, physical_to_logical_map: torch.Tensor | Sequence[Sequence[int]], *, num_ranks: int,
        num_logical_experts: int,
    ) -> EpPlacement:
        """Read SGLang's ``[num_layers, num_physical]`` map (rank-major slots) for ``num_ranks`` EP ranks."""
        table = torch.as_tensor(physical_to_logical_map)
        if table.dim() != 2:
            raise RepairError(
                f"placement: physical_to_logical_map must be 2-D [num_layers, num_physical], got shape "
                f"{tuple(table.shape)}"
            )
        slots_per_rank, remainder = divmod(table.shape[1], num_ranks)
        if remainder or slots_per_rank == 0:
            raise RepairError(
                f"placement: {table.shape[1]} physical experts do not split evenly over {num_ranks} ranks; "
                "SGLang requires num_physical_experts % ep_size == 0"
            )
        rows = tuple(tuple(int(e) for e in row) for row in table.tolist())
        return cls(num_ranks, slots_per_rank, num_logical_experts, rows)

    @classmethod
    def contiguous(cls, *, num_layers: int, num_logical_experts: int, num_ranks: int,
                   slots_per_rank: int) -> EpPlacement:
        """Experts in order, ``num_logical_experts / num_ranks`` per rank; the remaining slots are free."""
        home, remainder = divmod(num_logical_experts, num_ranks)
        if remainder or home > slots_per_rank:
            raise RepairError(
                f"placement: {num_logical_experts} experts need an even split over {num_ranks} ranks with at "
                f"most {slots_per_rank} slots per rank; got {home} per rank with remainder {remainder}"
            )
        row: list[int | None] = []
        for rank in range(num_ranks):
            row += list(range(rank * home, (rank + 1) * home)) + [None] * (slots_per_rank - home)
        return cls(num_ranks, slots_per_rank, num_logical_experts, (tuple(row),) * num_layers)

    def _rank_row(self, row: Sequence[int | None], rank: int) -> Sequence[int | None]:
        return row[rank * self.slots_per_rank:(rank + 1) * self.slots_per_rank]

    @functools.cached_property
    def _replica_index(self) -> tuple[dict[int, tuple[int, ...]], ...]:
        index = []
        for row in self.slots:
            found: dict[int, list[int]] = {}
            for physical, expert in enumerate(row):
                if expert is not None:
                    found.setdefault(expert, []).append(physical)
            index.append({e: tuple(p) for e, p in found.items()})
        return tuple(index)


def replicate_hottest(placement: EpPlacement, expert_load: Sequence[Sequence[float]]) -> EpPlacement:
    """Fill every free slot with a redundant replica, EPLB-style: the expert with the highest load per
    replica that the slot's rank does not hold yet (ties: lower expert id). ``expert_load`` is
    ``[num_layers][num_logical_experts]`` (tokens routed, or any non-negative weight)."""
    _check_load(placement, expert_load)
    updates: dict[SlotRef, int | None] = {}
    for layer in range(placement.num_layers):
        load = expert_load[layer]
        counts = [len(placement.replicas(layer, e)) for e in range(placement.num_logical_experts)]
        on_rank = [{e for e in placement.experts_on(layer, r) if e is not None} for r in range(placement.num_ranks)]
        for physical in placement.free_slots(layer):
            held = on_rank[placement.rank_of(physical)]
            candidates = [e for e in range(placement.num_logical_experts) if e not in held]
            if not candidates:
                continue
            best = max(candidates, key=lambda e: (load[e] / (counts[e] + 1), -e))
            updates[(layer, physical)] = best
            counts[best] += 1
            held.add(best)
    return placement.with_slots(updates)


def _check_load(placement: EpPlacement, expert_load: Sequence[Sequence[float]]) -> None:
    shape = (len(expert_load), len(expert_load[0]) if len(expert_load) else 0)
    if shape != (placement.num_layers, placement.num_logical_experts):
        raise RepairError(
            f"placement: expert_load has shape {shape}, expected [num_layers, num_logical_experts] = "
            f"{(placement.num_layers, placement.num_logical_experts)}"
        )
