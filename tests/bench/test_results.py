"""The results schema: what is written validates, what is malformed is refused with file and line."""

from __future__ import annotations

import json

import pytest

from tiermem.bench.results import SCHEMA, env_record, read_jsonl, validate_record, write_jsonl
from tiermem.errors import ConfigError

FINGERPRINT = "0123456789ab"


def _written(tmp_path, cells):
    path = tmp_path / "r.jsonl"
    write_jsonl(path, env_record(FINGERPRINT, {"kernel": "x"}, "tiermem bench copy"), cells)
    return path


def test_written_records_round_trip_and_carry_the_env_fingerprint(tmp_path, make_cell):
    cells = [make_cell(), make_cell("d2h pinned torch", 40.0, fingerprint="")]
    result = read_jsonl(_written(tmp_path, cells))
    assert [e["command"] for e in result.envs] == ["tiermem bench copy"]
    assert [c.fingerprint for c in result.cells] == [FINGERPRINT, FINGERPRINT]
    assert [(c.name, c.median, c.samples) for c in result.cells] == [(c.name, c.median, c.samples) for c in cells]


def test_every_written_line_follows_the_schema(tmp_path, make_cell):
    for line in _written(tmp_path, [make_cell()]).read_text().splitlines():
        record = json.loads(line)
        assert record["schema"] == SCHEMA
        assert validate_record(record) is None


@pytest.mark.parametrize("corrupt, problem", [
    (lambda r: r.update(schema="tiermem.bench/0"), "schema"),
    (lambda r: r.update(colour="red"), "unknown key"),
    (lambda r: r.pop("median"), "lacks"),
    (lambda r: r.update(samples=[1.0]), "samples for 3 trials"),
    (lambda r: r.update(median=1e9), "not within"),
    (lambda r: r.update(metric="furlongs"), "metric"),
    (lambda r: r["params"].update(sizes=[1, 2]), "JSON scalars"),
    (lambda r: r.update(verified="yes"), "verified"),
])
def test_a_malformed_cell_is_refused_naming_the_problem(corrupt, problem, make_cell):
    record = make_cell().to_record()
    corrupt(record)
    assert problem in validate_record(record)


def test_reading_a_malformed_file_names_the_file_and_line(tmp_path, make_cell):
    path = _written(tmp_path, [make_cell()])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ConfigError, match=r"r\.jsonl:3 is not JSON"):
        read_jsonl(path)


def test_reading_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "absent.jsonl")
