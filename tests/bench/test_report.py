"""Tables, comparison, plot and acceptance checks over synthetic cells."""

from __future__ import annotations

import pytest
from rich.console import Console

from tiermem.bench import plot
from tiermem.bench.acceptance import all_passed, run_checks
from tiermem.bench.compare import compare
from tiermem.bench.report import render_cells, render_checks, render_comparison
from tiermem.bench.results import Metric

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 1 << 20


def _text(renderable) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_a_point_more_than_5_percent_slower_is_marked_as_a_regression(make_cell):
    old = [make_cell("h2d pinned torch", 50.0, direction="h2d"), make_cell("d2h pinned torch", 50.0, direction="d2h")]
    new = [make_cell("h2d pinned torch", 44.0, direction="h2d"), make_cell("d2h pinned torch", 48.5, direction="d2h")]
    comparison = compare(old, new)
    assert [c.new.name for c in comparison.regressions] == ["h2d pinned torch"]
    text = _text(render_comparison(comparison))
    assert "REGRESSION" in text and "-12.0%" in text and "1 regression(s) in 2 matched points" in text


def test_higher_latency_is_a_regression_and_lower_is_not(make_cell):
    old = [make_cell("cpu <- dram", 100.0, suite="latency", metric=Metric.NS, memory="dram"),
           make_cell("cpu <- cxl", 300.0, suite="latency", metric=Metric.NS, memory="cxl")]
    new = [make_cell("cpu <- dram", 110.0, suite="latency", metric=Metric.NS, memory="dram"),
           make_cell("cpu <- cxl", 200.0, suite="latency", metric=Metric.NS, memory="cxl")]
    assert [c.new.name for c in compare(old, new).regressions] == ["cpu <- dram"]


def test_points_with_other_params_are_unmatched_not_compared(make_cell):
    comparison = compare([make_cell(src="pinned")], [make_cell(src="dram")])
    assert (len(comparison.changes), len(comparison.only_old), len(comparison.only_new)) == (0, 1, 1)


def test_copy_cells_render_as_a_mode_by_size_grid(make_cell):
    cells = [make_cell("h2d pinned torch", 50.0, bytes=64 * MIB), make_cell("h2d pinned torch", 54.0, bytes=MIB)]
    text = _text(render_cells(cells))
    assert "1.0 MiB" in text and "64.0 MiB" in text and "54.0" in text and "50.0" in text


def test_the_plot_is_a_png_with_every_suite_panel(tmp_path, make_cell):
    cells = [make_cell("h2d pinned torch", 50.0, bytes=MIB, direction="h2d"),
             make_cell("h2d pinned torch", 54.0, bytes=64 * MIB, direction="h2d"),
             make_cell("cpu <- dram", 90.0, suite="latency", metric=Metric.NS, memory="dram"),
             make_cell("dram->cxl", 9.0, suite="matrix", src="dram", dst="cxl")]
    path = plot.write_png(cells, tmp_path / "p.png", theoretical_gbps=63.0)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_nothing_to_plot_writes_no_file(tmp_path, make_cell):
    assert plot.write_png([make_cell(suite="moe")], tmp_path / "p.png", theoretical_gbps=None) is None
    assert not (tmp_path / "p.png").exists()


def _copy(make_cell, direction, engine, src, median, size=256 * MIB):
    return make_cell(f"{direction} {src} {engine}", median, direction=direction, engine=engine, src=src,
                     bytes=size, chunk_bytes=None, streams=None)


@pytest.mark.parametrize("tiermem_gbps, passed", [(53.0, True), (50.0, False)])
def test_engine_check_compares_tiermem_with_raw_pinned_copy_in_the_same_run(make_cell, tiermem_gbps, passed):
    cells = [_copy(make_cell, "h2d", "torch", "pinned", 54.0), _copy(make_cell, "h2d", "tiermem", "dram", tiermem_gbps)]
    check = next(c for c in run_checks(cells) if c.name == "engine-h2d")
    assert check.passed is passed and check.value == pytest.approx(tiermem_gbps / 54.0)


def test_checks_without_cells_are_not_measured_and_do_not_fail(make_cell):
    checks = run_checks([])
    assert all(c.passed is None for c in checks) and all_passed(checks)
    assert "not measured" in _text(render_checks(checks))


def test_small_rows_check_takes_the_better_method_per_row_size(make_cell):
    cells = [make_cell("g", 4.0, suite="gather", method="uva", memory="dram", row_bytes=64),
             make_cell("g", 18.0, suite="gather", method="cpu-staged", memory="dram", row_bytes=64),
             make_cell("g", 16.0, suite="gather", method="uva", memory="dram", row_bytes=256)]
    check = next(c for c in run_checks(cells) if c.name == "small-rows")
    assert check.passed and check.value == 16.0


def test_emulated_rows_keep_their_label_in_the_table(make_cell):
    cell = make_cell("h2h dram->cxl torch [emulated]", 9.0, direction="h2h", emulated=True)
    text = _text(render_cells([cell]))
    assert "h2h dram->cxl torch [emulated]" in text and "[emulated] and * mark" in text
