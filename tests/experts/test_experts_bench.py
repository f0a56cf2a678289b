"""``tiermem bench moe`` end to end on the CPU stand-in: a synthetic trace, every mode, one record each."""

from __future__ import annotations

import argparse
import json

from tiermem.bench import moe


def test_bench_moe_replays_a_trace_and_reports_every_mode(tmp_path):
    parser = argparse.ArgumentParser()
    moe.add_parser(parser.add_subparsers())
    args = parser.parse_args(["moe", "--device", "cpu", "--workloads", "tiny@uniform", "--quick",
                              "--batches", "1", "4", "--max-steps", "8",
                              "--out", str(tmp_path)])
    assert args.func(args) == 0
    records = [json.loads(line) for line in (tmp_path / "moe.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "run"]
    assert {r["mode"] for r in runs} == set(moe.MODES)
    assert len(runs) == 2 * len(moe.MODES)  # batches x modes (one fraction)
    assert all(r["hit_rate"] == 1.0 and r["bytes_moved"] == 0 for r in runs if r["mode"] == "all_hbm")
    offloaded = [r for r in runs if r["mode"] != "all_hbm"]
    assert all(0.0 <= r["hit_rate"] < 1.0 and r["misses"] > 0 for r in offloaded)
    summaries = [r for r in records if r["kind"] == "summary"]
    assert all(r["sim_belady"] >= r["sim_lru"] for r in summaries)
    assert all(r["tokens_per_s_vs_lru"] > 0 and "gap_closed" in r for r in summaries)
    phases = [r["host_us_per_layer"] for r in runs]
    assert all({"route_sync", "route", "compute", "total"} <= set(p) for p in phases)
    assert all(abs(p["total"] - sum(v for k, v in p.items() if k != "total")) < 1e-6 * p["total"] for p in phases)
    assert all("demand_submit" in r["host_us_per_layer"] for r in offloaded)
