"""Rich tables of bench cells: one grid per suite, a comparison table, and the acceptance checks.

Layout per suite (rows x columns, each entry the median with the min..max spread in percent):
| suite   | rows                 | columns                 |
|---------|----------------------|-------------------------|
| copy    | mode (the cell name) | object size             |
| gather  | table memory, method | row bytes               |
| latency | reader               | memory                  |
| matrix  | source               | destination             |
| other   | one row per cell (suites added later: moe, engram, ...)  |
Emulated memory is marked ``[emulated]`` in the row name; quick-method results say so in the title.
Names are shown as plain ``Text`` (never parsed as rich markup, which would eat ``[emulated]``).
Pure presentation: nothing is measured or read here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tiermem.bench.acceptance import Check
from tiermem.bench.compare import Comparison
from tiermem.bench.results import Cell, Metric
from tiermem.config import format_bytes

Axis = Callable[[Cell], Any]

_GRIDS: dict[str, tuple[str, Axis, str, Axis, Callable[[Any], str]]] = {
    "copy": ("mode", lambda c: c.name, "size", lambda c: c.params.get("bytes"), format_bytes),
    "gather": ("table, method", lambda c: f"{c.name} ({format_bytes(c.bytes)}/op)", "row bytes",
               lambda c: c.params.get("row_bytes"), str),
    "latency": ("reader", lambda c: c.name.split(" <- ")[0], "memory",
                lambda c: c.params.get("memory"), str),
    "matrix": ("src", lambda c: c.params.get("src"), "dst", lambda c: c.params.get("dst"), str),
}


def render_cells(cells: Sequence[Cell]) -> RenderableType:
    """One table per suite, in the order the suites first appear."""
    by_suite: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_suite[cell.suite].append(cell)
    tables = [_grid(suite, group) if suite in _GRIDS else _listing(suite, group) for suite, group in by_suite.items()]
    return Group(*tables) if tables else Text("no cells")


def render_comparison(comparison: Comparison) -> Table:
    table = Table(title=f"Compared with the old run: a point more than {comparison.threshold:.0%} worse is a "
                        "regression", title_justify="left")
    for column in ("suite", "mode", "point", "old", "new", "change"):
        table.add_column(column, justify="right" if column in ("old", "new", "change") else "left")
    table.add_column("", no_wrap=True, min_width=len("REGRESSION"))
    for change in sorted(comparison.changes, key=lambda c: c.change):
        new = change.new
        if change.regression(comparison.threshold):
            status = Text("REGRESSION", style="bold red")
        elif change.improvement(comparison.threshold):
            status = Text("better", style="green")
        else:
            status = Text("~", style="dim")
        table.add_row(new.suite, Text(new.name), Text(_point(new)), _value(change.old), _value(new),
                      f"{change.change:+.1%}",
                      status)
    table.caption = (f"{len(comparison.regressions)} regression(s) in {len(comparison.changes)} matched points; "
                     f"{len(comparison.only_new)} new only, {len(comparison.only_old)} old only")
    return table


def render_checks(checks: Iterable[Check]) -> Table:
    table = Table(title="Acceptance checks", title_justify="left")
    for column in ("check", "measured", "required", "result", "detail"):
        table.add_column(column)
    for check in checks:
        if check.passed is None:
            result = Text("not measured", style="yellow")
        else:
            result = Text("pass", style="green") if check.passed else Text("FAIL", style="bold red")
        measured = "-" if check.value is None else f"{check.value:.3g}"
        table.add_row(check.name, measured, Text(check.requirement), result, Text(check.detail))
    return table


def _grid(suite: str, cells: list[Cell]) -> Table:
    row_title, row_of, col_title, col_of, col_label = _GRIDS[suite]
    rows = list(dict.fromkeys(row_of(c) for c in cells))
    cols = sorted({col_of(c) for c in cells}, key=_sort_key)
    values = {(row_of(c), col_of(c)): c for c in cells}
    table = Table(title=Text(_title(suite, cells)), title_justify="left")
    table.add_column(Text(f"{row_title} \\ {col_title}"))
    for col in cols:
        table.add_column(Text(col_label(col) if col is not None else "-"), justify="right")
    for row in rows:
        table.add_row(Text(str(row)), *[_entry(values.get((row, col))) for col in cols])
    return table


def _listing(suite: str, cells: list[Cell]) -> Table:
    table = Table(title=Text(_title(suite, cells)), title_justify="left")
    for column in ("mode", "point", "median", "min", "max", "unit"):
        table.add_column(column, justify="right" if column in ("median", "min", "max") else "left")
    for cell in cells:
        table.add_row(Text(cell.name), Text(_point(cell)), f"{cell.median:.4g}", f"{cell.min:.4g}", f"{cell.max:.4g}",
                      _unit(cell.metric))
    return table


def _title(suite: str, cells: list[Cell]) -> str:
    units = sorted({_unit(c.metric) for c in cells})
    trials = sorted({c.trials for c in cells})
    notes = [(f"{suite}: median {'/'.join(units)}, spread = (max - min) / median over "
              f"{'/'.join(map(str, trials))} trials")]
    if any(c.quick for c in cells):
        notes.append("QUICK method (fewer or shorter trials than the standard 3 x 100 ms)")
    if any(c.emulated for c in cells):
        notes.append("[emulated] and * mark memory that is DRAM standing in for CXL: not hardware figures")
    return "; ".join(notes)


def _entry(cell: Cell | None) -> Text:
    if cell is None:
        return Text("")
    spread = (cell.max - cell.min) / cell.median if cell.median else 0.0
    text = Text(_format(cell.median) + ("*" if cell.emulated else ""))
    text.append(f" ±{spread / 2:.0%}", style="dim")
    return text


def _value(cell: Cell) -> str:
    return f"{_format(cell.median)} {_unit(cell.metric)}"


def _format(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _unit(metric: Metric) -> str:
    return "GB/s" if metric is Metric.GBPS else "ns"


def _point(cell: Cell) -> str:
    shown = {k: v for k, v in cell.params.items() if v is not None and k not in ("engine", "direction")}
    return ", ".join(f"{k}={format_bytes(v) if k.endswith('bytes') and isinstance(v, int) else v}"
                     for k, v in shown.items())


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))
