"""Console tables of ``tiermem bench moe`` records: one row per run, and the acceptance summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(records: list[dict[str, Any]]) -> None:
    """One row per (workload, batch, fraction): the acceptance figures of tiermem against LRU."""
    table = Table(title="tiermem bench moe: acceptance summary")
    for column in ("workload", "batch", "fraction", "tok/s lru", "tok/s tiermem", "vs lru", "rounds vs lru", "hit lru",
                   "hit tiermem",
                   "belady", "gap closed", "xfer eff", "overlap lru", "overlap tiermem", "device lru vs lru",
                   "device tiermem vs lru", "hit device tiermem", "gap closed device", "overlap device tiermem",
                   "device pipelined vs lru", "overlap device lru", "overlap device pipelined"):
        table.add_column(column)
    efficiency = {r["workload"]: r.get("transfer_efficiency") for r in records if r["kind"] == "workload"}
    overlap = {(r["workload"], r["batch"], r["fraction"], r["mode"]): r.get("overlap_ratio")
               for r in records if r["kind"] == "run"}
    for r in (r for r in records if r["kind"] == "summary"):
        where = (r["workload"], r["batch"], r["fraction"])
        table.add_row(r["workload"], str(r["batch"]), f"{r['fraction']:.2f}", _fmt(r.get("lru_tokens_per_s"), ".1f"),
                      _fmt(r.get("tiermem_tokens_per_s"), ".1f"), _fmt(r.get("tokens_per_s_vs_lru"), ".2f"),
                      _spread(r.get("round_tokens_per_s_vs_lru")), _fmt(r.get("lru_hit_rate"), ".3f"), _fmt(r.get("tiermem_hit_rate"), ".3f"),
                      _fmt(r.get("sim_belady"), ".3f"), _fmt(r.get("gap_closed"), ".2f"),
                      _fmt(efficiency.get(r["workload"]), ".2f"), _fmt(overlap.get((*where, "lru")), ".2f"),
                      _fmt(overlap.get((*where, "tiermem")), ".2f"), _fmt(r.get("device_lru_vs_lru"), ".2f"),
                      _fmt(r.get("device_tiermem_vs_lru"), ".2f"), _fmt(r.get("device_tiermem_hit_rate"), ".3f"),
                      _fmt(r.get("device_tiermem_gap_closed"), ".2f"), _fmt(overlap.get((*where, "device_tiermem")), ".2f"),
                      _fmt(r.get("device_pipelined_vs_lru"), ".2f"), _fmt(overlap.get((*where, "device_lru")), ".2f"),
                      _fmt(overlap.get((*where, "device_pipelined")), ".2f"))
    Console(width=300).print(table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(ratios: list[float] | None) -> str:
    """The range of the per-round ratios ("-" for a single round: no spread to show)."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios and len(ratios) > 1 else "-"


def print_table(records: list[dict[str, Any]]) -> None:
    table = Table(title="tiermem bench moe")
    for column in ("workload", "batch", "fraction", "mode", "tokens/s", "hit rate", "stall s", "GB moved", "overlap"):
        table.add_column(column)
    for r in (r for r in records if r["kind"] == "run"):
        table.add_row(r["workload"], str(r["batch"]), f"{r['fraction']:.2f}", r["mode"], f"{r['tokens_per_s']:.1f}",
                      f"{r['hit_rate']:.3f}", _fmt(r['stall_s'], ".3f"), f"{r['bytes_moved'] / 1e9:.2f}",
                      f"{r.get('overlap_ratio', float('nan')):.2f}")
    Console(width=170).print(table)
