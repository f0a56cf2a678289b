"""Records and console tables of ``tiermem bench engram``: JSON lines, the verdict table, cache hit rates."""

from __future__ import annotations

import json
from pathlib import Path

ACCEPT_MAX_BATCH = 256
ACCEPT_MAX_OVERHEAD_PCT = 2.0


class Results:
    """JSON lines to ``path``, one object per measurement, a compact line on stdout, verdicts kept."""

    SHOWN = ("lookup", "step", "verdict", "cache_hits", "error")

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        self.errors = 0
        self.verdicts: list[dict] = []
        self.cache_hits: list[dict] = []

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record["kind"] == "verdict":
            self.verdicts.append(record)
        if record["kind"] == "cache_hits":
            self.cache_hits.append(record)
        if record["kind"] in self.SHOWN:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def verdict_table(verdicts: list[dict]) -> str:
    """Overhead vs resident per (shape, mode, method) row and batch column; * marks a missed target."""
    batches = sorted({v["batch"] for v in verdicts})
    rows: dict[tuple, dict] = {}
    for v in verdicts:
        rows.setdefault((v["shape"], v["mode"], v["method"]), {})[v["batch"]] = v
    head = f"{'shape':<10} {'mode':<6} {'method':<18}" + "".join(f"{b:>9}" for b in batches) + "  target met"
    title = (f"step overhead vs HBM-resident table, % (target <= {ACCEPT_MAX_OVERHEAD_PCT:g}% at batch <= "
             f"{ACCEPT_MAX_BATCH}; * = missed)")
    lines = [title, head]
    for (shape, mode, method), cells in rows.items():
        text = "".join(f"{_cell(cells.get(b)):>9}" for b in batches)
        judged = [c["meets_target"] for c in cells.values() if c["meets_target"] is not None]
        lines.append(f"{shape:<10} {mode:<6} {method:<18}{text}  {sum(judged)}/{len(judged)}")
    return "\n".join(lines)


def hit_table(hits: list[dict]) -> str:
    """Share of probed rows served from the HBM cache, per (shape, method, layer) row and batch column."""
    batches = sorted({h["batch"] for h in hits})
    rows: dict[tuple, dict] = {}
    for h in hits:
        rows.setdefault((h["shape"], h["method"], h["layer"], h["cache_bytes"]), {})[h["batch"]] = h["hit_rate"]
    head = f"{'shape':<10} {'method':<18} {'layer':>5} {'cache MiB':>10}" + "".join(f"{b:>8}" for b in batches)
    lines = ["hot-row cache hit rate on the measured stream, % of probed rows (fused: requested rows)", head]
    for (shape, method, layer, nbytes), cells in rows.items():
        text = "".join(f"{100 * cells[b]:>8.1f}" if b in cells else f"{'-':>8}" for b in batches)
        lines.append(f"{shape:<10} {method:<18} {layer:>5} {nbytes / 2**20:>10.1f}{text}")
    return "\n".join(lines)


def _cell(verdict: dict | None) -> str:
    if verdict is None:
        return "-"
    return f"{verdict['overhead_vs_resident_pct']:+.1f}{'*' if verdict['meets_target'] is False else ''}"
