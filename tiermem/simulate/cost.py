"""The simulator's cost model: one host-to-HBM link shared by demand and prefetch copies, one compute stream.

Per traced layer of a decode step, in this order::

    t0 = end of the previous layer's compute (the router of this layer has run)
    prefetches aimed at this layer are settled (below); demand copies of the misses start at once
    ready = max(t0, landing of every expert this layer needs)        stall += ready - t0
    end   = ready + compute_fixed_us + compute_per_expert_us * (distinct experts used)

Demand copies have priority: they occupy the link back to back from t0. Prefetch copies only use
the link while no demand copy runs (a prefetcher that submits chunks only when the demand queue is
empty), oldest first, and may be interrupted. When its layer is routed, a prefetch is settled:

| prefetch state at routing | needed by the layer          | not needed             |
|---------------------------|------------------------------|------------------------|
| landed                    | hit, no wait                 | stays resident         |
| partly copied             | hit: rest copied on demand   | cancelled, bytes spent |
| not started               | cancelled: a demand miss     | cancelled, nothing moved |

A cancelled prefetch that never started leaves the object it was to displace intact, so the cache
keeps it (the victim is only lost once the copy overwrites its slot).

A copy occupies the link for ``bytes / bandwidth`` and lands ``latency`` later (latency overlaps the
next copy). Bytes moved are link-busy time times bandwidth, so partial, cancelled copies count.

The host (``HostCost``, zero by default: a host that keeps ahead of the GPU) is a third clock. It
reads a layer's routing once the GPU has produced it and it is done with the previous layer, spends
``layer_us + miss_us x misses`` planning and submitting before that layer's demand copies and compute
can start, then ``prefetch_layer_us + prefetch_object_us x loads`` deciding and submitting the next
layers' prefetch while the GPU computes; a prefetch copy moves only after its submit. A Python pager
at batch 1 is bound by this clock (``bench/results/h100/host-diet/``), which the link and compute
clocks alone cannot show.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tiermem.errors import ConfigError
from tiermem.types import LinkProfile, ObjectKey


@dataclass(frozen=True)
class HostCost:
    """Host time of the pager per traced layer (see the module docstring); all zero: a host never behind."""

    layer_us: float = 0.0  # reading the routing, bookkeeping, launching compute
    miss_us: float = 0.0  # planning and submitting one demand copy
    prefetch_layer_us: float = 0.0  # predicting and planning the prefetch after a layer
    prefetch_object_us: float = 0.0  # submitting one prefetch copy

    def __post_init__(self) -> None:
        if min(self.layer_us, self.miss_us, self.prefetch_layer_us, self.prefetch_object_us) < 0:
            raise ConfigError(f"simulate cost model: host times must be >= 0, got {self}")


@dataclass(frozen=True)
class CostModel:
    """What one step costs: the host-to-HBM link, the expert size, the compute time and the host time per layer."""

    link: LinkProfile
    expert_bytes: int
    compute_fixed_us: float  # per traced layer per step: router, attention and dense parts
    compute_per_expert_us: float  # per distinct expert a layer computes in a step
    host: HostCost = HostCost()

    def __post_init__(self) -> None:
        if self.link.bandwidth_gbps <= 0 or self.link.latency_us < 0:
            raise ConfigError(f"simulate cost model: the link needs bandwidth > 0 and latency >= 0, got {self.link}")
        if self.expert_bytes <= 0 or self.compute_fixed_us < 0 or self.compute_per_expert_us < 0:
            raise ConfigError(
                f"simulate cost model: expert_bytes must be > 0 and compute times >= 0, got {self.expert_bytes}, "
                f"{self.compute_fixed_us} us, {self.compute_per_expert_us} us"
            )

    @property
    def copy_s(self) -> float:
        """Seconds one expert occupies the link."""
        return self.expert_bytes / (self.link.bandwidth_gbps * 1e9)

    def compute_s(self, experts: int) -> float:
        return (self.compute_fixed_us + self.compute_per_expert_us * experts) * 1e-6


@dataclass(frozen=True)
class Timing:
    """Modelled time of a replay."""

    elapsed_s: float
    stall_s: float
    compute_s: float
    link_busy_s: float
    bytes_moved: int
    steps: int
    tokens: int

    @property
    def step_time_s(self) -> float:
        return self.elapsed_s / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def link_utilisation(self) -> float:
        return self.link_busy_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


def sum_timings(timings: list[Timing]) -> Timing:
    """The timing of replays run one after another."""
    return Timing(**{f.name: sum(getattr(t, f.name) for t in timings) for f in dataclasses.fields(Timing)})


class Timeline:
    """Mutable clocks of one replay: the compute stream, the link, the host, and the prefetches not yet landed."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.now_s = 0.0
        self.link_free_s = 0.0  # end of the last link work (demand copies and prefetch progress)
        self.host_free_s = 0.0  # end of the host's work on the last layer (its prefetch submitted)
        self.issue_s = 0.0  # when the host submitted the current layer's demand copies and launched its compute
        self.stall_s = 0.0
        self.compute_s = 0.0
        self.link_busy_s = 0.0
        self._pending: dict[ObjectKey, float] = {}  # prefetch -> link seconds still to copy, oldest first
        self._submitted: dict[ObjectKey, float] = {}  # prefetch -> when the host submitted it
        self._landed: dict[ObjectKey, float] = {}  # prefetch -> landing time

    @property
    def latency_s(self) -> float:
        return self.cost.link.latency_us * 1e-6

    def begin_layer(self, misses: int) -> None:
        """The host reads this layer's routing (once the GPU produced it and the host is free) and plans and
        submits its ``misses``: demand copies and compute start no earlier."""
        host = self.cost.host
        self.issue_s = max(self.now_s, self.host_free_s) + (host.layer_us + host.miss_us * misses) * 1e-6
        self.host_free_s = self.issue_s

    def demand_copy(self) -> float:
        """Copy one expert at demand priority from now (or its submit); returns when it lands."""
        return self._occupy(self.cost.copy_s)

    def prefetch(self, keys: list[ObjectKey]) -> None:
        """The host decides the next layers' prefetch and submits ``keys``; each copy progresses only in idle
        link time after its submit."""
        host = self.cost.host
        self.host_free_s = max(self.host_free_s, self.issue_s) + (
            host.prefetch_layer_us + host.prefetch_object_us * len(keys)) * 1e-6
        for key in keys:
            self._pending[key] = self.cost.copy_s
            self._submitted[key] = self.host_free_s

    def use_idle_link(self) -> None:
        """Give the link time left idle before now to the pending prefetches, oldest first."""
        start = self.link_free_s
        for key in list(self._pending):
            start = max(start, self._submitted.get(key, 0.0))
            if start >= self.now_s:
                break
            step = min(self._pending[key], self.now_s - start)
            start += step
            self.link_busy_s += step
            self._pending[key] -= step
            if self._pending[key] <= 0.0:
                del self._pending[key]
                self._submitted.pop(key, None)
                self._landed[key] = start + self.latency_s
        self.link_free_s = max(self.link_free_s, min(start, self.now_s))

    def copy_started(self, key: ObjectKey) -> bool:
        """Whether any byte of the prefetch of ``key`` has moved (keys never queued count as started)."""
        return self._pending.get(key, 0.0) < self.cost.copy_s

    def settle(self, key: ObjectKey, needed: bool) -> float | None:
        """Decide a prefetch when its layer is routed: its landing time, or None when it is cancelled.

        Keys this timeline never saw were loaded before timing began and count as landed at once.
        """
        if key in self._landed:
            return self._landed.pop(key)
        remaining = self._pending.pop(key, None)
        self._submitted.pop(key, None)
        if remaining is None:
            return 0.0
        if not needed or remaining >= self.cost.copy_s:
            return None
        return self._occupy(remaining)

    def _occupy(self, seconds: float) -> float:
        start = max(self.now_s, self.issue_s, self.link_free_s)
        self.link_free_s = start + seconds
        self.link_busy_s += seconds
        return self.link_free_s + self.latency_s

    def run_layer(self, ready_s: float, experts: int) -> None:
        """Start the layer when the host launched it and its experts are in (``ready_s``: the wait for them is the
        stall), then compute ``experts``."""
        launched = max(self.now_s, self.issue_s)
        start = max(launched, ready_s)
        self.stall_s += start - launched
        compute = self.cost.compute_s(experts)
        self.compute_s += compute
        self.now_s = start + compute

    def timing(self, steps: int, tokens: int) -> Timing:
        return Timing(
            elapsed_s=self.now_s, stall_s=self.stall_s, compute_s=self.compute_s, link_busy_s=self.link_busy_s,
            bytes_moved=round(self.link_busy_s * self.cost.link.bandwidth_gbps * 1e9), steps=steps, tokens=tokens,
        )
