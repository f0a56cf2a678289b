"""Capacity planning: the HBM split, its errors, model shapes, and the ``tiermem simulate`` command."""

from __future__ import annotations

import argparse
import json

import pytest

from tiermem.cli import simulate as simulate_cli
from tiermem.errors import CapacityError, ConfigError
from tiermem.simulate import GPUS, HOST_LINKS, PAGERS, decode_cost, expert_budget, model_shape, plan_capacity

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


def test_cli_pager_profiles_change_time_not_caching(traces_dir, capsys):
    trace = traces_dir / "qwen1.5-moe-a2.7b_fiddler-usage.npz"
    records = {}
    for pager, flag in (("ideal", "--pager"), ("python-h100", "--host-pager"), ("device-h100", "--pager")):
        assert run_cli(["--trace", str(trace), "--fraction", "0.5", "--policy", "lru", "--json", flag, pager]) == 0
        records[pager] = json.loads(capsys.readouterr().out)
    hit_rates = {record["hit_rate"] for record in records.values()}
    assert len(hit_rates) == 1  # paging's cost changes time, not what is resident
    # the Python host paces the replay; the device pager only adds its kernel time and slower copies
    assert records["python-h100"]["tokens_per_s"] < records["device-h100"]["tokens_per_s"] \
        < records["ideal"]["tokens_per_s"]
    assert records["python-h100"]["link_utilisation"] < records["ideal"]["link_utilisation"]


def test_cli_refuses_prefetch_with_the_device_pager(traces_dir):
    trace = traces_dir / "qwen1.5-moe-a2.7b_fiddler-usage.npz"
    with pytest.raises(ConfigError, match="which the device-h100 pager never does"):
        run_cli(["--trace", str(trace), "--policy", "lru", "--pager", "device-h100", "--predictor", "frequency"])


def test_the_device_pager_profile_adds_its_kernel_time_and_copy_efficiency():
    model, gpu, link = model_shape("qwen3-30b-a3b"), GPUS["h100"], HOST_LINKS["dram"]
    ideal, device = decode_cost(model, gpu, link), decode_cost(model, gpu, link, PAGERS["device-h100"])
    assert device.compute_fixed_us == pytest.approx(ideal.compute_fixed_us + 18.9)
    assert device.link.bandwidth_gbps == pytest.approx(0.95 * ideal.link.bandwidth_gbps)
    assert device.host == ideal.host and device.compute_per_expert_us == ideal.compute_per_expert_us


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
