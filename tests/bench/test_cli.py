"""``tiermem bench`` arguments: clear one-line errors for bad input, and the report subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tiermem.bench.results import env_record, read_jsonl, write_jsonl
from tiermem.cli import bench
from tiermem.errors import ConfigError, RegistryError, TierMemError, TopologyError

QUICK_H2H = ["--quick", "--no-plot", "--no-progress", "--min-trial-ms", "2", "--direction", "h2h", "--size", "4KiB"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tiermem")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _fails(argv, error, match):
    with pytest.raises(error, match=match) as caught:
        _run(argv)
    assert "\n" not in str(caught.value), "the CLI prints an error as one line"
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    assert out is None or not list(out.glob("*.jsonl")), "a refused run leaves no results file"


def test_unknown_tier_names_the_tiers_that_exist(tmp_path, tier_config):
    _fails(["bench", "copy", "--out", str(tmp_path), "--tier-config", str(tier_config), *QUICK_H2H,
            "--memory", "nvram"], RegistryError, r"unknown memory 'nvram'.*'cxl', 'dram'")


def test_unparsable_size_says_how_to_write_one(tmp_path):
    _fails(["bench", "copy", "--out", str(tmp_path), *QUICK_H2H, "--size", "12XB"], ConfigError,
           r"cannot parse --size='12XB'.*'512MiB'")


def test_a_numa_node_that_does_not_exist_names_those_that_do(tmp_path):
    _fails(["bench", "copy", "--out", str(tmp_path), *QUICK_H2H, "--memory", "node:63"], TopologyError,
           r"node 63 does not exist.*nodes with memory: \[")


def test_fewer_trials_than_standard_need_quick(tmp_path):
    _fails(["bench", "copy", "--out", str(tmp_path), "--trials", "2", "--direction", "h2h"], ConfigError, "--quick")


def test_row_bytes_must_be_multiples_of_16(tmp_path):
    _fails(["bench", "gather", "--out", str(tmp_path), "--quick", "--method", "host", "--row-bytes", "100"],
           ConfigError, "multiples of 16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_directions_on_a_cpu_host_say_what_to_run_instead(tmp_path):
    _fails(["bench", "copy", "--out", str(tmp_path), "--quick", "--direction", "h2d"], TopologyError,
           "need a CUDA GPU.*--direction h2h")


def test_a_suite_run_writes_results_into_out(tmp_path, tier_config):
    out = tmp_path / "out"
    assert _run(["bench", "copy", "--out", str(out), "--tier-config", str(tier_config), *QUICK_H2H,
                 "--memory", "dram", "--engine", "torch"]) == 0
    (written,) = out.glob("*-copy.jsonl")
    cells = read_jsonl(written).cells
    assert [(c.params["src"], c.params["dst"], c.quick) for c in cells] == [("dram", "dram", True)]


def test_options_before_the_suite_name_are_kept(tmp_path, tier_config):
    out = tmp_path / "before"
    argv = ["bench", "--out", str(out), "--no-plot", "copy", "--tier-config", str(tier_config), *QUICK_H2H[2:],
            "--quick", "--memory", "dram", "--engine", "torch"]
    assert _run(argv) == 0 and list(out.glob("*.jsonl"))


def test_report_check_fails_when_a_measured_check_fails(tmp_path, make_cell):
    path = tmp_path / "r.jsonl"
    cells = [make_cell("h2d pinned torch", 54.0, direction="h2d", engine="torch", src="pinned",
                       chunk_bytes=None, streams=None),
             make_cell("h2d dram tiermem", 40.0, direction="h2d", engine="tiermem", src="dram",
                       chunk_bytes=None, streams=None)]
    write_jsonl(path, env_record("f" * 12, {}, "test"), cells)
    assert _run(["bench", "report", str(path), "--check"]) == 1
    assert _run(["bench", "report", str(path), "--compare", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_every_error_above_is_a_tiermem_error():
    for error in (ConfigError, RegistryError, TopologyError):
        assert issubclass(error, TierMemError)


def test_compare_with_a_missing_file_fails_before_measuring(tmp_path):
    _fails(["bench", "copy", "--out", str(tmp_path / "o"), *QUICK_H2H, "--compare", str(tmp_path / "old.jsonl")],
           ConfigError, "old.jsonl' does not exist")
    assert not (tmp_path / "o").exists()


def test_compare_marks_a_regression_against_an_older_run(tmp_path, tier_config, make_cell, capsys):
    old = tmp_path / "old.jsonl"
    fast = make_cell("h2h dram->dram torch", 1e6, direction="h2h", engine="torch", src="dram", dst="dram",
                     bytes=4096, chunk_bytes=None, streams=None)
    write_jsonl(old, env_record("f" * 12, {}, "test"), [fast])
    assert _run(["bench", "copy", "--out", str(tmp_path / "new"), "--tier-config", str(tier_config), *QUICK_H2H,
                 "--memory", "dram", "--engine", "torch", "--compare", str(old)]) == 0
    assert "REGRESSION" in capsys.readouterr().out
