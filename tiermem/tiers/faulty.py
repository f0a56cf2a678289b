"""``faulty``: wraps any tier and injects allocation failures, I/O failures and I/O delays.

Used to test fault paths (transfer errors, fallbacks, repair) without real broken hardware. Faults
are drawn from a seeded generator, so a test sees the same faults on every run.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from tiermem.config import option, require
from tiermem.errors import CapacityError, InjectedFault
from tiermem.tiers.base import TIERS, Block, BuildContext, Tier, TierStats


@dataclass(frozen=True)
class FaultyTierConfig:
    """Fault injection around an inner tier."""

    inner: dict[str, Any] = option(help="Spec of the wrapped tier, e.g. {kind='sim', capacity_bytes='1MiB'}.")
    name: str = option("faulty", help="Name used to address this tier (the inner tier's name is not used).")
    fail_allocations_after: int | None = option(
        None, help="Allocations that succeed before every later one fails (None: never fail).")
    io_failure_probability: float = option(0.0, help="Probability that one transfer touching the tier fails.")
    io_delay_us: float = option(0.0, help="Delay added before every transfer touching the tier (us).")
    seed: int = option(0, help="Seed of the fault generator.")

    def __post_init__(self) -> None:
        require(0.0 <= self.io_failure_probability <= 1.0, self,
                f"io_failure_probability must be in [0, 1], got {self.io_failure_probability}")
        require(self.io_delay_us >= 0, self, f"io_delay_us must be >= 0, got {self.io_delay_us}")
        if self.fail_allocations_after is not None:
            require(self.fail_allocations_after >= 0, self,
                    f"fail_allocations_after must be >= 0, got {self.fail_allocations_after}")


class FaultyTier:
    """A tier that behaves like ``inner`` except for the faults it injects."""

    def __init__(self, config: FaultyTierConfig, inner: Tier) -> None:
        self._inner = inner
        self._config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self._allocations = 0
        self.name = config.name
        self.kind = inner.kind
        self.emulated = inner.emulated
        self.numa_node = inner.numa_node
        self.device = inner.device
        self.link = inner.link
        self.io_hooked = True
        self.injected_failures = 0

    @property
    def capacity_bytes(self) -> int:
        return self._inner.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._inner.used_bytes

    @property
    def free_bytes(self) -> int:
        return self._inner.free_bytes

    def allocate(self, nbytes: int) -> Block:
        with self._lock:
            limit = self._config.fail_allocations_after
            if limit is not None and self._allocations >= limit:
                self.injected_failures += 1
                raise CapacityError(
                    f"tier {self.name!r}: injected allocation failure after {limit} allocations (faulty tier)"
                )
            self._allocations += 1
        block = self._inner.allocate(nbytes)
        return Block(self.name, block.arena, block.offset_bytes, block.nbytes, block.tensor)

    def free(self, block: Block) -> None:
        inner_block = self._inner.owner_of(block.tensor.data_ptr())
        if inner_block is None:
            self._inner.free(block)  # raises the inner tier's ownership error
            return
        self._inner.free(inner_block)

    def owner_of(self, address: int) -> Block | None:
        block = self._inner.owner_of(address)
        if block is None:
            return None
        return Block(self.name, block.arena, block.offset_bytes, block.nbytes, block.tensor)

    def contains(self, address: int) -> bool:
        return self._inner.contains(address)

    def on_io(self, nbytes: int) -> None:
        if self._config.io_delay_us:
            time.sleep(self._config.io_delay_us * 1e-6)
        self._inner.on_io(nbytes)
        with self._lock:
            fail = self._random.random() < self._config.io_failure_probability
            if fail:
                self.injected_failures += 1
        if fail:
            raise InjectedFault(f"tier {self.name!r}: injected I/O failure on a {nbytes}-byte transfer (faulty tier)")

    def stats(self) -> TierStats:
        inner = self._inner.stats()
        return TierStats(self.name, inner.kind, inner.emulated, inner.capacity_bytes, inner.used_bytes,
                         inner.mapped_bytes, inner.blocks, inner.largest_free_bytes)

    def close(self) -> None:
        self._inner.close()


def _build(config: FaultyTierConfig, context: BuildContext) -> FaultyTier:
    return FaultyTier(config, context.build(dict(config.inner)))


TIERS.register("faulty", FaultyTierConfig, _build)
