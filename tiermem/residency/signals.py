"""Signals that eviction policies read: activation counts, predicted scores, and (simulation only) the future.

Each signal is an object handed to a policy at construction and updated by its producer: the cache
records activations, the prefetcher publishes predictions, the simulator advances the future's clock.
They outlive residency: an expert evicted and loaded again keeps its counts (as in MoE-Infinity).

Invariants: every signal is keyed by opaque ``ObjectKey``s; unknown keys read as "no evidence"
(count 0, score 0, never used again); ``ActivationCounts`` and ``PredictionScores`` are thread-safe;
a table layer they keep as one array (``ActivationCounts.track``, ``PredictionScores.publish``) reads,
object for object, exactly what its keys read one at a time.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tiermem.errors import ConfigError
from tiermem.types import ObjectKey


def _table_layer(key: ObjectKey) -> tuple[str, str, int]:
    """The table layer ``key`` belongs to (kind, table, layer): what the per-layer arrays are keyed by."""
    return key[:3]


class _TrackedLayer:
    """The counts of one tracked table layer: ``counts[i]`` (float64) as of tick ``ticks[i]`` (int64) for the
    object of index ``i``; ``count_at`` and ``tick_at`` view the same memory and read or write one object
    several times faster than numpy's scalar indexing (``record`` runs once per routed expert)."""

    __slots__ = ("count_at", "counts", "tick_at", "ticks")

    def __init__(self, counts: np.ndarray, ticks: np.ndarray) -> None:
        self.counts, self.ticks = counts, ticks
        self.count_at, self.tick_at = memoryview(counts), memoryview(ticks)


