"""Residency: what is where in HBM. Bookkeeping only; no policy decisions in the directory, no I/O anywhere.

- ``directory``: which object holds which slot, which loads are in flight, what is pinned (``Directory``).
- ``slots``: fixed pools of equal slots, per layer or shared, sized from a byte budget (``SlotPool``).
- ``signals``: what policies read: activation counts, predicted scores, the future (simulation only).
- ``policies``: eviction policies with one method, ``priority(entry)``; registry ``EVICTION_POLICIES``.

A new eviction policy goes in ``policies.py`` (or its own module registered there); a new signal a
policy reads goes in ``signals.py``. Planning (which object to load or evict) lives in
``tiermem.prefetch.planner``; moving bytes lives in ``tiermem.transfer``.
"""

from tiermem.residency.directory import Directory, DirectorySnapshot
from tiermem.residency.policies import (
    EVICTION_POLICIES,
    BeladyPolicy,
    CacheEntry,
    EvictionPolicy,
    LfuPolicy,
    LruPolicy,
    PolicySignals,
    PredictedPolicy,
    eviction_order,
    make_policy,
)
from tiermem.residency.signals import ActivationCounts, FutureUses, PredictionScores
from tiermem.residency.slots import SlotLayout, SlotPool, slots_for_budget, slots_for_fraction

__all__ = [
    "EVICTION_POLICIES", "ActivationCounts", "BeladyPolicy", "CacheEntry", "Directory", "DirectorySnapshot",
    "EvictionPolicy", "FutureUses", "LfuPolicy", "LruPolicy", "PolicySignals", "PredictedPolicy",
    "PredictionScores", "SlotLayout", "SlotPool", "eviction_order", "make_policy", "slots_for_budget",
    "slots_for_fraction",
]
