"""Membership of an expert-parallel deployment: which ranks exist, their health, and the epoch.

The epoch names one membership: it starts at 0 and grows by exactly one on every accepted change, so
two views with the same epoch describe the same set of live ranks. Plans and routing tables carry the
epoch they were computed for; a plan from an older epoch is stale.

Design note (transitions; anything else raises ``RepairError`` naming the rank and the epoch):
| from      | to        | method        | when                                              |
|-----------|-----------|---------------|---------------------------------------------------|
| alive     | failed    | mark_failed   | a heartbeat went stale, a collective failed       |
| rejoining | failed    | mark_failed   | the rank died again while being refilled          |
| failed    | rejoining | begin_rejoin  | the rank's process is back; its slots are empty   |
| rejoining | alive     | mark_alive    | its reintegration plan has landed                 |
Only ``alive`` ranks serve tokens. Every method takes an optional ``expected_epoch``: the change is
refused when another thread or process changed the membership first (compare-and-set). All state is
guarded by one lock; ``view()`` returns an immutable snapshot that readers may keep.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass

from tiermem.errors import RepairError

log = logging.getLogger("tiermem.repair")


class Health(str, enum.Enum):
    """Health of one rank."""

    ALIVE = "alive"
    FAILED = "failed"
    REJOINING = "rejoining"


_ALLOWED = frozenset({  # (from, to): the table of the module docstring
    (Health.ALIVE, Health.FAILED), (Health.REJOINING, Health.FAILED), (Health.FAILED, Health.REJOINING),
    (Health.REJOINING, Health.ALIVE),
})


@dataclass(frozen=True)
class MembershipView:
    """An immutable snapshot of the membership at one epoch."""

    epoch: int
    health: tuple[Health, ...]  # indexed by rank

    @property
    def world_size(self) -> int:
        return len(self.health)

    @functools.cached_property
    def live_ranks(self) -> frozenset[int]:
        """Ranks that serve tokens (``alive``)."""
        return frozenset(r for r, h in enumerate(self.health) if h is Health.ALIVE)


class Membership:
    """Mutable, thread-safe membership; every accepted change returns the new epoch."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise RepairError(f"membership: world_size must be >= 1, got {world_size}")
        self._lock = threading.Lock()
        self._health = [Health.ALIVE] * world_size
        self._epoch = 0

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def view(self) -> MembershipView:
        with self._lock:
            return MembershipView(self._epoch, tuple(self._health))

    def health(self, rank: int) -> Health:
        with self._lock:
            self._check_rank(rank)
            return self._health[rank]

    def mark_failed(self, rank: int, *, expected_epoch: int | None = None) -> int:
        """``alive``/``rejoining`` -> ``failed``; returns the new epoch."""
        return self._move(rank, Health.FAILED, expected_epoch)

    def begin_rejoin(self, rank: int, *, expected_epoch: int | None = None) -> int:
        """``failed`` -> ``rejoining``: the rank is back with empty slots and does not serve yet."""
        return self._move(rank, Health.REJOINING, expected_epoch)

    def mark_alive(self, rank: int, *, expected_epoch: int | None = None) -> int:
        """``rejoining`` -> ``alive``: the rank's slots are filled and it serves again."""
        return self._move(rank, Health.ALIVE, expected_epoch)

    def mark_failed_many(self, ranks: Collection[int], *, expected_epoch: int | None = None) -> int:
        """Fail several ranks as one change (one epoch step), e.g. every GPU of a lost node."""
        if not ranks:
            raise RepairError("membership: mark_failed_many needs at least one rank")
        with self._lock:
            self._check_epoch(expected_epoch, f"fail ranks {sorted(ranks)}")
            for rank in sorted(ranks):
                self._check_rank(rank)
                self._check_transition(rank, Health.FAILED)
            for rank in ranks:
                self._health[rank] = Health.FAILED
            return self._bump(f"ranks {sorted(ranks)} failed")

    def _move(self, rank: int, target: Health, expected_epoch: int | None) -> int:
        with self._lock:
            self._check_rank(rank)
            self._check_epoch(expected_epoch, f"move rank {rank} to {target.value}")
            self._check_transition(rank, target)
            self._health[rank] = target
            return self._bump(f"rank {rank} is {target.value}")

    def _bump(self, what: str) -> int:
        self._epoch += 1
        log.info("membership: epoch %d: %s", self._epoch, what)
        return self._epoch

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < len(self._health):
            raise RepairError(
                f"membership: rank {rank} does not exist at epoch {self._epoch} (world size {len(self._health)})"
            )

    def _check_epoch(self, expected_epoch: int | None, what: str) -> None:
        if expected_epoch is not None and expected_epoch != self._epoch:
            raise RepairError(
                f"membership: cannot {what}: expected epoch {expected_epoch} but the membership is at epoch "
                f"{self._epoch} (another change won); re-read view() and decide again"
            )

    def _check_transition(self, rank: int, target: Health) -> None:
        current = self._health[rank]
        if (current, target) not in _ALLOWED:
            allowed = sorted(f"{a.value}->{b.value}" for a, b in _ALLOWED if a is current)
            raise RepairError(
                f"membership: rank {rank} is {current.value} at epoch {self._epoch}; it cannot become "
                f"{target.value} (allowed from {current.value}: {allowed or 'none'})"
            )
