"""Compare two sets of bench cells point by point; a point more than 5% worse is a regression.

"Worse" follows the metric: lower GB/s, or higher ns. Points are matched by their key (suite and
params), so cells measured with other sizes, tiers or engines are simply unmatched, never compared.
Pure functions: nothing is read or printed here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tiermem.bench.results import Cell

REGRESSION_THRESHOLD = 0.05


@dataclass(frozen=True)
class Change:
    """One point measured in both runs."""

    old: Cell
    new: Cell

    @property
    def change(self) -> float:
        """Relative change of the median, signed so that negative is worse (-0.1: 10% worse)."""
        delta = (self.new.median - self.old.median) / self.old.median
        return delta if self.new.metric.higher_is_better else -delta

    def regression(self, threshold: float = REGRESSION_THRESHOLD) -> bool:
        return self.change < -threshold

    def improvement(self, threshold: float = REGRESSION_THRESHOLD) -> bool:
        return self.change > threshold


@dataclass(frozen=True)
class Comparison:
    changes: tuple[Change, ...]
    only_old: tuple[Cell, ...]
    only_new: tuple[Cell, ...]
    threshold: float = REGRESSION_THRESHOLD

    @property
    def regressions(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.regression(self.threshold))


def compare(old: Iterable[Cell], new: Iterable[Cell], threshold: float = REGRESSION_THRESHOLD) -> Comparison:
    """Match cells by key; when a key repeats in one run, its last cell counts."""
    old_by_key = {c.key: c for c in old}
    new_by_key = {c.key: c for c in new}
    changes = tuple(Change(old_by_key[k], cell) for k, cell in new_by_key.items()
                    if k in old_by_key and old_by_key[k].median > 0)
    return Comparison(
        changes=changes,
        only_old=tuple(c for k, c in old_by_key.items() if k not in new_by_key),
        only_new=tuple(c for k, c in new_by_key.items() if k not in old_by_key),
        threshold=threshold,
    )
