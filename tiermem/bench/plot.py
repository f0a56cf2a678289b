"""PNG plots of bench cells (matplotlib, Agg: no display needed): one panel per suite.

| suite          | panel                                                                          |
|----------------|--------------------------------------------------------------------------------|
| copy, gather   | log2 size (object bytes / row bytes) vs GB/s, one line per mode with min..max   |
|                | bars; dashed lines at the measured peak and at the theoretical PCIe peak       |
|                | (one direction, and both directions when bidir cells are shown)               |
| latency        | horizontal bars, ns per load                                                  |
| matrix         | source x destination heat map of GB/s                                          |
Other suites are not plotted. Emulated modes keep their ``[emulated]`` label in the legend.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tiermem.bench.results import Cell
from tiermem.config import format_bytes

PLOTTED_SUITES = ("copy", "gather", "latency", "matrix")


def write_png(cells: Sequence[Cell], path: Path, *, theoretical_gbps: float | None) -> Path | None:
    """Write the panels of the plotted suites present in ``cells``; None when there is nothing to plot."""
    suites = [s for s in PLOTTED_SUITES if any(c.suite == s for c in cells)]
    if not suites:
        return None
    heights = [_panel_height(suite, [c for c in cells if c.suite == suite]) for suite in suites]
    # matplotlib costs ~1.5 s to import; every `tiermem` command imports this module, few of them plot.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, sum(heights)), layout="constrained")
    panels = figure.subplots(len(suites), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for axes, suite in zip(panels, suites):
        group = [c for c in cells if c.suite == suite]
        if suite in ("copy", "gather"):
            _bandwidth(axes, suite, group, theoretical_gbps)
        elif suite == "latency":
            _latency(axes, group)
        else:
            _matrix(figure, axes, group)
    figure.savefig(path, dpi=110)
    return path


def _panel_height(suite: str, cells: list[Cell]) -> float:
    """Inches: bandwidth panels are fixed; bar and matrix panels grow with their rows."""
    if suite == "latency":
        return 1.5 + 0.35 * len(cells)
    if suite == "matrix":
        return 2.0 + 0.6 * len({c.params["src"] for c in cells})
    return 5.2


def _bandwidth(axes, suite: str, cells: list[Cell], theoretical_gbps: float | None) -> None:
    x_param = "bytes" if suite == "copy" else "row_bytes"
    lines: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        lines[cell.name].append(cell)
    for name, group in lines.items():
        group.sort(key=lambda c: c.params[x_param])
        xs = [c.params[x_param] for c in group]
        medians = [c.median for c in group]
        errors = [[c.median - c.min for c in group], [c.max - c.median for c in group]]
        axes.errorbar(xs, medians, yerr=errors, marker="o", markersize=3, capsize=2, linewidth=1.2, label=name)
    peak = max(cells, key=lambda c: c.median)
    axes.axhline(peak.median, linestyle="--", color="black", linewidth=0.9,
                 label=f"measured peak {peak.median:.1f} GB/s ({peak.name})")
    gpu_paths = any(c.params.get("device") or c.params.get("direction") in ("h2d", "d2h", "bidir") for c in cells)
    if theoretical_gbps and gpu_paths:
        axes.axhline(theoretical_gbps, linestyle="--", color="tab:red", linewidth=0.9,
                     label=f"PCIe theoretical, one direction {theoretical_gbps:.1f} GB/s")
        if any(c.params.get("direction") == "bidir" for c in cells):
            axes.axhline(2 * theoretical_gbps, linestyle=":", color="tab:red", linewidth=0.9,
                         label=f"PCIe theoretical, both directions {2 * theoretical_gbps:.1f} GB/s")
    axes.set_xscale("log", base=2)
    ticks = sorted({c.params[x_param] for c in cells})
    axes.set_xticks(ticks, [format_bytes(t) if suite == "copy" else str(t) for t in ticks], rotation=30)
    axes.set_xlabel("object size" if suite == "copy" else "row bytes")
    axes.set_ylabel("GB/s (median; bars: min..max)")
    axes.set_title(f"{suite}: bandwidth" + (" (QUICK method)" if any(c.quick for c in cells) else ""))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _latency(axes, cells: list[Cell]) -> None:
    names = [c.name for c in cells]
    axes.barh(names, [c.median for c in cells], xerr=[[c.median - c.min for c in cells],
                                                        [c.max - c.median for c in cells]],
              color=["tab:orange" if c.emulated else "tab:blue" for c in cells])
    for y, cell in enumerate(cells):
        axes.annotate(f"  {cell.median:.0f} ns", (cell.max, y), va="center", fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("ns per dependent load (median; bars: min..max; orange: emulated)")
    axes.set_title("latency: pointer chase")


def _matrix(figure, axes, cells: list[Cell]) -> None:
    sources = list(dict.fromkeys(c.params["src"] for c in cells))
    targets = list(dict.fromkeys(c.params["dst"] for c in cells))
    grid = [[float("nan")] * len(targets) for _ in sources]
    for cell in cells:
        grid[sources.index(cell.params["src"])][targets.index(cell.params["dst"])] = cell.median
    image = axes.imshow(grid, cmap="viridis")
    for cell in cells:
        row, col = sources.index(cell.params["src"]), targets.index(cell.params["dst"])
        axes.text(col, row, f"{cell.median:.1f}" + ("*" if cell.emulated else ""), ha="center", va="center",
                  color="white", fontsize=9)
    axes.set_xticks(range(len(targets)), targets)
    axes.set_yticks(range(len(sources)), sources)
    axes.set_xlabel("destination")
    axes.set_ylabel("source")
    size = format_bytes(cells[0].params["bytes"])
    axes.set_title(f"matrix: GB/s at {size} (* emulated memory)")
    figure.colorbar(image, ax=axes, label="GB/s")
