"""``SlotCopies``: copies objects from their host homes into HBM slot rows, the cheapest safe way.

Where the CUDA runtime fast path is mapped, each home and each slot row is validated once (pinned,
contiguous, its size: ``transfer.endpoint``) and every later copy goes by address through
``TransferEngine.submit_direct``: about one ``cudaMemcpyAsync`` of host time per object, and one event per
object where its completion alone is asked for (``parts``), else one per stream for the whole submit.
A home on a tier with I/O hooks (``sim`` time, ``faulty`` injection), or a process without the fast
path (CPU), goes through a validated plan (``make_plan`` + ``submit``) instead, so hooks always run.

Invariants it relies on (``ports``): a slot's row never moves while the cache holds memory, and an
object's home never moves while the homes are open.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiermem.manager import TierManager
from tiermem.prefetch.ports import Homes, SlotCache
from tiermem.transfer import Copy, Endpoint, TransferHandle, endpoint, make_plan
from tiermem.types import ObjectKey


class SlotCopies:
    """Submits home -> slot copies for a prefetcher; one handle per submit, ``part(i)`` per object."""

    def __init__(self, cache: SlotCache, homes: Homes, manager: TierManager) -> None:
        self.cache = cache
        self.homes = homes
        self.manager = manager
        self.direct = cache.device.type == "cuda" and manager.engine.direct_available
        self._homes: dict[ObjectKey, Endpoint | None] = {}  # None: a home whose tier hooks I/O
        self._slots: dict[int, Endpoint] = {}

    def submit(self, keys: Sequence[ObjectKey], rows: Sequence[torch.Tensor], *, background: bool,
               after: torch.cuda.Stream | None, parts: bool = True) -> TransferHandle:
        """Copy each key's home into its slot row ``rows[i]``, starting after the work queued on ``after``;
        ``parts=False``: the caller only ever waits for them all (``part(i)`` may be the whole submit)."""
        engine = self.manager.engine
        if self.direct:
            pairs = [(self._home(key), self._slot(key, row)) for key, row in zip(keys, rows)]
            if all(home is not None for home, _ in pairs):
                return engine.submit_direct(pairs, background=background, after=after, parts=parts)
        copies = []
        for key, row in zip(keys, rows):
            tier = self.manager.tier(self.homes.tier_of(key))
            copies.append(Copy(self.homes.home(key), row, (tier.on_io,) if tier.io_hooked else ()))
        return engine.submit(make_plan(copies), background=background, after=after)

    def _home(self, key: ObjectKey) -> Endpoint | None:
        """``key``'s home, validated on its first copy; None when its tier hooks I/O (it needs a plan)."""
        try:
            return self._homes[key]
        except KeyError:
            pass
        home = None
        if not self.manager.tier(self.homes.tier_of(key)).io_hooked:
            home = endpoint(self.homes.home(key), "source")
        self._homes[key] = home
        return home

    def _slot(self, key: ObjectKey, row: torch.Tensor) -> Endpoint:
        """The slot row ``key`` is loading into, validated on the slot's first load."""
        slot = self.cache.slot_of(key)
        found = self._slots.get(slot)
        if found is None:
            found = self._slots[slot] = endpoint(row, "destination")
        return found
