"""An open-addressing hash map from table row id to cache slot, built once on the host, probed on any device.

Why a hash map and not a sorted search: a probe must be cheap where it runs, inside the fused hash
+ gather kernel, one probe per requested row (no de-duplication). A binary search over the sorted
row ids of a cache of ``C`` rows costs ``log2(C)`` dependent reads per row (19 at 1% of an
Engram-27B layer, 362k rows; only the first levels stay in L2), and the CTA waits on each in turn.
Linear probing in a power-of-two table of at least twice ``C`` entries (load factor <= 1/2) costs
1.5 expected reads for a hit and 2.5 for a miss (Knuth's analysis of linear probing), each an
8-byte entry that holds the key and its slot together, so one read answers "is it here and where"
(``packed``). The price is memory: 16-32 bytes of map per cached row, against 8 for sorted ids
(10-20% on top of a 160-byte row). The build is vectorised (rounds in which every unplaced key
claims its next position) and records the longest probe sequence, so every probe loop is bounded
and needs no host sync; the kernel stops a block of rows early once all of them are resolved.

Invariants: ``entries`` is int32 ``[size, 2]`` with ``size`` a power of two >= 2 x keys; an entry
is ``(row id, slot)`` or ``(EMPTY_KEY, EMPTY_KEY)``; every key sits at ``(home(key) + d) % size``
with ``d < max_probes`` and every position from its home up to it is occupied (no deletions, so
a probe may stop at the first empty entry); ``home`` is the same integer function in torch and in
the Triton kernel (int64 multiply, wrapping, then the top ``bits`` bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.errors import CapacityError

EMPTY_KEY = -1  # an unused entry; row ids are >= 0
HASH_MULTIPLIER = 0x9E3779B97F4A7C15 - (1 << 64)  # 2^64 / golden ratio, as a signed int64 (Fibonacci hashing)
MAX_KEY = (1 << 31) - 1  # entries are int32
MIN_SIZE_PER_KEY = 2  # load factor <= 1/2


def home(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """The first position each key probes in a table of ``2**bits`` entries (int64, wrapping arithmetic)."""
    return ((keys.long() * HASH_MULTIPLIER) >> (64 - bits)) & ((1 << bits) - 1)


@dataclass(frozen=True, eq=False)
class RowMap:
    """Row id -> slot for a fixed set of distinct row ids (slot ``i`` belongs to ``keys[i]``)."""

    entries: torch.Tensor  # int32 [size, 2]: (row id, slot) or (EMPTY_KEY, EMPTY_KEY)
    bits: int  # size == 2 ** bits
    max_probes: int  # longest probe sequence of any key (>= 1)

    @classmethod
    def build(cls, keys: torch.Tensor) -> RowMap:
        """Map ``keys[i] -> i`` for distinct, non-negative int keys below 2**31 (on the host)."""
        keys = keys.reshape(-1).to("cpu", torch.int64)
        if keys.numel() == 0 or int(keys.min()) < 0 or int(keys.max()) > MAX_KEY:
            raise CapacityError(f"engram row map: keys must be non-empty row ids in [0, {MAX_KEY}], got "
                                f"{keys.numel()} keys" + (f" in [{int(keys.min())}, {int(keys.max())}]"
                                                          if keys.numel() else ""))
        if torch.unique(keys).numel() != keys.numel():
            raise CapacityError(f"engram row map: {keys.numel()} keys hold duplicates; pass distinct row ids")
        bits = max(1, (MIN_SIZE_PER_KEY * keys.numel() - 1).bit_length())
        size = 1 << bits
        owner = torch.full((size,), keys.numel(), dtype=torch.int64)  # key index per position; numel() = free
        pending = torch.arange(keys.numel())
        start = home(keys, bits)
        distance = 0
        while pending.numel():
            position = (start[pending] + distance) & (size - 1)
            free = owner[position] == keys.numel()
            claim = torch.full((size,), keys.numel(), dtype=torch.int64)  # lowest pending key per free position
            claim.scatter_reduce_(0, position[free], pending[free], reduce="amin")
            won = free & (claim[position] == pending)
            owner[position[won]] = pending[won]
            pending = pending[~won]
            distance += 1
        entries = torch.full((size, 2), EMPTY_KEY, dtype=torch.int32)
        used = owner < keys.numel()
        entries[used, 0] = keys[owner[used]].int()
        entries[used, 1] = owner[used].int()
        return cls(entries, bits, distance)

    @property
    def size(self) -> int:
        return self.entries.shape[0]

    @property
    def nbytes(self) -> int:
        return self.entries.numel() * self.entries.element_size()

    def packed(self) -> torch.Tensor:
        """The entries as int64 ``[size]``, ``(slot << 32) | key`` each (little-endian int32 pairs): one read per probe."""
        return self.entries.view(torch.int64).view(-1)

    def to(self, device: torch.device | str) -> RowMap:
        return RowMap(self.entries.to(device), self.bits, self.max_probes)

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, or EMPTY_KEY where absent (int64, on ``keys.device``; ``entries`` must be there too).

        On the host, probing stops once every key is resolved (expected ~2.5 rounds); elsewhere it
        is ``find_fixed``. Keys may be any int64 (negative ones are never found).
        """
        if keys.device.type != "cpu":
            return self.find_fixed(keys)
        start = home(keys, self.bits)
        slot = torch.full_like(start, EMPTY_KEY)
        active = torch.arange(keys.numel()).reshape(keys.shape)
        for distance in range(self.max_probes):
            entry = self.entries[(start[active] + distance) & (self.size - 1)].long()
            found = entry[..., 0] == keys[active]
            slot[active[found]] = entry[found][..., 1]
            active = active[~found & (entry[..., 0] != EMPTY_KEY)]
            if active.numel() == 0:
                break
        return slot

    def find_fixed(self, keys: torch.Tensor) -> torch.Tensor:
        """``find`` with fixed work, ``max_probes`` rounds for every key: no host sync, CUDA-graph capturable."""
        start = home(keys, self.bits)
        slot = torch.full_like(start, EMPTY_KEY)
        searching = torch.ones_like(start, dtype=torch.bool)
        for distance in range(self.max_probes):
            entry = self.entries[(start + distance) & (self.size - 1)].long()
            found = searching & (entry[..., 0] == keys)
            slot = torch.where(found, entry[..., 1], slot)
            searching &= ~found & (entry[..., 0] != EMPTY_KEY)
        return slot
