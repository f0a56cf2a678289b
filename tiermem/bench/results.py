"""Bench results as JSON lines with a versioned schema (``tiermem.bench/1``): write, read, validate.

A results file holds one ``env`` record (the environment fingerprint, its id and the exact command)
followed by one ``cell`` record per measured point. Every cell carries the id of the fingerprint it was
measured under, so cells of several files can be mixed without losing where each came from.

Cell fields (all required):
| field        | meaning                                                                        |
|--------------|--------------------------------------------------------------------------------|
| suite        | copy, gather, latency, matrix, or a suite added later (moe, engram, ...)       |
| name         | the mode, i.e. the params without the size: one plot line, one table group    |
| params       | everything that identifies the point (JSON scalars); (suite, params) is its key |
| bytes        | bytes moved per operation (null for latency)                                   |
| metric       | ``gbps`` (higher is better) or ``ns`` (lower is better)                         |
| median/min/max, samples | per-trial values in the metric; samples has ``trials`` entries       |
| trials, iterations, clock, quick | how it was measured (see ``method``)                         |
| emulated     | true when any memory involved is an emulated tier (never hardware figures)     |
| verified     | true: destinations were checked equal to their sources after timing (latency: |
|              | the reader's walk was checked against the chain as written)                    |
| fingerprint  | id of the env record                                                            |
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tiermem.bench.method import Summary, Timing
from tiermem.errors import ConfigError

SCHEMA = "tiermem.bench/1"


class Metric(str, enum.Enum):
    """Unit of a cell's values and which way is better."""

    GBPS = "gbps"
    NS = "ns"

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.GBPS


