"""Eviction policies: one method, ``priority(entry) -> float``; the lowest priority is evicted first.

Registered in ``EVICTION_POLICIES`` with one factory signature, ``factory(config, signals) -> policy``:

| name        | priority                                   | reads                                  |
|-------------|--------------------------------------------|----------------------------------------|
| ``lru``     | last use tick                              | the entry                              |
| ``lfu``     | activation count (optionally decayed)      | ``ActivationCounts`` (MoE-Infinity)    |
| ``predicted``| latest predicted score of the object      | ``PredictionScores`` (the prefetcher)  |
| ``belady``  | minus the tick of the next use             | ``FutureUses`` — simulation only       |

``belady`` evicts the object needed furthest in the future. It needs the whole future, so it exists
only as the upper bound a simulator measures other policies against; no live cache can run it.

Ties are broken by ``eviction_order``: least recently used first, then by key, so every ordering is
deterministic. Pinned and in-flight objects are never offered to a policy (the caller filters them).

Extension: write a class with ``priority(entry)``, a frozen config, and a factory
``(config, PolicySignals) -> EvictionPolicy``; register it in ``EVICTION_POLICIES``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tiermem.config import from_dict
from tiermem.errors import ConfigError
from tiermem.registry import Registry
from tiermem.residency.signals import ActivationCounts, FutureUses, PredictionScores
from tiermem.types import ObjectKey


@dataclass(slots=True)
class CacheEntry:
    """What a cache knows about one resident object; mutated only by the cache that owns it."""

    key: ObjectKey
    slot: int
    loaded_tick: int
    last_use_tick: int
    use_count: int = 0  # uses since this load (an eviction forgets it; ActivationCounts does not)

    def touch(self, tick: int) -> None:
        self.last_use_tick = max(self.last_use_tick, tick)
        self.use_count += 1


@runtime_checkable
class EvictionPolicy(Protocol):
    """Ranks resident, unpinned objects for eviction."""

    def priority(self, entry: CacheEntry) -> float:
        """Lower means evicted sooner."""
        ...


@dataclass(frozen=True)
class PolicySignals:
    """The signals a policy may need; each factory takes the ones it reads and raises if one is missing."""

    counts: ActivationCounts | None = None
    predictions: PredictionScores | None = None
    future: FutureUses | None = None


class LruPolicy:
    """Least recently used first (SGLang paged experts, mixtral-offloading)."""

    def priority(self, entry: CacheEntry) -> float:
        return float(entry.last_use_tick)


class LfuPolicy:
    """Least frequently activated first, counting activations across evictions (MoE-Infinity)."""

    def __init__(self, counts: ActivationCounts) -> None:
        self.counts = counts

    def priority(self, entry: CacheEntry) -> float:
        return self.counts.count(entry.key)


class PredictedPolicy:
    """Lowest predicted score first: keep what the predictor expects the coming layers/steps to need."""

    def __init__(self, predictions: PredictionScores) -> None:
        self.predictions = predictions

    def priority(self, entry: CacheEntry) -> float:
        return self.predictions.score(entry.key)


class BeladyPolicy:
    """Furthest next use first (Belady's MIN). Needs the future: simulation only, an upper bound."""

    def __init__(self, future: FutureUses) -> None:
        self.future = future

    def priority(self, entry: CacheEntry) -> float:
        return -self.future.next_use(entry.key)


@dataclass(frozen=True)
class NoOptions:
    """This policy takes no options."""


PolicyFactory = Callable[[Any, PolicySignals], EvictionPolicy]
EVICTION_POLICIES: Registry[PolicyFactory] = Registry("eviction policy")


def _need(signal: Any, name: str, policy: str, producer: str) -> Any:
    if signal is None:
        raise ConfigError(
            f"residency: eviction policy {policy!r} reads {name}, which this cache does not provide; "
            f"{producer}, or choose 'lru'"
        )
    return signal


EVICTION_POLICIES.register("lru", NoOptions, lambda config, signals: LruPolicy())
EVICTION_POLICIES.register(
    "lfu", NoOptions,
    lambda config, signals: LfuPolicy(_need(signals.counts, "activation counts", "lfu", "record activations")),
)
EVICTION_POLICIES.register(
    "predicted", NoOptions,
    lambda config, signals: PredictedPolicy(
        _need(signals.predictions, "predicted scores", "predicted", "give the cache a predictor")
    ),
)
EVICTION_POLICIES.register(
    "belady", NoOptions,
    lambda config, signals: BeladyPolicy(
        _need(signals.future, "the future uses", "belady", "it runs only in the simulator")
    ),
)


def make_policy(name: str, signals: PolicySignals, options: Mapping[str, Any] | None = None) -> EvictionPolicy:
    """Build the registered policy ``name`` from its options (unknown names and keys raise)."""
    entry = EVICTION_POLICIES.get(name)
    config = from_dict(entry.config_cls, options or {}, where=f"eviction policy {name!r}")
    return entry.factory(config, signals)


def priority_array(policy: EvictionPolicy, keys: Sequence[ObjectKey], first: Mapping[int, int],
                   last_use: np.ndarray) -> np.ndarray | None:
    """Every object's priority in one slot group as an array (``keys[i]`` at place ``i``; a layer's objects
    from place ``first[layer]``), where the policy's priority already is one: ``lru`` (the last use),
    ``predicted`` (the published scores of each layer, 0 where none were) and ``lfu`` (each layer's tracked
    activation counts). None for the others, and for ``lfu`` when a layer's counts are not tracked in full:
    their caller asks ``priority`` per entry. Equal, object for object, to what ``priority`` returns."""
    if type(policy) is LruPolicy:
        return last_use
    starts = sorted(first.values()) + [len(keys)]
    if type(policy) is PredictedPolicy:
        layers = [policy.predictions.layer(keys[start]) for start in starts[:-1]]
        if all(published is None for published in layers):  # nothing predicted: every priority 0, so recency
            return last_use  # alone orders them (the tie-break), exactly as the last use itself does
        return _by_layer(starts, layers)
    if type(policy) is LfuPolicy:
        layers = [policy.counts.layer_counts(keys[start]) for start in starts[:-1]]
        if any(counts is None or counts.size < end - start
               for (start, end), counts in zip(itertools.pairwise(starts), layers)):
            return None
        return _by_layer(starts, layers)
    return None


def _by_layer(starts: Sequence[int], layers: Sequence[np.ndarray | None]) -> np.ndarray:
    """One group's priority from each layer's array (``layers[i]`` for the places ``starts[i]`` up to
    ``starts[i + 1]``; 0 past a short array's end or where it is None); a single layer's array as it is."""
    if len(layers) == 1 and layers[0] is not None and layers[0].size == starts[1]:
        return layers[0]
    priority = np.zeros(starts[-1], np.float64)
    for (start, end), values in zip(itertools.pairwise(starts), layers):
        if values is not None:
            count = min(end - start, values.size)
            priority[start:start + count] = values[:count]
    return priority


def eviction_order(entries: Iterable[CacheEntry], policy: EvictionPolicy) -> list[ObjectKey]:
    """Keys sorted for eviction: lowest priority first, then least recently used, then by key."""
    priority = policy.priority
    return [key for _, _, key in sorted([(priority(e), e.last_use_tick, e.key) for e in entries])]
