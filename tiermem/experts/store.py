"""``ExpertStore``: the host home of every expert of every MoE layer, one packed block each.

Each expert's home is ``layout.block_bytes`` contiguous bytes on a host tier of a ``TierManager``
(NUMA-bound, registered for DMA), so one copy moves it to an HBM slot. The experts of one layer on one
tier share one allocation, ``[experts on that tier, block_bytes]``.

Invariants: keys are ``ObjectKey("expert", table, real layer index, expert)``; a home never moves
once the store is built; ``close()`` frees every allocation once (idempotent), after which the
store must not be used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from tiermem.errors import ConfigError, RegistryError
from tiermem.experts.layout import ExpertLayout
from tiermem.experts.placement import Placement, single_tier
from tiermem.experts.sources import ExpertSource
from tiermem.manager import TierManager
from tiermem.types import ObjectKey

log = logging.getLogger("tiermem.experts")

EXPERT_KIND = "expert"


class ExpertStore:
    """Packed host homes of ``num_experts`` experts for each layer of ``layers``."""

    def __init__(
        self, manager: TierManager, *, layout: ExpertLayout, layers: Sequence[int], num_experts: int,
        placement: Placement, table: str = "experts",
    ) -> None:
        self.manager = manager
        self.layout = layout
        self.layers = tuple(layers)
        self.num_experts = num_experts
        self.placement = placement
        self.table = table
        if placement.shape != (len(self.layers), num_experts):
            raise ConfigError(
                f"expert store: placement covers {list(placement.shape)} (layers, experts) but the store has "
                f"{len(self.layers)} layers x {num_experts} experts"
            )
        for name in placement.tiers:
            if not manager.tier(name).kind.is_host:
                raise ConfigError(
                    f"expert store: tier {name!r} is a {manager.tier(name).kind.value} tier; expert homes must be on "
                    "host tiers (dram, cxl, sim) that a GPU can copy from"
                )
        self._position = {layer: index for index, layer in enumerate(self.layers)}
        self._allocations: list[torch.Tensor] = []
        self._homes: list[list[torch.Tensor]] = []
        self._closed = False
        try:
            for position in range(len(self.layers)):
                self._homes.append(self._allocate_layer(position))
        except BaseException:
            self.close()
            raise
        log.info("expert store: %d layers x %d experts, %s, on %s", len(self.layers), num_experts,
                 layout.describe(), {t: placement.experts_on(t) for t in placement.tiers})

    @classmethod
    def from_source(
        cls, manager: TierManager, source: ExpertSource, *, tier: str | None = None,
        placement: Placement | None = None, table: str = "experts",
    ) -> ExpertStore:
        """A store filled from ``source``: every expert on ``tier``, or placed by ``placement``."""
        if (tier is None) == (placement is None):
            raise ConfigError("expert store: give exactly one of tier= (one home tier) or placement=")
        placement = placement or single_tier(tier, len(source.layers), source.num_experts)
        store = cls(manager, layout=source.layout, layers=source.layers, num_experts=source.num_experts,
                    placement=placement, table=table)
        try:
            for layer in store.layers:
                for expert in range(store.num_experts):
                    store.write(layer, expert, source.tensors(layer, expert))
        except BaseException:
            store.close()
            raise
        return store

    @property
    def nbytes(self) -> int:
        """Bytes of all homes (blocks include alignment padding)."""
        return len(self.layers) * self.num_experts * self.layout.block_bytes

    def key(self, layer: int, expert: int) -> ObjectKey:
        self.position(layer)
        if not 0 <= expert < self.num_experts:
            raise ConfigError(f"expert store: expert {expert} is outside 0..{self.num_experts - 1}")
        return ObjectKey(EXPERT_KIND, self.table, layer, expert)

    def key_at(self, position: int, expert: int) -> ObjectKey:
        """The key of ``expert`` of the ``position``-th MoE layer."""
        return ObjectKey(EXPERT_KIND, self.table, self.layers[position], expert)

    def position(self, layer: int) -> int:
        """Index of real layer ``layer`` among the store's MoE layers."""
        try:
            return self._position[layer]
        except KeyError:
            raise RegistryError(f"expert store: layer {layer} is not a MoE layer of this store; it has {list(self.layers)}") from None

    def home(self, key: ObjectKey) -> torch.Tensor:
        """The packed block of ``key`` on its host tier (uint8, ``block_bytes``)."""
        self._check_open()
        return self._homes[self.position(key.layer)][key.index]

    def tier_of(self, key: ObjectKey) -> str:
        return self.placement.tier_of(self.position(key.layer), key.index)

    def write(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Pack ``tensors`` (any device) into the home of ``(layer, expert)``."""
        self.layout.pack_into(tensors, self.home(self.key(layer, expert)))

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of the weights of ``(layer, expert)`` in its home (no copy)."""
        return self.layout.views(self.home(self.key(layer, expert)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for tensor in self._allocations:
            self.manager.free(tensor)
        self._allocations.clear()
        self._homes.clear()

    def _allocate_layer(self, position: int) -> list[torch.Tensor]:
        homes: list[torch.Tensor | None] = [None] * self.num_experts
        row = self.placement.assignment[position]
        for index, tier in enumerate(self.placement.tiers):
            experts = [int(e) for e in (row == index).nonzero()[0]]
            if not experts:
                continue
            block = self.manager.empty((len(experts), self.layout.block_bytes), torch.uint8, tier=tier)
            self._allocations.append(block)
            for slot, expert in enumerate(experts):
                homes[expert] = block[slot]
        assert all(h is not None for h in homes)
        return homes

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("expert store: the store is closed; build a new one")
