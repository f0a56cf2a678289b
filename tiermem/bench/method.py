"""How every bench point is measured: warm-up, calibrated iterations, repeated trials, median/min/max.

Invariants:
- a point is ``trials`` timed runs of the same ``iterations`` operations, each lasting at least
  ``min_trial_s`` (unless ``max_iterations`` caps it): ``iterations`` is calibrated after the warm-up, and
  a trial that still comes out short raises it and restarts the trials;
- operation ``i`` of a trial uses rotation slot ``i % slots`` of its workload, so consecutive operations
  touch different buffers and caches do not flatter small sizes;
- GPU work is timed with CUDA events on the current stream (``Clock.CUDA_EVENTS``): the workload's
  ``begin`` makes its side streams wait for the start event and ``fence`` makes the current stream wait
  for everything it started, so the end event covers all of it. Host work is timed with
  ``time.perf_counter`` and ``fence`` blocks until the work is done;
- the standard method (>= 3 trials, >= 100 ms each) can only be shortened by saying ``quick=True``,
  and every result records which one it used.
"""

from __future__ import annotations

import enum
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from tiermem.config import option, require

STANDARD_TRIALS = 3
STANDARD_MIN_TRIAL_S = 0.1
_CALIBRATION_FRACTION = 0.25  # calibrate on a run of at least this share of min_trial_s
_RESTART_MARGIN = 1.1  # when a trial came out short, aim this much above min_trial_s


@dataclass(frozen=True)
class Method:
    """How long and how often each point is measured."""

    trials: int = option(5, help="Timed trials per point; the median is reported with the min and max.")
    min_trial_s: float = option(0.1, help="Each trial repeats the operation until it lasts at least this long (s).")
    warmup: int = option(2, help="Untimed operations before calibration (first-touch, kernel compiles, caches).")
    rotations: int = option(4, help="Buffer slots cycled through per point (fewer when memory is short).")
    max_iterations: int = option(200_000, help="Cap on operations per trial (very small, fast operations).")
    quick: bool = option(False, help="Allow fewer than 3 trials or trials shorter than 100 ms; results say so.")

    def __post_init__(self) -> None:
        require(self.trials >= 1, self, f"trials must be >= 1, got {self.trials}")
        require(self.min_trial_s > 0, self, f"min_trial_s must be > 0, got {self.min_trial_s}")
        require(self.warmup >= 1, self, f"warmup must be >= 1, got {self.warmup}")
        require(self.rotations >= 1, self, f"rotations must be >= 1, got {self.rotations}")
        require(self.max_iterations >= 1, self, f"max_iterations must be >= 1, got {self.max_iterations}")
        if not self.quick:
            require(self.trials >= STANDARD_TRIALS and self.min_trial_s >= STANDARD_MIN_TRIAL_S, self,
                    f"the standard method needs >= {STANDARD_TRIALS} trials of >= {STANDARD_MIN_TRIAL_S * 1e3:.0f} "
                    f"ms (got {self.trials} trials of {self.min_trial_s * 1e3:g} ms); pass --quick "
                    "(Method(quick=True)) to measure less, labelled as quick")


STANDARD = Method()
QUICK = Method(trials=3, min_trial_s=0.02, warmup=1, rotations=4, quick=True)


class Clock(str, enum.Enum):
    """What timed a point."""

    CUDA_EVENTS = "cuda-events"
    PERF_COUNTER = "perf-counter"


class Workload(Protocol):
    """One kind of operation, repeated by the timer.

    ``run(i)`` starts operation ``i`` (slot ``i % slots``); on the GPU clock it only enqueues work.
    """

    def begin(self) -> None:
        """Called right after the start of a timed run: side streams wait for the current stream."""

    def run(self, iteration: int) -> None:
        """Start one operation."""

    def fence(self) -> None:
        """GPU clock: make the current stream wait for all started work. Host clock: block until done."""


@dataclass(frozen=True)
class Timing:
    """Seconds per operation of each trial, and how they were taken."""

    seconds_per_op: tuple[float, ...]
    iterations: int
    clock: Clock

    def rates(self, units_per_op: float) -> tuple[float, ...]:
        """``units_per_op / seconds`` for each trial (e.g. bytes per op -> bytes/s)."""
        return tuple(units_per_op / s for s in self.seconds_per_op)


@dataclass(frozen=True)
class Summary:
    """Median, min and max of per-trial values (in the point's metric)."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: tuple[float, ...]) -> Summary:
        return cls(statistics.median(samples), min(samples), max(samples), samples)


def measure(workload: Workload, method: Method, clock: Clock) -> Timing:
    """Warm up, calibrate ``iterations`` to ``min_trial_s``, then time ``method.trials`` trials."""
    elapsed = _cuda_elapsed_s if clock is Clock.CUDA_EVENTS else _host_elapsed_s
    for i in range(method.warmup):
        elapsed(workload, 1, first=i)
    iterations = calibrate(lambda n: elapsed(workload, n), method)
    trials: list[float] = []
    while len(trials) < method.trials:
        seconds = elapsed(workload, iterations)
        if seconds < method.min_trial_s and iterations < method.max_iterations:
            # calibration guessed low (a noisy first run): every trial must last min_trial_s, so start over
            iterations = min(method.max_iterations,
                             math.ceil(iterations * method.min_trial_s / max(seconds, 1e-9) * _RESTART_MARGIN))
            trials.clear()
            continue
        trials.append(seconds / iterations)
    return Timing(tuple(trials), iterations, clock)


def calibrate(run_s: Callable[[int], float], method: Method) -> int:
    """Operations per trial so that a trial lasts ``>= min_trial_s`` (``run_s(n)`` times ``n`` ops)."""
    count = 1
    while True:
        seconds = run_s(count)
        if seconds >= method.min_trial_s * _CALIBRATION_FRACTION or count >= method.max_iterations:
            break
        count = min(count * 8, method.max_iterations)
    per_op = max(seconds / count, 1e-9)
    return max(1, min(method.max_iterations, math.ceil(method.min_trial_s / per_op)))


def _host_elapsed_s(workload: Workload, iterations: int, first: int = 0) -> float:
    start = time.perf_counter()
    workload.begin()
    for i in range(first, first + iterations):
        workload.run(i)
    workload.fence()
    return time.perf_counter() - start


def _cuda_elapsed_s(workload: Workload, iterations: int, first: int = 0) -> float:
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    workload.begin()
    for i in range(first, first + iterations):
        workload.run(i)
    workload.fence()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3
