"""Where the executor reads and writes expert bytes on one rank: slots, host copies, the checkpoint.

``TensorSlots`` is a ``SlotStore`` over one ``[num_layers, slots_per_rank, slot_bytes]`` uint8 tensor
(HBM on a GPU). ``TieredReader`` is a ``SourceReader`` that serves each route from the matching
place: this node's host copies (DRAM/CXL tensors of a ``TierManager``, for local and RDMA routes),
the CXL pool's copies, the checkpoint (packed into a host bounce block per expert, freed on
``close``), or this rank's own slots when it sends a replica to a peer. A move it cannot serve
raises ``RepairError`` naming the route and the expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from tiermem.errors import RepairError
from tiermem.manager import TierManager
from tiermem.repair.executor import SlotStore
from tiermem.repair.fabric import Route
from tiermem.repair.planner import Move

ExpertKey = tuple[int, int]  # (layer index in the placement, logical expert)

_HOST_ROUTES = frozenset({Route.LOCAL_DRAM, Route.LOCAL_CXL, Route.RDMA_DRAM, Route.RDMA_CXL})
_HBM_ROUTES = frozenset({Route.NVLINK, Route.GPU_RDMA})


class PackedLayout(Protocol):
    block_bytes: int

    def pack_into(self, tensors: Mapping[str, torch.Tensor], block: torch.Tensor) -> None: ...


class CheckpointSource(Protocol):
    """Expert tensors read lazily from a checkpoint (``tiermem.experts.CheckpointExperts`` is one)."""

    layout: PackedLayout
    layers: tuple[int, ...]  # the model's MoE layer indices; placement layer i is layers[i]

    def tensors(self, layer: int, expert: int) -> Mapping[str, torch.Tensor]: ...


class TensorSlots:
    """The slots of one rank as one uint8 tensor ``[num_layers, slots_per_rank, slot_bytes]``."""

    def __init__(self, table: torch.Tensor, *, rank: int, slots_per_rank: int) -> None:
        if table.dtype != torch.uint8 or table.dim() != 3 or table.shape[1] != slots_per_rank:
            raise RepairError(
                f"repair slots: expected a uint8 [num_layers, {slots_per_rank}, slot_bytes] tensor, got "
                f"{table.dtype} {tuple(table.shape)}"
            )
        self.table = table
        self.rank = rank
        self.slots_per_rank = slots_per_rank

    def slot(self, layer: int, physical: int) -> torch.Tensor:
        local = physical - self.rank * self.slots_per_rank
        if not 0 <= local < self.slots_per_rank:
            raise RepairError(
                f"repair slots: physical slot {physical} belongs to rank {physical // self.slots_per_rank}, not "
                f"rank {self.rank} (slots {self.rank * self.slots_per_rank}.."
                f"{(self.rank + 1) * self.slots_per_rank - 1})"
            )
        return self.table[layer, local]


class TieredReader:
    """Serves each route of a move from this rank's host copies, the pool, the checkpoint or its slots."""

    def __init__(self, *, host: Mapping[ExpertKey, torch.Tensor] | None = None,
                 pool: Mapping[ExpertKey, torch.Tensor] | None = None, checkpoint: CheckpointSource | None = None,
                 manager: TierManager | None = None, staging_tier: str | None = None,
                 slots: SlotStore | None = None) -> None:
        if checkpoint is not None and (manager is None or staging_tier is None):
            raise RepairError("repair reader: reading the checkpoint needs a manager and a staging_tier (a host tier "
                              "for the bounce blocks, so that the copy to the GPU is from pinned memory)")
        self.host = dict(host or {})
        self.pool = dict(pool or {})
        self.checkpoint = checkpoint
        self.manager = manager
        self.staging_tier = staging_tier
        self.slots = slots
        self._staged: list[torch.Tensor] = []

    def read(self, move: Move) -> torch.Tensor:
        key = (move.layer, move.expert)
        if move.route in _HOST_ROUTES and key in self.host:
            return self.host[key]
        if move.route is Route.CXL_POOL and key in self.pool:
            return self.pool[key]
        if move.route is Route.DISK and self.checkpoint is not None:
            return self._stage(move)
        if move.route in _HBM_ROUTES and self.slots is not None:
            return self.slots.slot(move.layer, move.src_physical)
        raise RepairError(
            f"repair reader: cannot serve layer {move.layer} expert {move.expert} over {move.route.value}: this rank "
            f"holds {len(self.host)} host copies, {len(self.pool)} pool copies, "
            f"{'a' if self.checkpoint else 'no'} checkpoint and {'its' if self.slots else 'no'} slots; the backup map "
            "given to the planner does not match what this rank holds"
        )

    def close(self) -> None:
        """Free the checkpoint bounce blocks (after the plan has landed)."""
        for block in self._staged:
            self.manager.free(block)
        self._staged.clear()

    def _stage(self, move: Move) -> torch.Tensor:
        layout = self.checkpoint.layout
        if layout.block_bytes != move.nbytes:
            raise RepairError(
                f"repair reader: the checkpoint packs {layout.block_bytes} bytes per expert but the plan moves "
                f"{move.nbytes}; plan with expert_bytes = the layout's block_bytes"
            )
        block = self.manager.empty(layout.block_bytes, tier=self.staging_tier)
        self._staged.append(block)
        layout.pack_into(self.checkpoint.tensors(self.checkpoint.layers[move.layer], move.expert), block)
        return block
