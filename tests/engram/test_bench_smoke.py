"""The Engram benchmark script runs end to end on tiny shapes (CPU), checking rows before timing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engram_bench.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("engram_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_bench_smoke_run_checks_rows_and_writes_every_record_kind(tmp_path, monkeypatch):
    bench = load_bench(monkeypatch)
    out = tmp_path / "smoke.jsonl"
    assert bench.main(["--smoke", "--device", "cpu", "--shapes", "v4like", "--batches", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"meta", "setup", "correctness", "lookup", "step", "verdict", "done"} <= kinds
    assert all(r["equal"] for r in records if r["kind"] == "correctness")
    assert {r["method"] for r in records if r["kind"] == "step"} == {"none", "resident", "staged"}


def test_verdict_table_marks_missed_targets_and_counts_judged_batches():
    from tiermem.bench.engram_report import verdict_table
    verdicts = [
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 64, "overhead_vs_resident_pct": 1.5, "meets_target": True},
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 256, "overhead_vs_resident_pct": 6.0, "meets_target": False},
        {"shape": "s", "mode": "graph", "method": "uva", "batch": 512, "overhead_vs_resident_pct": 3.0, "meets_target": None},
    ]
    row = verdict_table(verdicts).splitlines()[-1].split()
    assert row == ["s", "graph", "uva", "+1.5", "+6.0*", "+3.0", "1/2"]


def test_bench_on_a_corpus_measures_cache_hits_and_labels_the_stream(tmp_path, monkeypatch):
    bench = load_bench(monkeypatch)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [np.random.default_rng(doc).integers(0, 20, 60) for doc in range(16)]  # few ids: n-grams repeat
    np.save(corpus / "tokens.npy", np.concatenate(texts).astype(np.uint16))
    np.save(corpus / "doc_offsets.npy", np.arange(17) * 60)
    out = tmp_path / "corpus.jsonl"
    assert bench.main(["--smoke", "--device", "cpu", "--shapes", "engram27b", "--batches", "4", "--methods",
                       "staged,staged-cache", "--cache-fractions", "0.02,0.5", "--corpus", str(corpus),
                       "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["equal"] for r in records if r["kind"] == "correctness")
    caches = [r for r in records if r["kind"] == "cache"]
    assert {(r["capacity_fraction"], r["layer"]) for r in caches} == {(f, k) for f in (0.02, 0.5) for k in (2, 15)}
    assert all(r["cache_bytes"] >= r["capacity_rows"] * 160 + r["row_map_bytes"] for r in caches)
    hits = {(r["method"], r["layer"]): r["hit_rate"] for r in records if r["kind"] == "cache_hits"}
    assert set(hits) == {(f"staged-cache@{f:g}", k) for f in (0.02, 0.5) for k in (2, 15)}
    assert all(hits[("staged-cache@0.5", k)] > hits[("staged-cache@0.02", k)] for k in (2, 15))
    lookups = {r["method"]: r["table_rows_per_step"] for r in records if r["kind"] == "lookup"}
    assert lookups["staged-cache@0.5"] < lookups["staged"]
    assert {r["stream"] for r in records if "batch" in r} == {f"corpus:{corpus}"}


def test_cached_variants_without_a_corpus_are_reported_not_run(tmp_path, monkeypatch):
    bench = load_bench(monkeypatch)
    out = tmp_path / "random.jsonl"
    assert bench.main(["--smoke", "--device", "cpu", "--shapes", "engram27b", "--batches", "2", "--steps", "1",
                       "--methods", "staged,staged-cache", "--out", str(out)]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(r["kind"] == "error" and "--corpus" in r["error"] for r in records)
    assert {r["method"] for r in records if r["kind"] == "step"} == {"none", "resident", "staged"}
    assert {r["stream"] for r in records if r["kind"] == "batch"} == {"random"}
