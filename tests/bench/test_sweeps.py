"""Tiny sweeps of every suite on the dram, emulated cxl and sim tiers of a CPU host, end to end."""

from __future__ import annotations

import pytest

from tiermem.bench import latency, suites
from tiermem.bench.copy import CopySweep, Direction, Engine
from tiermem.bench.gather import GatherMethod, GatherSweep
from tiermem.bench.latency import LatencySweep
from tiermem.bench.matrix import MatrixSweep
from tiermem.bench.memory import parse_memory
from tiermem.bench.results import Metric, read_jsonl, validate_record
from tiermem.errors import TransferError

SIZES = (4096, 65536)
DRAM, CXL, SIM = (parse_memory(n) for n in ("dram", "cxl", "sim"))


def _h2h(session, *memories, engines=(Engine.TORCH, Engine.TIERMEM)):
    sweep = CopySweep(directions=(Direction.H2H,), memories=memories, peers=memories, sizes=SIZES, engines=engines)
    return suites.run_copy(session, sweep)


def test_h2h_sweep_measures_every_pair_engine_and_size_and_verifies_each(session):
    cells = _h2h(session, DRAM, CXL)
    assert len(cells) == 2 * 2 * 2 * len(SIZES)
    assert all(c.verified and c.metric is Metric.GBPS and c.median > 0 and c.trials == 3 for c in cells)
    assert {(c.params["src"], c.params["dst"]) for c in cells} == {
        ("dram", "dram"), ("dram", "cxl"), ("cxl", "dram"), ("cxl", "cxl")}


def test_cells_on_the_emulated_tier_say_so_in_flag_and_name(session):
    for cell in _h2h(session, DRAM, CXL):
        touches_cxl = "cxl" in (cell.params["src"], cell.params["dst"])
        assert cell.emulated == touches_cxl
        assert cell.name.endswith("[emulated]") == touches_cxl


def test_the_tiermem_engine_pays_the_sim_tiers_modelled_bandwidth(session, sim_bandwidth_gbps):
    cells = _h2h(session, DRAM, SIM, engines=(Engine.TIERMEM,))
    through_sim = [c for c in cells if "sim" in (c.params["src"], c.params["dst"])]
    assert through_sim and all(c.median <= sim_bandwidth_gbps * 1.05 for c in through_sim)


def test_host_gather_from_dram_and_sim_is_verified_against_index_select(session):
    sweep = GatherSweep(memories=(DRAM, SIM), methods=(GatherMethod.HOST,), row_bytes=(64, 1024),
                        gather_bytes=64 << 10, table_bytes=4 << 20)
    cells = suites.run_gather(session, sweep)
    assert [(c.params["memory"], c.params["row_bytes"], c.params["rows"]) for c in cells] == [
        ("dram", 64, 1024), ("dram", 1024, 64), ("sim", 64, 1024), ("sim", 1024, 64)]
    assert all(c.verified and c.bytes == 64 << 10 for c in cells)


def test_cpu_latency_is_reported_in_ns_per_load_per_memory(session):
    sweep = LatencySweep(memories=(DRAM, CXL), cpu_nodes=session.cpu_reader_nodes(), buffer_bytes=1 << 20)
    cells = suites.run_latency(session, sweep)
    assert [c.params["memory"] for c in cells] == ["dram", "cxl"] * 1
    assert all(c.metric is Metric.NS and 0 < c.median < 100_000 and c.bytes is None for c in cells)
    assert [c.emulated for c in cells] == [False, True]


def test_matrix_covers_every_ordered_pair(session):
    cells = suites.run_matrix(session, MatrixSweep(endpoints=(DRAM, CXL, SIM), nbytes=16384))
    assert len(cells) == 9 and {c.suite for c in cells} == {"matrix"}


def test_finish_writes_valid_json_lines_and_a_png(session):
    cells = _h2h(session, DRAM) + suites.run_latency(
        session, LatencySweep(memories=(DRAM,), cpu_nodes=(None,), buffer_bytes=1 << 20))
    outputs = session.finish(cells)
    written = read_jsonl(outputs.jsonl)
    assert [e["fingerprint"] for e in written.envs] == [session.fingerprint]
    assert len(written.cells) == len(cells)
    assert all(validate_record(c.to_record()) is None for c in written.cells)
    assert outputs.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_fingerprint_names_host_software_and_which_tiers_are_emulated(session):
    env = session.env
    assert env["tiers"]["cxl"]["emulated"] is True and env["tiers"]["dram"]["emulated"] is False
    assert env["kernel"] and env["software"]["torch"] and "is_vm" in env["vm"]
    assert env["numa"] and all("distances" in node for node in env["numa"].values())
    assert len(session.fingerprint) == 12


@pytest.mark.parametrize("rows", [(7,), (1, 300)])
def test_explicit_row_counts_are_measured_as_given(session, rows):
    sweep = GatherSweep(memories=(DRAM,), methods=(GatherMethod.HOST,), row_bytes=(128,), rows=rows,
                        table_bytes=1 << 20)
    assert [c.params["rows"] for c in suites.run_gather(session, sweep)] == list(rows)


def test_points_measured_before_a_failure_stay_in_the_results_file(session, make_cell):
    def measure_one(point):
        if point == "broken":
            raise RuntimeError("a failing point")
        return make_cell(point, 10.0, direction=point)

    with pytest.raises(RuntimeError):
        session.measure(["h2d", "broken", "d2h"], measure_one, "test")
    session.close()
    written = read_jsonl(session.stem.with_suffix(".jsonl"))
    assert [c.name for c in written.cells] == ["h2d"] and written.cells[0].fingerprint == session.fingerprint


def test_without_numba_latency_falls_back_to_a_python_loop_minus_its_own_time(session, monkeypatch):
    monkeypatch.setattr(latency, "numba", None)
    sweep = LatencySweep(memories=(DRAM,), cpu_nodes=(None,), buffer_bytes=4 << 20)
    (cell,) = suites.run_latency(session, sweep)
    assert cell.params["engine"] == "python" and cell.extra["python_loop_ns_subtracted"] > 0
    assert cell.median > 0


def test_a_reader_that_does_not_follow_the_chain_is_an_error(session, monkeypatch):
    monkeypatch.setattr(latency, "chase_cpu", lambda chain, start, loads: start)
    sweep = LatencySweep(memories=(DRAM,), cpu_nodes=(None,), buffer_bytes=1 << 20)
    with pytest.raises(TransferError, match="does not see the bytes written"):
        suites.run_latency(session, sweep)
