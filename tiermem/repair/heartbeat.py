"""Failure detection and agreement over a key-value store (``torch.distributed.TCPStore`` or any ``Store``).

Every rank runs a ``Heartbeat``: a named thread that increments the counter ``{prefix}/{rank}`` every
``interval_s``. A ``FailureDetector`` suspects a rank whose counter has not moved for ``timeout_s``,
timed on the detector's own monotonic clock, so no clock synchronisation between hosts is needed.
Suspicions become a membership change through ``agree_on_failures``: the first proposal for epoch
``e + 1`` is written with compare-and-set, and every survivor adopts that one, so all survivors move
to the same epoch with the same failed set even if they noticed at different moments.

Use a store that outlives the ranks it watches (hosted by a launcher or a coordinator, not by a
rank that may die).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection

import torch.distributed as dist

from tiermem.errors import RepairError

log = logging.getLogger("tiermem.repair")


class Heartbeat:
    """Bumps this rank's counter in ``store`` every ``interval_s`` until ``close()``."""

    def __init__(self, store: dist.Store, rank: int, *, interval_s: float = 0.05, prefix: str = "tiermem/hb") -> None:
        if interval_s <= 0:
            raise RepairError(f"heartbeat: interval_s must be > 0, got {interval_s}")
        self._store = store
        self._key = f"{prefix}/{rank}"
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._store.add(self._key, 1)
        self._thread = threading.Thread(target=self._beat, name=f"tiermem-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self._interval_s + 1.0)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._store.add(self._key, 1)
            except RuntimeError as exc:  # the store is gone: nothing left to tell
                log.warning("heartbeat %s stopped: %s", self._key, exc)
                return


class FailureDetector:
    """Suspects ranks whose heartbeat counter stood still for ``timeout_s``."""

    def __init__(self, store: dist.Store, ranks: Collection[int], *, timeout_s: float,
                 prefix: str = "tiermem/hb") -> None:
        if timeout_s <= 0:
            raise RepairError(f"failure detector: timeout_s must be > 0, got {timeout_s}")
        self._store = store
        self._prefix = prefix
        self.timeout_s = timeout_s
        now = time.monotonic()
        self._seen: dict[int, tuple[int, float]] = {r: (self._count(r), now) for r in ranks}

    def watch(self, ranks: Collection[int]) -> None:
        """Watch exactly ``ranks`` from now on (e.g. the live ranks of a new epoch)."""
        now = time.monotonic()
        self._seen = {r: self._seen.get(r, (self._count(r), now)) for r in ranks}

    def poll(self) -> frozenset[int]:
        """Ranks whose counter has not moved for ``timeout_s``."""
        now = time.monotonic()
        suspected = set()
        for rank, (count, since) in self._seen.items():
            current = self._count(rank)
            if current != count:
                self._seen[rank] = (current, now)
            elif now - since > self.timeout_s:
                suspected.add(rank)
        return frozenset(suspected)

    def _count(self, rank: int) -> int:
        return self._store.add(f"{self._prefix}/{rank}", 0)


def agree_on_failures(store: dist.Store, epoch: int, suspected: Collection[int], *,
                      prefix: str = "tiermem/membership") -> frozenset[int]:
    """The failed set of epoch ``epoch + 1``: this rank's ``suspected`` if it proposed first, else the winner's."""
    if not suspected:
        raise RepairError(f"membership agreement: nothing to agree on at epoch {epoch}; pass the suspected ranks")
    proposal = json.dumps(sorted(suspected))
    winner = store.compare_set(f"{prefix}/{epoch + 1}", "", proposal)
    failed = frozenset(json.loads(winner))
    if failed != frozenset(suspected):
        log.info("membership agreement for epoch %d: adopted %s (suspected %s)", epoch + 1, sorted(failed),
                 sorted(suspected))
    return failed
