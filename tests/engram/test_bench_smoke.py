"""The Engram benchmark script runs end to end on tiny shapes (CPU), checking rows before timing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engram_bench.py"


def test_bench_smoke_run_checks_rows_and_writes_every_record_kind(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("engram_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.jsonl"
    assert bench.main(["--smoke", "--device", "cpu", "--shapes", "v4like", "--batches", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"meta", "setup", "correctness", "lookup", "step", "verdict", "done"} <= kinds
    assert all(r["equal"] for r in records if r["kind"] == "correctness")
    assert {r["method"] for r in records if r["kind"] == "step"} == {"none", "resident", "staged"}


def test_verdict_table_marks_missed_targets_and_counts_judged_batches():
    from tiermem.bench.engram import verdict_table
    verdicts = [
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 64, "overhead_vs_resident_pct": 1.5, "meets_target": True},
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 256, "overhead_vs_resident_pct": 6.0, "meets_target": False},
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 512, "overhead_vs_resident_pct": 3.0, "meets_target": None},
    ]
    row = verdict_table(verdicts).splitlines()[-1].split()
    assert row == ["s", "graph", "uva", "+1.5", "+6.0*", "+3.0", "1/2"]
