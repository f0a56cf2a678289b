"""The measurement method: calibrated trials, rotation, the standard-vs-quick rule, and checksums."""

from __future__ import annotations

import time

import pytest
import torch

from tiermem.bench import suites
from tiermem.bench.copy import CopySweep, Direction, Engine, TorchCopies
from tiermem.bench.memory import fill_pattern, parse_memory, verify_equal
from tiermem.bench.method import Clock, Method, measure
from tiermem.errors import ConfigError, TransferError

OP_S = 0.002


class SleepOps:
    """A workload whose every operation takes ``OP_S`` and records the slot it used."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.used: list[int] = []

    def begin(self) -> None:
        pass

    def run(self, iteration: int) -> None:
        self.used.append(iteration % self.slots)
        time.sleep(OP_S)

    def fence(self) -> None:
        pass


def test_each_trial_lasts_at_least_min_trial_s_and_reports_seconds_per_op():
    method = Method(trials=3, min_trial_s=0.02, warmup=1, quick=True)
    timing = measure(SleepOps(slots=1), method, Clock.PERF_COUNTER)
    assert len(timing.seconds_per_op) == 3
    assert all(s * timing.iterations >= method.min_trial_s for s in timing.seconds_per_op)
    assert all(s >= OP_S for s in timing.seconds_per_op)


def test_operations_rotate_over_every_slot():
    ops = SleepOps(slots=3)
    measure(ops, Method(trials=3, min_trial_s=0.01, warmup=1, quick=True), Clock.PERF_COUNTER)
    assert set(ops.used) == {0, 1, 2}


@pytest.mark.parametrize("trials, min_trial_s", [(2, 0.1), (3, 0.05)])
def test_less_than_the_standard_method_needs_quick(trials, min_trial_s):
    with pytest.raises(ConfigError, match="--quick"):
        Method(trials=trials, min_trial_s=min_trial_s)
    assert Method(trials=trials, min_trial_s=min_trial_s, quick=True).quick


def test_a_copy_that_corrupts_one_byte_is_an_error_not_a_number(session, monkeypatch):
    def corrupting_run(self, iteration):
        src, dst = self.lanes[0][iteration % len(self.lanes[0])]
        dst.copy_(src)
        dst[17] ^= 0xFF

    monkeypatch.setattr(TorchCopies, "run", corrupting_run)
    sweep = CopySweep(directions=(Direction.H2H,), memories=(parse_memory("dram"),),
                      peers=(parse_memory("cxl"),), sizes=(4096,), engines=(Engine.TORCH,))
    with pytest.raises(TransferError, match="differs from its source at byte 17"):
        suites.run_copy(session, sweep)


def test_a_copy_of_the_wrong_slot_is_caught_because_slots_differ():
    pool = torch.empty(2 * 4096, dtype=torch.uint8)
    fill_pattern(pool, seed=1)
    first, second = pool[:4096], pool[4096:]
    with pytest.raises(TransferError, match="slot 0 differs"):
        verify_equal([(first, second.clone())], "wrong slot")


def test_a_copy_that_writes_nothing_is_caught_after_poisoning(session):
    src = torch.empty(4096, dtype=torch.uint8)
    fill_pattern(src, seed=3)
    with pytest.raises(TransferError):
        verify_equal([(src, torch.full_like(src, 0xA5))], "no-op copy")
