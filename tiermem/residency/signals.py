"""Signals that eviction policies read: activation counts, predicted scores, and (simulation only) the future.

Each signal is an object handed to a policy at construction and updated by its producer: the cache
records activations, the prefetcher publishes predictions, the simulator advances the future's clock.
They outlive residency: an expert evicted and loaded again keeps its counts (as in MoE-Infinity).

Invariants: every signal is keyed by opaque ``ObjectKey``s; unknown keys read as "no evidence"
(count 0, score 0, never used again); ``ActivationCounts`` and ``PredictionScores`` are thread-safe.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tiermem.errors import ConfigError
from tiermem.types import ObjectKey


class ActivationCounts:
    """How often each object was used, optionally decayed with a half-life measured in ticks.

    With ``half_life_ticks=None`` counts are plain totals. Otherwise a use at tick ``u`` weighs
    ``0.5 ** ((now - u) / half_life_ticks)`` where ``now`` is the latest tick recorded, so old
    popularity fades; each count is stored as of its last update and decayed on read (O(1) per use).
    """

    def __init__(self, half_life_ticks: float | None = None) -> None:
        if half_life_ticks is not None and not half_life_ticks > 0:
            raise ConfigError(f"residency activation counts: half_life_ticks must be > 0, got {half_life_ticks}")
        self.half_life_ticks = half_life_ticks
        self._lock = threading.Lock()
        self._counts: dict[ObjectKey, tuple[float, int]] = {}  # key -> (count as of tick, tick)
        self._now = 0

    def record(self, key: ObjectKey, tick: int, uses: float = 1.0) -> None:
        """Add ``uses`` activations of ``key`` at ``tick`` (ticks never go backwards)."""
        with self._lock:
            self._now = max(self._now, tick)
            self._counts[key] = (self._decayed(key, self._now) + uses, self._now)

    def record_many(self, uses: Iterable[tuple[ObjectKey, float]], tick: int) -> None:
        """``record`` each ``(key, uses)`` pair at ``tick``, under one lock (a routed layer's experts at once)."""
        with self._lock:
            self._now = max(self._now, tick)
            for key, count in uses:
                self._counts[key] = (self._decayed(key, self._now) + count, self._now)

    def count(self, key: ObjectKey) -> float:
        """The (decayed) activation count of ``key`` as of the latest recorded tick."""
        with self._lock:
            return self._decayed(key, self._now)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._now = 0

    def _decayed(self, key: ObjectKey, now: int) -> float:
        count, tick = self._counts.get(key, (0.0, now))
        if self.half_life_ticks is None or tick == now:
            return count
        return count * math.exp2(-(now - tick) / self.half_life_ticks)


class PredictionScores:
    """The latest predicted score of each object (higher = more likely needed soon), set by the prefetcher.

    Two ways in, one truth: ``update`` sets single keys; ``publish`` sets a whole table layer at once,
    stored as one array (``scores[i]`` is the object of index ``i``), so publishing a layer's prediction
    costs about the same for 8 experts as for 256. The later write of a key wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scores: dict[ObjectKey, float] = {}
        self._layers: dict[tuple[str, str, int], np.ndarray] = {}

    def update(self, scores: Mapping[ObjectKey, float] | Iterable[tuple[ObjectKey, float]]) -> None:
        """Overwrite the scores of the given keys (a mapping or ``(key, score)`` pairs); other keys keep theirs."""
        with self._lock:
            for key, score in dict(scores).items():
                layer = self._layers.get((key.kind, key.table, key.layer))
                if layer is not None and 0 <= key.index < layer.size:
                    layer[key.index] = score
                else:
                    self._scores[key] = score

    def publish(self, first: ObjectKey, scores: np.ndarray) -> np.ndarray:
        """Set the scores of every object of ``first``'s table layer: ``scores[i]`` for index ``i``; returns them
        as the float64 copy kept here (read-only to the caller)."""
        values = np.array(scores, dtype=np.float64).reshape(-1)
        with self._lock:
            self._layers[(first.kind, first.table, first.layer)] = values
            for key in [k for k in self._scores if (k.kind, k.table, k.layer) == (first.kind, first.table, first.layer)
                        and 0 <= k.index < values.size]:
                del self._scores[key]
        return values

    def forget(self, first: ObjectKey) -> None:
        """Drop every score of ``first``'s table layer: its objects are unpredicted again (score 0.0)."""
        layer = (first.kind, first.table, first.layer)
        with self._lock:
            self._layers.pop(layer, None)
            for key in [k for k in self._scores if (k.kind, k.table, k.layer) == layer]:
                del self._scores[key]

    def layer(self, first: ObjectKey) -> np.ndarray | None:
        """The published scores of ``first``'s table layer (read-only view), or None if none was published."""
        values = self._layers.get((first.kind, first.table, first.layer))
        if values is None:
            return None
        view = values.view()
        view.flags.writeable = False
        return view

    def score(self, key: ObjectKey) -> float:
        """The latest score of ``key``; 0.0 when it was never predicted. Lock-free: one dict lookup is atomic,
        and eviction orders read this once per resident object per layer."""
        layer = self._layers.get((key.kind, key.table, key.layer))
        if layer is not None and 0 <= key.index < layer.size:
            return float(layer[key.index])
        return self._scores.get(key, 0.0)

    def reset(self) -> None:
        with self._lock:
            self._scores.clear()
            self._layers.clear()


class FutureUses:
    """When each object will be used, for Belady's oracle. Simulation only: a live system has no future.

    Built from the complete list of (tick, key) uses of a trace; ``advance(tick)`` moves the clock,
    and ``next_use(key)`` is the first use at or after it (``inf`` when there is none).
    Not thread-safe: the simulator drives it from one thread.
    """

    def __init__(self, uses: Mapping[ObjectKey, Sequence[int]]) -> None:
        self._ticks = {key: sorted(ticks) for key, ticks in uses.items()}
        self._now = 0

    @classmethod
    def from_events(cls, events: Iterable[tuple[int, ObjectKey]]) -> FutureUses:
        uses: dict[ObjectKey, list[int]] = {}
        for tick, key in events:
            uses.setdefault(key, []).append(tick)
        return cls(uses)

    @property
    def now(self) -> int:
        return self._now

    def advance(self, tick: int) -> None:
        if tick < self._now:
            raise ConfigError(f"residency future uses: the clock cannot go back from tick {self._now} to {tick}")
        self._now = tick

    def next_use(self, key: ObjectKey) -> float:
        ticks = self._ticks.get(key)
        if not ticks:
            return math.inf
        i = bisect.bisect_left(ticks, self._now)
        return float(ticks[i]) if i < len(ticks) else math.inf
