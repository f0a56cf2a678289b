"""Membership: health transitions, one epoch step per change, compare-and-set, thread safety."""

from __future__ import annotations

import threading

import pytest

from tiermem.errors import RepairError
from tiermem.repair.membership import Health, Membership

WORLD_SIZE = 4


def test_a_new_membership_has_every_rank_alive_at_epoch_zero():
    view = Membership(WORLD_SIZE).view()
    assert view.epoch == 0 and view.live_ranks == frozenset(range(WORLD_SIZE))
    assert view.health == (Health.ALIVE,) * WORLD_SIZE


def test_fail_rejoin_alive_each_bump_the_epoch_by_one():
    membership = Membership(WORLD_SIZE)
    assert membership.mark_failed(2) == 1
    assert membership.view().live_ranks == {0, 1, 3}
    assert membership.begin_rejoin(2) == 2
    assert membership.health(2) is Health.REJOINING and 2 not in membership.view().live_ranks
    assert membership.mark_alive(2) == 3
    assert membership.view().live_ranks == frozenset(range(WORLD_SIZE))


def test_failing_a_failed_rank_names_the_rank_and_the_epoch():
    membership = Membership(WORLD_SIZE)
    membership.mark_failed(1)
    with pytest.raises(RepairError, match=r"rank 1 is failed at epoch 1; it cannot become failed"):
        membership.mark_failed(1)
    assert membership.epoch == 1


@pytest.mark.parametrize("steps, bad", [
    ((), "begin_rejoin"),  # alive -> rejoining
    ((), "mark_alive"),  # alive -> alive
    (("mark_failed",), "mark_alive"),  # failed -> alive skips rejoining
])
def test_transitions_outside_the_table_are_refused_without_an_epoch_step(steps, bad):
    membership = Membership(WORLD_SIZE)
    for step in steps:
        getattr(membership, step)(0)
    epoch = membership.epoch
    with pytest.raises(RepairError, match="rank 0 is"):
        getattr(membership, bad)(0)
    assert membership.epoch == epoch


def test_a_rank_that_dies_while_rejoining_can_fail_again():
    membership = Membership(WORLD_SIZE)
    membership.mark_failed(3)
    membership.begin_rejoin(3)
    assert membership.mark_failed(3) == 3 and membership.health(3) is Health.FAILED


def test_a_change_against_a_stale_epoch_is_refused():
    membership = Membership(WORLD_SIZE)
    seen = membership.epoch
    membership.mark_failed(0)
    with pytest.raises(RepairError, match="expected epoch 0 but the membership is at epoch 1"):
        membership.mark_failed(1, expected_epoch=seen)
    assert membership.mark_failed(1, expected_epoch=1) == 2


def test_failing_several_ranks_at_once_is_one_epoch_step_and_all_or_nothing():
    membership = Membership(WORLD_SIZE)
    assert membership.mark_failed_many({1, 2}) == 1
    assert membership.view().live_ranks == {0, 3}
    with pytest.raises(RepairError, match="rank 2 is failed"):
        membership.mark_failed_many({0, 2})
    assert membership.health(0) is Health.ALIVE and membership.epoch == 1


def test_unknown_ranks_are_refused():
    with pytest.raises(RepairError, match="rank 7 does not exist at epoch 0"):
        Membership(WORLD_SIZE).mark_failed(7)


def test_racing_threads_fail_a_rank_exactly_once():
    membership = Membership(WORLD_SIZE)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def fail_rank_one():
        barrier.wait()
        try:
            membership.mark_failed(1)
            outcomes.append("won")
        except RepairError:
            outcomes.append("refused")

    threads = [threading.Thread(target=fail_rank_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    assert membership.epoch == 1
