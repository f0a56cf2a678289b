"""How many prefetched objects may be queued before the next demand: a host-clock model of the link's queue.

A decode layer runs: routing reaches the host (one sync), its misses are copied (demand, on the
critical path), the prefetch of the next layers is queued behind them, the host launches compute;
then the next layer's routing arrives and its misses need the link. A prefetch byte still moving
then delays that demand (copies share the link). The link time free for prefetch, between the end
of the copies already queued and the next demand, is ``free = fill x max(0, lead - backlog)``:
``backlog`` is the time the link still needs for every byte queued so far (a virtual clock advanced
by ``bytes / bandwidth`` per submit), and ``lead``, the time until the next demand, is predicted as
``max(host, backlog) + tail``. ``host`` is the measured host work from a prefetch decision to the
next demand, without the wait for the next routing; ``tail`` the part of that wait the backlog does
not explain (compute, the routing's own copy: link time that is idle). Both are exponential
averages. So in a host-bound step the window is the host's work plus the tail, and in a link-bound
one (Mixtral's 352 MB experts) only the tail: an average lead that kept whole waits for queued
copies would lend one layer's long wait to the next layer with nothing queued.

Objects are admitted in score order by their expected effect on the next demand. Object ``i`` (of
link time ``t``) would still be moving for ``spill_i = max(0, i t - free) - max(0, (i-1) t - free)``
after the demand arrives. If it was predicted right, it moves bytes that demand needs anyway and
saves ``t - spill_i`` of it; if wrong, its spill delays the demand; and the object it evicts must be
loaded again (``t``) if that demand wants it. With ``p`` the chance it is right and ``q`` the chance
its victim is wanted, the prefetch pays when ``p (t - spill_i) - (1 - p) spill_i - q t > 0``, i.e.
``spill_i < (p - q) t``: objects that fit in the free time pass when ``p > q``, and an object that
overhangs the window passes when it is likely enough (no cliff at a whole object's size).

A prefetched object also costs host time to plan and submit (``h``, measured per object issued), and
where the host, not the link, paces the layer, that time delays the next demand as surely as a spill.
It is free only while the host would otherwise wait for the next routing: ``slack = lead - host``
(this layer's backlog beyond the host's work, plus the tail). Object ``i`` costs
``busy_i = max(0, i h - slack) - max(0, (i-1) h - slack)`` of host time, and passes when
``spill_i + busy_i < (p - q) t``: a layer whose misses keep the link busy prefetches on host time that
is free, a layer that hit everything (the GPU soon waits for the host) only what pays for its host
time. The prefetch's own host time is kept out of ``host``: counting it would grow the window with
every object admitted (a slow host would then prefetch ever more).

The prediction itself is host time too, paid once per decision that admits anything (``f``, measured per
prediction): admission is decided before predicting, and a decision that admits nothing skips the
prediction. So ``k`` objects cost ``H(k) = f + k h`` (``H(0) = 0``) of host time, of which
``busy(k) = max(0, H(k) - slack)`` delays the demand, and the window admits the ``k`` that maximises
``k (p - q) t - spill(k) - busy(k)`` (``spill(k) = max(0, k t - free)``), the smallest such ``k`` on a tie:
with ``f = 0`` that is the per-object rule above; with ``f > 0`` a host-bound layer admits nothing unless
its objects together pay for the prediction.

Invariants: nothing is admitted until one host time has been measured (no blind prefetch); the free time
never goes negative; bytes already queued (demand or prefetch, of this layer or earlier ones) count
against it; admitted objects are a prefix of the candidates in score order (the window picks a count).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from tiermem.types import ObjectKey


@dataclass
class LinkWindow:
    """Measured host time and GPU tail to the next demand, the link's queued backlog, and the bytes that fit."""

    bandwidth_gbps: float
    fill: float  # share of the free link time prefetch may fill (headroom for the measurement's noise)
    smoothing: float = 0.2  # weight of the newest measurement in the averages
    host_s: float | None = None  # average host work from a prefetch decision to the next demand, the prefetch's
    # own planning and submits excepted; None until measured
    tail_s: float = 0.0  # average wait for the next routing that the backlog at the decision does not explain
    object_host_s: float = 0.0  # average host time to plan and submit one prefetched object
    predict_s: float = 0.0  # average host time of one prediction (``predicted``); 0 until one is measured
    _busy_until_s: float = 0.0  # when the link will have moved every byte queued so far
    _decided_s: float | None = None  # host time of the last prefetch decision, until the next demand measures it
    _decided_backlog_s: float = 0.0  # the link's backlog at that decision
    _prefetch_s: float = 0.0  # host time the last decision's own prefetch took (``prefetched``)
    _predicted_s: float = 0.0  # host time of the prediction made since the last decision (not per object)

    def layer_started(self, now_s: float | None = None, routing_wait_s: float = 0.0) -> None:
        """A layer's routing is known and its demand comes now, after the host waited ``routing_wait_s`` for that
        routing: measure the last prefetch decision's host work and unexplained tail."""
        now_s = time.perf_counter() if now_s is None else now_s
        if self._decided_s is not None:
            host_s = max(0.0, now_s - self._decided_s - routing_wait_s - self._prefetch_s)
            tail_s = max(0.0, routing_wait_s - max(0.0, self._decided_backlog_s - host_s))
            previous = host_s if self.host_s is None else self.host_s
            self.host_s = (1 - self.smoothing) * previous + self.smoothing * host_s
            self.tail_s = (1 - self.smoothing) * self.tail_s + self.smoothing * tail_s
            self._decided_s = None

    def prefetched(self, count: int, now_s: float | None = None) -> None:
        """The last decision's prefetch is planned and ``count`` objects are submitted: its host time is the
        prefetch's own (kept out of ``host_s``), and per object it measures ``object_host_s``."""
        now_s = time.perf_counter() if now_s is None else now_s
        if self._decided_s is None:
            return
        self._prefetch_s = max(0.0, now_s - self._decided_s)
        if count > 0:
            per_object_s = max(0.0, self._prefetch_s - self._predicted_s) / count
            self.object_host_s = (1 - self.smoothing) * self.object_host_s + self.smoothing * per_object_s

    def predicted(self, seconds: float) -> None:
        """The last decision admitted objects and predicting them took ``seconds`` of host time (``predict_s``)."""
        self._predicted_s = seconds
        self.predict_s = seconds if self.predict_s == 0.0 else (1 - self.smoothing) * self.predict_s + \
            self.smoothing * seconds

    def queued(self, nbytes: int, now_s: float | None = None) -> None:
        """``nbytes`` of copies were submitted (demand or prefetch): they occupy the link after the backlog."""
        now_s = time.perf_counter() if now_s is None else now_s
        self._busy_until_s = max(now_s, self._busy_until_s) + nbytes / (self.bandwidth_gbps * 1e9)

    def admitted(self, object_bytes: int, max_objects: int, precision: float, regret: float = 0.0,
                 now_s: float | None = None) -> int:
        """How many of the best ``max_objects`` candidates of ``object_bytes`` each may be queued now, when
        a prefetched object is used with probability ``precision`` and the object it evicts is needed
        again with probability ``regret``; marks a prefetch decision."""
        now_s = time.perf_counter() if now_s is None else now_s
        backlog_s = max(0.0, self._busy_until_s - now_s)
        self._decided_s, self._decided_backlog_s, self._prefetch_s, self._predicted_s = now_s, backlog_s, 0.0, 0.0
        if self.host_s is None:
            return 0
        lead_s = max(self.host_s, backlog_s) + self.tail_s
        free_s = self.fill * max(0.0, lead_s - backlog_s)
        object_s = object_bytes / (self.bandwidth_gbps * 1e9)
        pays_s = (precision - regret) * object_s  # expected link time saved per object, before any spill
        slack_s = lead_s - self.host_s  # host time that is free: the host would wait for routing anyway
        best, best_gain_s = 0, 0.0
        for count in range(1, max_objects + 1) if pays_s > 0.0 else ():
            host_s = self.predict_s + count * self.object_host_s
            gain_s = count * pays_s - max(0.0, count * object_s - free_s) - max(0.0, host_s - slack_s)
            if gain_s > best_gain_s:
                best, best_gain_s = count, gain_s
        return best


class NextDemandShare:
    """The share of noted objects that the next demand of their layer wants: a running average from a prior.

    ``expect(key)`` notes an object (one prefetched, or one a prefetch evicted); ``resolve(layer, wanted)``
    scores every object noted for ``layer`` against the keys that layer's demand wanted and forgets them.
    """

    def __init__(self, prior: float, smoothing: float = 1 / 32) -> None:
        self.value = prior
        self.smoothing = smoothing  # weight of each scored object
        self._pending: dict[int, list[ObjectKey]] = {}  # layer -> objects noted since its last demand

    def expect(self, key: ObjectKey) -> None:
        self._pending.setdefault(key.layer, []).append(key)

    def resolve(self, layer: int, wanted: Collection[ObjectKey]) -> None:
        noted = self._pending.pop(layer, None)
        if noted:  # nothing noted (no prefetch ran): no set to build on the demand path
            wanted = set(wanted)
            for key in noted:
                self.value += self.smoothing * ((key in wanted) - self.value)