@dataclass(frozen=True)
class Cell:
    """One measured point."""

    suite: str
    name: str
    params: Mapping[str, Any]
    bytes: int | None
    metric: Metric
    median: float
    min: float
    max: float
    samples: tuple[float, ...]
    trials: int
    iterations: int
    clock: str
    quick: bool
    emulated: bool
    verified: bool
    fingerprint: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the point across runs: suite and canonical params."""
        return self.suite, json.dumps(dict(self.params), sort_keys=True)

    def to_record(self) -> dict[str, Any]:
        record = {"schema": SCHEMA, "record": "cell", **asdict(self)}
        record["metric"] = self.metric.value
        record["params"] = dict(self.params)
        record["samples"] = list(self.samples)
        record["extra"] = dict(self.extra)
        return record


def bandwidth_cell(*, suite: str, name: str, params: Mapping[str, Any], nbytes: int, timing: Timing,
                   quick: bool, emulated: bool, verified: bool) -> Cell:
    """A GB/s cell from a timing of operations that each move ``nbytes``."""
    summary = Summary.of(tuple(r / 1e9 for r in timing.rates(nbytes)))
    return _cell(suite, name, params, nbytes, Metric.GBPS, summary, timing, quick, emulated, verified)


def latency_cell(*, suite: str, name: str, params: Mapping[str, Any], loads_per_op: int, timing: Timing,
                 quick: bool, emulated: bool) -> Cell:
    """A nanoseconds-per-load cell from a timing of operations that each chase ``loads_per_op`` pointers."""
    summary = Summary.of(tuple(s / loads_per_op * 1e9 for s in timing.seconds_per_op))
    return _cell(suite, name, params, None, Metric.NS, summary, timing, quick, emulated, verified=True)


def _cell(suite, name, params, nbytes, metric, summary, timing, quick, emulated, verified) -> Cell:
    return Cell(
        suite=suite, name=name, params=dict(params), bytes=nbytes, metric=metric, median=summary.median,
        min=summary.min, max=summary.max, samples=summary.samples, trials=len(timing.seconds_per_op),
        iterations=timing.iterations, clock=timing.clock.value, quick=quick, emulated=emulated,
        verified=verified,
    )


def env_record(fingerprint_id: str, env: Mapping[str, Any], command: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "record": "env", "fingerprint": fingerprint_id, "command": command, "env": dict(env)}


class ResultsWriter:
    """Appends to a results file as points are measured, so an interrupted run keeps what it measured.

    The env record is written on construction; ``append`` stamps each cell with its fingerprint id,
    writes one line and flushes.
    """

    def __init__(self, path: Path, env: Mapping[str, Any]) -> None:
        self.path = path
        self.fingerprint = env["fingerprint"]
        self._file = path.open("x")
        self._write(dict(env))

    def append(self, cell: Cell) -> Cell:
        stamped = replace(cell, fingerprint=self.fingerprint)
        self._write(stamped.to_record())
        return stamped

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()


def write_jsonl(path: Path, env: Mapping[str, Any], cells: Iterable[Cell]) -> None:
    """Write the env record then every cell (stamped with the env's fingerprint id) in one go."""
    writer = ResultsWriter(path, env)
    try:
        for cell in cells:
            writer.append(cell)
    finally:
        writer.close()


@dataclass(frozen=True)
class ResultsFile:
    """What a results file holds: its env records and its cells."""

    envs: tuple[dict[str, Any], ...]
    cells: tuple[Cell, ...]


def read_jsonl(path: Path) -> ResultsFile:
    """Read and validate a results file; any malformed line is a ConfigError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"bench results: file {str(path)!r} does not exist") from None
    envs, cells = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"bench results: {path}:{number} is not JSON ({exc.msg})") from None
        problem = validate_record(record)
        if problem:
            raise ConfigError(f"bench results: {path}:{number}: {problem}")
        if record["record"] == "env":
            envs.append(record)
        else:
            cells.append(cell_from_record(record))
    return ResultsFile(tuple(envs), tuple(cells))


def cell_from_record(record: Mapping[str, Any]) -> Cell:
    body = {k: v for k, v in record.items() if k not in ("schema", "record")}
    body["metric"] = Metric(body["metric"])
    body["samples"] = tuple(body["samples"])
    return Cell(**body)


_CELL_TYPES: dict[str, tuple[type, ...]] = {
    "suite": (str,), "name": (str,), "params": (dict,), "bytes": (int, type(None)), "metric": (str,),
    "median": (int, float), "min": (int, float), "max": (int, float), "samples": (list,), "trials": (int,),
    "iterations": (int,), "clock": (str,), "quick": (bool,), "emulated": (bool,), "verified": (bool,),
    "fingerprint": (str,), "extra": (dict,),
}
_ENV_TYPES: dict[str, tuple[type, ...]] = {"fingerprint": (str,), "command": (str,), "env": (dict,)}


def validate_record(record: Any) -> str | None:
    """What is wrong with one record, or None when it follows the schema."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if record.get("schema") != SCHEMA:
        return f"schema is {record.get('schema')!r}, this tiermem reads {SCHEMA!r}"
    kind = record.get("record")
    if kind not in ("env", "cell"):
        return f"record is {kind!r}; expected 'env' or 'cell'"
    types = _ENV_TYPES if kind == "env" else _CELL_TYPES
    expected = set(types) | {"schema", "record"}
    if set(record) != expected:
        return (f"{kind} record has unknown key(s) {sorted(set(record) - expected)} and lacks "
                f"{sorted(expected - set(record))}")
    for key, allowed in types.items():
        value = record[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return f"{kind} field {key!r} has type {type(value).__name__}; expected {[t.__name__ for t in allowed]}"
    if kind == "cell":
        return _validate_cell(record)
    return None


def _validate_cell(record: Mapping[str, Any]) -> str | None:
    if record["metric"] not in {m.value for m in Metric}:
        return f"metric {record['metric']!r} is not one of {[m.value for m in Metric]}"
    if len(record["samples"]) != record["trials"] or record["trials"] < 1:
        return f"{len(record['samples'])} samples for {record['trials']} trials"
    if not record["min"] <= record["median"] <= record["max"]:
        return f"median {record['median']} is not within [min {record['min']}, max {record['max']}]"
    for key, value in record["params"].items():
        if not isinstance(value, (str, int, float, bool, type(None))):
            return f"param {key!r} is a {type(value).__name__}; params hold JSON scalars only"
    return None

