"""The Tier protocol, the Block handle, the tier registry and ``ArenaTier``, the shared implementation.

A tier is a place where bytes live (HBM, DRAM on a NUMA node, CXL, ...). Every tier is built the same
way: a frozen config class and a factory registered in ``TIERS`` under its kind.

``ArenaTier`` owns arenas: one memory mapping each, created on demand up to ``capacity_bytes`` and
sub-allocated by ``Arena``. Invariants:
- ``used_bytes`` is the exact sum of live blocks' aligned sizes; ``free_bytes = capacity - used``;
- ``capacity_bytes`` bounds live bytes. A new arena holds a whole number of the object that asked for
  it, so equally sized objects (experts, row groups) that sum to the capacity always fit; mixed sizes
  may leave tails, absorbed by at most one arena of slack (``mapped_bytes <= capacity + arena_bytes``);
- every block's tensor is a view into its arena's mapping (no copies), starting ``alignment_bytes``-aligned;
- all mutation happens under one lock; ``close()`` is idempotent and releases every mapping.

Extension: subclass ``ArenaTier`` and implement ``_map(nbytes) -> Mapping``, write a frozen config,
and call ``TIERS.register(kind, ConfigCls, factory)`` where ``factory(config, context) -> Tier``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from tiermem.config import format_bytes
from tiermem.errors import CapacityError, OwnershipError
from tiermem.registry import Registry
from tiermem.tiers.arena import Arena, align_up
from tiermem.types import LinkProfile, TierKind

log = logging.getLogger("tiermem.tiers")


@dataclass(frozen=True, eq=False)
class Block:
    """A live allocation: ``tensor`` is a uint8 view of exactly ``nbytes`` inside arena ``arena``."""

    tier: str
    arena: int
    offset_bytes: int
    nbytes: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class TierStats:
    """Accounting of one tier at one instant."""

    name: str
    kind: str
    emulated: bool
    capacity_bytes: int
    used_bytes: int
    mapped_bytes: int
    blocks: int
    largest_free_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


class Mapping(Protocol):
    """Memory backing one arena."""

    tensor: torch.Tensor  # uint8, 1-D, contiguous

    def close(self) -> None: ...


@runtime_checkable
class Tier(Protocol):
    """Where bytes live. Host tiers hand out NUMA-bound, DMA-registered memory."""

    name: str
    kind: TierKind
    emulated: bool
    numa_node: int | None
    device: torch.device
    link: LinkProfile  # this tier's path to the GPU (HBM), measured or declared
    io_hooked: bool  # True when on_io does something (modelled time, injected faults)

    @property
    def capacity_bytes(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def free_bytes(self) -> int: ...
    def allocate(self, nbytes: int) -> Block: ...
    def free(self, block: Block) -> None: ...
    def owner_of(self, address: int) -> Block | None: ...
    def contains(self, address: int) -> bool: ...
    def on_io(self, nbytes: int) -> None: ...
    def stats(self) -> TierStats: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class BuildContext:
    """What a tier factory may need besides its config (e.g. to build an inner tier)."""

    build: Callable[[dict], "Tier"]


TIERS: Registry[Callable[..., Tier]] = Registry("tier")


class ArenaTier:
    """A tier made of on-demand arenas, each one mapping from ``_map``."""

    def __init__(
        self, *, name: str, kind: TierKind, capacity_bytes: int, arena_bytes: int,
        alignment_bytes: int, link: LinkProfile, device: torch.device,
        numa_node: int | None = None, emulated: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.emulated = emulated
        self.numa_node = numa_node
        self.device = device
        self.link = link
        self._capacity_bytes = capacity_bytes
        self._arena_bytes = align_up(arena_bytes, alignment_bytes)
        self._max_mapped_bytes = capacity_bytes + self._arena_bytes
        self._alignment_bytes = alignment_bytes
        self._lock = threading.Lock()
        self._arenas: list[Arena] = []
        self._mappings: list[Mapping] = []
        self._blocks: dict[int, Block] = {}  # data_ptr -> live block
        self._closed = False
        self.io_hooked = False

    def _map(self, nbytes: int) -> Mapping:
        raise NotImplementedError

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        return sum(a.used_bytes for a in self._arenas)

    @property
    def free_bytes(self) -> int:
        return self._capacity_bytes - self.used_bytes

    @property
    def mapped_bytes(self) -> int:
        return sum(a.size_bytes for a in self._arenas)

    def allocate(self, nbytes: int) -> Block:
        if nbytes <= 0:
            raise CapacityError(f"tier {self.name!r}: cannot allocate {nbytes} bytes; ask for >= 1 byte")
        with self._lock:
            self._check_open()
            size = align_up(nbytes, self._alignment_bytes)
            if size > self.free_bytes:
                raise CapacityError(self._capacity_message(nbytes))
            for index, arena in enumerate(self._arenas):
                offset = arena.allocate(size)
                if offset is not None:
                    return self._record(index, offset, nbytes)
            arena_size = max(1, self._arena_bytes // size) * size  # a whole number of these objects: no tail
            if self.mapped_bytes + arena_size > self._max_mapped_bytes:
                raise CapacityError(self._capacity_message(nbytes))
            self._mappings.append(self._map(arena_size))
            self._arenas.append(Arena(arena_size, self._alignment_bytes))
            offset = self._arenas[-1].allocate(size)
            assert offset == 0
            return self._record(len(self._arenas) - 1, offset, nbytes)

    def free(self, block: Block) -> None:
        with self._lock:
            self._check_open()
            if block.tier != self.name or block.arena >= len(self._arenas):
                raise OwnershipError(f"tier {self.name!r}: block belongs to tier {block.tier!r}, not this one")
            self._arenas[block.arena].free(block.offset_bytes)
            del self._blocks[block.tensor.data_ptr()]

    def owner_of(self, address: int) -> Block | None:
        """The live block starting at ``address``; None when the address is outside this tier.

        Raises OwnershipError when the address is inside an arena but not a live block's start.
        """
        with self._lock:
            block = self._blocks.get(address)
            if block is not None:
                return block
            for mapping in self._mappings:
                start = mapping.tensor.data_ptr()
                if start <= address < start + mapping.tensor.numel():
                    raise OwnershipError(
                        f"tier {self.name!r}: address {address:#x} is inside this tier but not the start "
                        "of a live tensor (already freed, i.e. a double free, or a view into one); "
                        "free the tensor that empty() returned, once"
                    )
            return None

    def contains(self, address: int) -> bool:
        """True when ``address`` lies inside one of this tier's mappings (live or not)."""
        with self._lock:
            return any(
                m.tensor.data_ptr() <= address < m.tensor.data_ptr() + m.tensor.numel() for m in self._mappings
            )

    def on_io(self, nbytes: int) -> None:
        """Hook the transfer engine calls before moving ``nbytes`` to or from this tier."""

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name, kind=self.kind.value, emulated=self.emulated,
                capacity_bytes=self._capacity_bytes, used_bytes=self.used_bytes,
                mapped_bytes=self.mapped_bytes, blocks=len(self._blocks),
                largest_free_bytes=self._largest_free_bytes(),
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._blocks:
                log.debug("tier %s closed with %d live blocks", self.name, len(self._blocks))
            self._blocks.clear()
            for mapping in self._mappings:
                mapping.close()
            self._mappings.clear()
            self._arenas.clear()

    def __repr__(self) -> str:
        label = " emulated" if self.emulated else ""
        return f"<{type(self).__name__} {self.name!r}{label} {format_bytes(self._capacity_bytes)}>"

    def _record(self, arena: int, offset: int, nbytes: int) -> Block:
        view = self._mappings[arena].tensor.narrow(0, offset, nbytes)
        block = Block(self.name, arena, offset, nbytes, view)
        self._blocks[view.data_ptr()] = block
        return block

    def _check_open(self) -> None:
        if self._closed:
            raise OwnershipError(f"tier {self.name!r} is closed; create a new TierManager")

    def _largest_free_bytes(self) -> int:
        unmapped = min(self.free_bytes, self._max_mapped_bytes - self.mapped_bytes)
        return max([a.largest_free_bytes for a in self._arenas] + [max(0, unmapped)])

    def _capacity_message(self, nbytes: int) -> str:
        largest = self._largest_free_bytes()
        return (
            f"tier {self.name!r}: cannot allocate {format_bytes(nbytes)} ({nbytes} bytes): "
            f"capacity {format_bytes(self._capacity_bytes)}, used {format_bytes(self.used_bytes)}, "
            f"free {format_bytes(self.free_bytes)}, largest free extent {format_bytes(largest)}. "
            "Free tensors you no longer need, raise this tier's capacity_bytes, or place the object "
            "on another tier."
        )
