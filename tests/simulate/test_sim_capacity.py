"""Capacity planning: the HBM split, its errors, model shapes, and the ``tiermem simulate`` command."""

from __future__ import annotations

import argparse
import json

import pytest

from tiermem.cli import simulate as simulate_cli
from tiermem.errors import CapacityError, ConfigError
from tiermem.simulate import GPUS, HOST_LINKS, expert_budget, model_shape, plan_capacity

GIB = 2**30


def test_expert_sizes_follow_the_published_shapes():
    assert model_shape("deepseek-v3").expert_bytes == 3 * 7168 * 2048 * 2  # 88 MB, the copy size in FACTS.md
    assert model_shape("Mixtral-8x7B").expert_bytes == 3 * 4096 * 14336 * 2
    assert 0 < model_shape("qwen3-30b-a3b").dense_bytes < 4e9


def test_hbm_below_one_steps_working_set_names_the_bytes_needed():
    with pytest.raises(CapacityError, match="at least 79346723840 bytes \\(73.9 GiB\\) of HBM are needed"):
        expert_budget(model_shape("deepseek-v3"), 30 * GIB, 4 * GIB)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known models: \\['deepseek-v2-lite'"):
        model_shape("llama-moe")


def test_capacity_plan_under_flat_routing_gives_lru_the_resident_fraction_and_belady_more():
    plan = plan_capacity(model_shape("deepseek-v2-lite"), gpu=GPUS["h100"], host_tier="dram", link=HOST_LINKS["dram"],
                         hbm_bytes=14 * GIB, reserve_bytes=2 * GIB, batch_size=1, policies=["lru", "belady"],
                         decode_steps=48)
    lru, belady = plan.results
    assert plan.slots_per_layer == (14 * GIB - 2 * GIB - plan.model.dense_bytes) // plan.model.expert_bytes // 26
    assert lru.hit_rate == pytest.approx(plan.resident_fraction, abs=0.05)
    assert belady.hit_rate > lru.hit_rate
    assert belady.timing.tokens_per_s > lru.timing.tokens_per_s
    assert plan.all_resident_tokens_per_s > belady.timing.tokens_per_s


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    simulate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", *argv])
    return args.func(args)


def test_cli_replays_a_trace_as_json(traces_dir, capsys):
    trace = traces_dir / "qwen1.5-moe-a2.7b_fiddler-usage.npz"
    assert run_cli(["--trace", str(trace), "--fraction", "0.5", "--policy", "lru", "belady", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in records] == ["lru", "belady"]
    assert records[0]["hit_rate"] <= records[1]["hit_rate"] and records[0]["tokens_per_s"] > 0


def test_cli_host_pager_profile_slows_the_replay_to_the_hosts_pace(traces_dir, capsys):
    trace = traces_dir / "qwen1.5-moe-a2.7b_fiddler-usage.npz"
    records = {}
    for pager in ("ideal", "python-h100"):
        assert run_cli(["--trace", str(trace), "--fraction", "0.5", "--policy", "lru", "--json",
                        "--host-pager", pager]) == 0
        records[pager] = json.loads(capsys.readouterr().out)
    assert records["python-h100"]["hit_rate"] == records["ideal"]["hit_rate"]  # the host changes time, not caching
    assert records["python-h100"]["tokens_per_s"] < records["ideal"]["tokens_per_s"]
    assert records["python-h100"]["link_utilisation"] < records["ideal"]["link_utilisation"]


def test_cli_prints_a_capacity_table(capsys):
    assert run_cli(["--model", "qwen1.5-moe-a2.7b", "--hbm-gib", "12", "--host-tier", "cxl", "--policy", "lru",
                    "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "capacity plan: qwen1.5-moe-a2.7b" in out and "declared 26 GB/s" in out


def test_cli_without_a_trace_or_a_model_says_what_to_give():
    with pytest.raises(ConfigError, match="give --trace"):
        run_cli([])


def test_cli_cross_fits_a_registered_predictor_and_adds_prefetch_rows(traces_dir, capsys):
    trace = traces_dir / "mixtral-8x7b-instruct-fp8_speculative-moe.npz"
    argv = ["--trace", str(trace), "--fraction", "0.5", "--policy", "lru", "--predictor", "frequency", "--json"]
    assert run_cli(argv) == 0
    lru, predicted = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (lru["policy"], predicted["policy"]) == ("lru", "predicted")
    assert predicted["prefetch_distance"] == 1 and predicted["prefetch_loads"] > 0
    assert lru["tokens"] == predicted["tokens"] == 585  # both folds together: every decode token