class ActivationCounts:
    """How often each object was used, optionally decayed with a half-life measured in ticks.

    With ``half_life_ticks=None`` counts are plain totals. Otherwise a use at tick ``u`` weighs
    ``0.5 ** ((now - u) / half_life_ticks)`` where ``now`` is the latest tick recorded, so old
    popularity fades; each count is stored as of its last update and decayed on read (O(1) per use).

    A table layer registered with ``track`` keeps its objects' counts in two arrays (``counts[i]`` and
    ``ticks[i]`` are the object of index ``i``), so ``layer_counts`` decays a whole layer with a few vector
    operations; other keys live in a dict. ``count`` of a tracked key reads the same decayed array, so the
    two agree bit for bit.
    """

    def __init__(self, half_life_ticks: float | None = None) -> None:
        if half_life_ticks is not None and not half_life_ticks > 0:
            raise ConfigError(f"residency activation counts: half_life_ticks must be > 0, got {half_life_ticks}")
        self.half_life_ticks = half_life_ticks
        self._lock = threading.Lock()
        self._counts: dict[ObjectKey, tuple[float, int]] = {}  # key -> (count as of tick, tick)
        self._layers: dict[tuple[str, str, int], _TrackedLayer] = {}
        self._now = 0

    def track(self, first: ObjectKey, size: int) -> None:
        """Keep the counts of ``first``'s table layer, indices ``0 <= index < size``, as arrays from now on;
        counts recorded so far are kept (a layer registered again keeps its arrays, grown to ``size``)."""
        layer = _table_layer(first)
        with self._lock:
            old = self._layers.get(layer)
            kept = 0 if old is None else old.counts.size
            counts = np.zeros(max(size, kept), np.float64)
            ticks = np.full(counts.size, self._now, np.int64)
            if old is not None:
                counts[:kept], ticks[:kept] = old.counts, old.ticks
            for key in [k for k in self._counts if _table_layer(k) == layer and 0 <= k.index < counts.size]:
                counts[key.index] = self._decayed(key)  # at age 0: ``count`` reads the same float as before
                del self._counts[key]
            self._layers[layer] = _TrackedLayer(counts, ticks)

    def record(self, key: ObjectKey, tick: int, uses: float = 1.0) -> None:
        """Add ``uses`` activations of ``key`` at ``tick`` (ticks never go backwards)."""
        with self._lock:
            self._now = max(self._now, tick)
            self._add(key, uses)

    def record_many(self, uses: Iterable[tuple[ObjectKey, float]], tick: int) -> None:
        """``record`` each ``(key, uses)`` pair at ``tick``, under one lock (a routed layer's experts at once)."""
        with self._lock:
            self._now = max(self._now, tick)
            for key, count in uses:
                self._add(key, count)

    def count(self, key: ObjectKey) -> float:
        """The (decayed) activation count of ``key`` as of the latest recorded tick."""
        with self._lock:
            layer = self._layers.get(_table_layer(key))
            if layer is not None and 0 <= key.index < layer.counts.size:
                return float(self._decayed_layer(layer)[key.index])
            return self._decayed(key)

    def layer_counts(self, first: ObjectKey) -> np.ndarray | None:
        """The (decayed) activation counts of ``first``'s table layer as of the latest recorded tick, as a new
        float64 array (``[i]`` is the object of index ``i``, equal to its ``count``); None if it is not tracked."""
        with self._lock:
            layer = self._layers.get(_table_layer(first))
            return None if layer is None else self._decayed_layer(layer)

    def reset(self) -> None:
        """Forget every count and the clock; tracked layers stay tracked."""
        with self._lock:
            self._counts.clear()
            for layer in self._layers.values():
                layer.counts.fill(0.0)
                layer.ticks.fill(0)
            self._now = 0

    def _add(self, key: ObjectKey, uses: float) -> None:
        """Decay ``key``'s count to the latest tick and add ``uses``; the caller holds the lock."""
        layer = self._layers.get(_table_layer(key))
        index = key.index
        if layer is not None and 0 <= index < len(layer.count_at):
            layer.count_at[index] = self._decay(layer.count_at[index], layer.tick_at[index]) + uses
            layer.tick_at[index] = self._now
        else:
            self._counts[key] = (self._decayed(key) + uses, self._now)

    def _decayed(self, key: ObjectKey) -> float:
        """An untracked key's count, decayed to the latest tick."""
        count, tick = self._counts.get(key, (0.0, self._now))
        return self._decay(count, tick)

    def _decay(self, count: float, tick: int) -> float:
        """``count`` stored as of ``tick``, decayed to the latest tick."""
        if self.half_life_ticks is None or tick == self._now:
            return count
        return count * math.exp2(-(self._now - tick) / self.half_life_ticks)

    def _decayed_layer(self, layer: _TrackedLayer) -> np.ndarray:
        """``_decay`` of a tracked layer's every count, as a new array (exp2 of an age of 0 is exactly 1). numpy's
        exp2 may differ from ``math.exp2`` in the last bit, so ``count`` of a tracked key reads this array too."""
        if self.half_life_ticks is None:
            return layer.counts.copy()
        decayed = np.exp2((layer.ticks - self._now) / self.half_life_ticks)
        decayed *= layer.counts
        return decayed


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
                layer = self._layers.get(_table_layer(key))
                if layer is not None and 0 <= key.index < layer.size:
                    layer[key.index] = score
                else:
                    self._scores[key] = score

    def publish(self, first: ObjectKey, scores: np.ndarray) -> np.ndarray:
        """Set the scores of every object of ``first``'s table layer: ``scores[i]`` for index ``i``; returns them
        as the float64 copy kept here (read-only to the caller)."""
        values = np.array(scores, dtype=np.float64).reshape(-1)
        layer = _table_layer(first)
        with self._lock:
            self._layers[layer] = values
            for key in [k for k in self._scores if _table_layer(k) == layer and 0 <= k.index < values.size]:
                del self._scores[key]
        return values

    def forget(self, first: ObjectKey) -> None:
        """Drop every score of ``first``'s table layer: its objects are unpredicted again (score 0.0)."""
        layer = _table_layer(first)
        with self._lock:
            self._layers.pop(layer, None)
            for key in [k for k in self._scores if _table_layer(k) == layer]:
                del self._scores[key]

    def layer(self, first: ObjectKey) -> np.ndarray | None:
        """The published scores of ``first``'s table layer (read-only view), or None if none was published."""
        values = self._layers.get(_table_layer(first))
        if values is None:
            return None
        view = values.view()
        view.flags.writeable = False
        return view

    def score(self, key: ObjectKey) -> float:
        """The latest score of ``key``; 0.0 when it was never predicted. Lock-free: one dict lookup is atomic,
        and eviction orders read this once per resident object per layer."""
        layer = self._layers.get(_table_layer(key))
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
