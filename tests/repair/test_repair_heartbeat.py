"""Heartbeats, the failure detector and the store-based agreement on a new membership."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tiermem.errors import RepairError
from tiermem.repair.heartbeat import FailureDetector, Heartbeat, agree_on_failures

INTERVAL_S = 0.01
TIMEOUT_S = 0.2


def test_a_rank_whose_heartbeat_stops_is_suspected_after_the_timeout_and_not_before():
    store = dist.HashStore()
    beats = [Heartbeat(store, rank, interval_s=INTERVAL_S) for rank in range(3)]
    detector = FailureDetector(store, range(3), timeout_s=TIMEOUT_S)
    try:
        beats[1].close()
        stopped = time.monotonic()
        suspected = detector.poll()
        while not suspected and time.monotonic() - stopped < 20 * TIMEOUT_S:
            time.sleep(INTERVAL_S)
            suspected = detector.poll()
        assert suspected == {1}
        assert time.monotonic() - stopped >= TIMEOUT_S
    finally:
        for beat in beats:
            beat.close()


def test_ranks_no_longer_watched_are_never_suspected():
    store = dist.HashStore()
    detector = FailureDetector(store, range(2), timeout_s=TIMEOUT_S)  # neither rank beats
    detector.watch({0})
    time.sleep(1.5 * TIMEOUT_S)
    assert detector.poll() == {0}


def test_every_survivor_adopts_the_first_proposal_for_the_next_epoch():
    store = dist.HashStore()
    assert agree_on_failures(store, 4, {2}) == {2}
    assert agree_on_failures(store, 4, {2, 3}) == {2}  # a later, larger suspicion waits for epoch 6
    assert agree_on_failures(store, 5, {3}) == {3}


def test_agreeing_on_nothing_is_refused():
    with pytest.raises(RepairError, match="nothing to agree on at epoch 0"):
        agree_on_failures(dist.HashStore(), 0, set())
