"""The memory a bench measures: named kinds (pageable, pinned, tiers, NUMA nodes, GPUs) and their pools.

Memory is named the way a user writes it on the command line:
| name           | what                                                                          |
|----------------|-------------------------------------------------------------------------------|
| ``pageable``   | plain ``torch.empty`` host memory (the slow path tiermem refuses to DMA from)  |
| ``pinned``     | ``torch.empty(pin_memory=True)`` (cudaHostAlloc; needs CUDA)                   |
| ``node:N``     | a tiermem ``dram`` tier bound to NUMA node N (one per node with memory)        |
| ``cuda:N``     | GPU memory of device N (``hbm`` means the bench's device)                     |
| anything else  | a tier of the bench's TierManager by name (``dram``, ``cxl``, ``sim``, ...)    |

Invariants: a pool is one allocation of one kind, filled once with a position-dependent pattern (so
every slot differs from every other); slots are 4 KiB-aligned, non-overlapping views of it. Tier
capacities in the default layout are caps, not reservations: arenas are mapped only when a pool asks.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiermem import numa
from tiermem.config import format_bytes, load_toml
from tiermem.defaults import default_tier_specs
from tiermem.errors import ConfigError, RegistryError, TopologyError, TransferError
from tiermem.manager import TierManager
from tiermem.tiers.arena import align_up
from tiermem.topology import Topology

log = logging.getLogger("tiermem.bench")

SLOT_ALIGNMENT_BYTES = 4096
TIER_CAPACITY_BYTES = 1 << 40  # a cap only: the bench maps what its pools ask for
ARENA_BYTES = 64 << 20
_PATTERN_MULTIPLIER = 0x2545F4914F6CDD1D  # odd, < 2**63: spreads arange over all byte values
_POISON_BYTE = 0xA5


class MemoryKind(str, enum.Enum):
    PAGEABLE = "pageable"
    PINNED = "pinned"
    TIER = "tier"
    DEVICE = "device"


@dataclass(frozen=True)
class MemorySpec:
    """One memory kind as named by the user; ``label`` is what results and tables show."""

    label: str
    kind: MemoryKind
    tier: str | None = None
    device_index: int | None = None

    @property
    def is_host(self) -> bool:
        return self.kind is not MemoryKind.DEVICE


def parse_memory(text: str, *, device_index: int = 0) -> MemorySpec:
    """``"pinned"``, ``"node:1"``, ``"cuda:0"``, ``"hbm"``, ``"cxl"`` ... -> MemorySpec (tiers checked later)."""
    name = text.strip()
    if name in (MemoryKind.PAGEABLE.value, MemoryKind.PINNED.value):
        return MemorySpec(name, MemoryKind(name))
    if name in ("hbm", "cuda"):
        return MemorySpec(f"cuda:{device_index}", MemoryKind.DEVICE, device_index=device_index)
    match = re.fullmatch(r"cuda:(\d+)", name)
    if match:
        return MemorySpec(name, MemoryKind.DEVICE, device_index=int(match.group(1)))
    if re.fullmatch(r"node:\d+", name) or re.fullmatch(r"[A-Za-z_][\w.-]*", name):
        return MemorySpec(name, MemoryKind.TIER, tier=name)
    raise ConfigError(
        f"bench: cannot parse memory {text!r}; use pageable, pinned, node:N, cuda:N, hbm, or a tier name "
        "(dram, cxl, sim, ... as configured)"
    )


def bench_tier_specs(topology: Topology, tier_config: Mapping[str, Any] | None, *,
                     gpu_count: int) -> list[dict[str, Any]]:
    """The bench's host tiers: the user's (or this host's default) layout plus one ``node:N`` per node.

    The default layout's capacities are raised to a cap (arenas are mapped on demand) and its hbm tier
    is left out: device pools are plain ``torch.empty`` on the GPU.
    """
    numa_usable = numa.available()
    if tier_config is not None:
        specs = [dict(t) for t in tier_config.get("tiers", ())]
        if not specs:
            raise ConfigError("bench: the tier config has no [[tiers]]; list at least one host tier")
    else:
        specs = [
            {**t, "capacity_bytes": TIER_CAPACITY_BYTES, "arena_bytes": ARENA_BYTES}
            for t in default_tier_specs(topology, gpu_count=gpu_count, numa_usable=numa_usable)
            if t["kind"] != "hbm"
        ]
    names = {t.get("name", t.get("kind")) for t in specs}
    for node in numa.nodes() if numa_usable else ():
        if f"node:{node}" not in names:
            specs.append({"kind": "dram", "name": f"node:{node}", "numa_node": node,
                          "capacity_bytes": TIER_CAPACITY_BYTES, "arena_bytes": ARENA_BYTES})
    return specs


def load_tier_config(path: str | Path | None) -> dict[str, Any] | None:
    return None if path is None else load_toml(path)


class BenchMemory:
    """Allocates the bench's pools of every memory kind; owns the TierManager behind tier kinds."""

    def __init__(self, tier_specs: Sequence[Mapping[str, Any]]) -> None:
        self.manager = TierManager.from_config({"tiers": [dict(t) for t in tier_specs]})
        self._pools: dict[tuple[str, str], torch.Tensor] = {}

    def check(self, spec: MemorySpec) -> None:
        """Raise a clear error now if ``spec`` cannot be allocated on this host."""
        if spec.kind is MemoryKind.TIER and spec.tier not in self.manager.tiers:
            node = re.fullmatch(r"node:(\d+)", spec.tier)
            if node:
                numa.check_node(int(node.group(1)))  # raises naming the nodes that exist
            raise RegistryError(
                f"bench: unknown memory {spec.label!r}; tiers here: {sorted(self.manager.tiers)}, "
                "plus pageable, pinned, node:N and cuda:N"
            )
        if spec.kind in (MemoryKind.PINNED, MemoryKind.DEVICE) and not torch.cuda.is_available():
            raise TopologyError(f"bench: memory {spec.label!r} needs CUDA, which is not available on this host")
        if spec.kind is MemoryKind.DEVICE and spec.device_index >= torch.cuda.device_count():
            raise TopologyError(f"bench: memory {spec.label!r} names a GPU that does not exist; this host has "
                                f"{torch.cuda.device_count()} (cuda:0..)")

    def emulated(self, spec: MemorySpec) -> bool:
        return spec.kind is MemoryKind.TIER and bool(self.manager.tier(spec.tier).emulated)

    def pool(self, spec: MemorySpec, role: str, nbytes: int, *, fill: bool) -> torch.Tensor:
        """The ``role`` pool of ``spec`` (allocated once, at least ``nbytes``; filled with the pattern if asked)."""
        key = (spec.label, role)
        pool = self._pools.get(key)
        if pool is not None and pool.numel() >= nbytes:
            return pool
        if pool is not None:
            self._release(spec, pool)
        self.check(spec)
        nbytes = align_up(nbytes, SLOT_ALIGNMENT_BYTES)
        pool = self._allocate(spec, nbytes)
        if fill:
            fill_pattern(pool, seed=len(self._pools) + 1)
        self._pools[key] = pool
        log.info("bench: %s pool of %s on %s", role, format_bytes(nbytes), spec.label)
        return pool

    def close(self) -> None:
        self._pools.clear()
        self.manager.close()

    def _allocate(self, spec: MemorySpec, nbytes: int) -> torch.Tensor:
        if spec.kind is MemoryKind.PAGEABLE:
            return torch.empty(nbytes, dtype=torch.uint8)
        if spec.kind is MemoryKind.PINNED:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if spec.kind is MemoryKind.DEVICE:
            return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{spec.device_index}")
        return self.manager.empty(nbytes, torch.uint8, tier=spec.tier)

    def _release(self, spec: MemorySpec, pool: torch.Tensor) -> None:
        if spec.kind is MemoryKind.TIER:
            self.manager.free(pool)


def slots(pool: torch.Tensor, nbytes: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` disjoint, 4 KiB-aligned ``nbytes`` views of ``pool`` (at least one)."""
    stride = align_up(nbytes, SLOT_ALIGNMENT_BYTES)
    available = pool.numel() // stride
    if available < 1:
        raise ConfigError(f"bench: a pool of {pool.numel()} bytes cannot hold one {nbytes}-byte slot")
    return [pool.narrow(0, i * stride, nbytes) for i in range(min(count, available))]


def pool_bytes(max_nbytes: int, rotations: int) -> int:
    """Pool size that gives ``rotations`` slots up to 256 MiB objects and 2 slots above."""
    slots_at_max = rotations if max_nbytes <= 256 << 20 else min(rotations, 2)
    return align_up(max_nbytes, SLOT_ALIGNMENT_BYTES) * slots_at_max


def fill_pattern(buffer: torch.Tensor, seed: int) -> None:
    """Fill with a position-dependent pattern (8-byte words ``(i * odd + seed)``; tail bytes ``i & 255``)."""
    words = buffer.numel() // 8
    if words:
        view = buffer.narrow(0, 0, words * 8).view(torch.int64)
        torch.arange(words, dtype=torch.int64, device=buffer.device, out=view)
        view.mul_(_PATTERN_MULTIPLIER).add_(seed)
    tail = buffer.numel() - words * 8
    if tail:
        buffer.narrow(0, words * 8, tail).copy_(torch.arange(tail, dtype=torch.uint8))


def poison(buffers: Sequence[torch.Tensor]) -> None:
    """Overwrite destinations so that a copy that writes nothing cannot pass verification."""
    for buffer in buffers:
        buffer.fill_(_POISON_BYTE)


def verify_equal(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    """Raise TransferError unless every ``(expected, actual)`` pair holds the same bytes.

    Compared on the GPU when either side is there (the host side is copied up with plain torch),
    otherwise on the host. A mismatch means the measured path moved wrong bytes: an error, not a number.
    """
    if any(t.is_cuda for pair in pairs for t in pair):
        torch.cuda.synchronize()
    for slot, (expected, actual) in enumerate(pairs):
        device = next((t.device for t in (expected, actual) if t.is_cuda), torch.device("cpu"))
        a, b = expected.to(device).reshape(-1), actual.to(device).reshape(-1)
        if a.numel() != b.numel():
            raise TransferError(f"bench: {what}: slot {slot} moved {b.numel()} bytes, expected {a.numel()}")
        if not torch.equal(a, b):
            first = int((a != b).nonzero()[0])
            raise TransferError(
                f"bench: {what}: slot {slot} differs from its source at byte {first} of {a.numel()} "
                f"(expected {int(a[first])}, found {int(b[first])}); the measured copy path is broken, so this "
                "point is not reported"
            )
