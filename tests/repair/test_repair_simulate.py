"""``tiermem simulate repair``: DeepSeek-V3 scenarios agree with hand-computed link times; table and JSON."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from tiermem.cli.repair import add_repair_parser
from tiermem.repair.fabric import FabricConfig, Route
from tiermem.repair.scenario import SOURCE_MIXES, ExpertDtype, Failure, ScenarioConfig, run_scenario

MIX = {m.name: m for m in SOURCE_MIXES}
FP8_EXPERT_BYTES = 44_040_192
LAYERS = 6  # of DeepSeek-V3's 58, to keep the tests fast
NODES_AT_64_RANKS = 8


def test_expert_sizes_are_deepseek_v3_in_fp8_and_bf16():
    assert ScenarioConfig(num_ranks=32).expert_bytes == FP8_EXPERT_BYTES
    assert ScenarioConfig(num_ranks=32, dtype=ExpertDtype.BF16).expert_bytes == 2 * FP8_EXPERT_BYTES


def test_a_disk_only_repair_spreads_the_lost_experts_evenly_over_every_nodes_disk():
    result = run_scenario(ScenarioConfig(num_ranks=64, num_moe_layers=LAYERS), MIX["disk"], FabricConfig())
    assert result.repair.complete and result.gaps == len(result.repair.moves) > 8
    assert set(result.repair.bytes_by_route()) == {Route.DISK}
    busiest_disk = math.ceil(result.gaps / NODES_AT_64_RANKS)  # identical disks: LPT balances exactly
    one_expert_s = FabricConfig().disk.transfer_time_s(FP8_EXPERT_BYTES)
    assert result.repair.makespan_s == pytest.approx(busiest_disk * one_expert_s)


def test_a_node_loss_with_only_node_local_copies_cannot_be_repaired_but_ring_copies_can():
    config = ScenarioConfig(num_ranks=64, num_moe_layers=LAYERS, failure=Failure.NODE)
    local = run_scenario(config, MIX["node-dram"], FabricConfig())
    ring = run_scenario(config, MIX["ring-dram"], FabricConfig())
    assert local.repair.moves == () and len(local.repair.unfilled) == local.gaps > 0
    assert ring.repair.complete and {Route.RDMA_DRAM, Route.LOCAL_DRAM} >= set(ring.repair.bytes_by_route())


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tiermem simulate")
    add_repair_parser(parser.add_subparsers(dest="what", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_the_cli_prints_one_json_row_per_rank_count_and_mix(capsys):
    assert run_cli(["repair", "--ranks", "64", "--layers", str(LAYERS), "--mix", "disk", "node-dram", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["ranks"], r["mix"]) for r in rows] == [(64, "disk"), (64, "node-dram")]
    assert rows[1]["repair_s"] < rows[0]["repair_s"] < rows[0]["full_restart_s"]
    assert rows[0]["degraded_s"] == pytest.approx(1.0 + rows[0]["repair_s"])


def test_the_cli_table_names_the_eep_figures_and_the_restart_baseline(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps to the terminal width
    assert run_cli(["repair", "--ranks", "64", "--layers", str(LAYERS), "--mix", "node-dram"]) == 0
    out = capsys.readouterr().out
    assert "node-dram" in out and "11 s recovery" in out and "348 s" in out and "pcie_h2d[rank" in out
