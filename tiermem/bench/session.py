"""One bench run: binds the process, owns the memory, fingerprints the host, measures points, writes results.

Extension (a new suite, e.g. ``tiermem/bench/moe.py``): expose ``add_parser(bench_subparsers)`` that
calls ``add_session_options(parser, suppress_defaults=True)`` and sets ``func``; in ``run(args)`` do
``with Session(session_options(args), name="moe") as s: s.finish(s.measure(points, measure_one, "moe"))``
where ``measure_one(point) -> Cell`` (see ``results.bandwidth_cell``/``latency_cell``).

Lifecycle: construction binds the calling thread (and so every thread created later: the engine's
copy threads, torch's pool) to the CPU node next to the GPU, unless a node is given or none is known,
and names the results file (``<out>/<time>-<name>.jsonl``); the first measured point creates it with the
env record and each cell is appended at once, so an interrupted run keeps its points and a run refused
before measuring leaves no file. ``close()`` frees every pool, closes the file
and restores the thread's CPU affinity.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem import numa
from tiermem.bench import fingerprint, plot
from tiermem.bench.compare import Comparison, compare
from tiermem.bench.memory import BenchMemory, MemorySpec, bench_tier_specs, load_tier_config, parse_memory
from tiermem.bench.method import QUICK, STANDARD, Method
from tiermem.bench.report import render_cells, render_comparison
from tiermem.bench.results import Cell, ResultsWriter, env_record, read_jsonl
from tiermem.errors import TopologyError
from tiermem.topology import Topology, discover

log = logging.getLogger("tiermem.bench")

T = TypeVar("T")
DEFAULT_OUT_DIR = Path("tiermem-results")


@dataclass(frozen=True)
class SessionOptions:
    """What every suite shares: method, output, tiers, GPU and CPU binding."""

    method: Method = STANDARD
    out_dir: Path = DEFAULT_OUT_DIR
    plot: bool = True
    compare: Path | None = None
    tier_config: Path | None = None
    device_index: int = 0
    cpu_node: int | None = None
    progress: bool = True
    command: str = "tiermem bench"


@dataclass(frozen=True)
class Outputs:
    jsonl: Path
    png: Path | None
    comparison: Comparison | None


class Session:
    """Everything one bench run needs; use as a context manager."""

    def __init__(self, options: SessionOptions, *, name: str, console: Console | None = None,
                 topology: Topology | None = None) -> None:
        self.options = options
        self.method = options.method
        self.console = console or Console()
        self.topology = topology or discover()
        self.device = _device(options.device_index)
        self._old_cells = read_jsonl(options.compare).cells if options.compare is not None else None
        self._writer: ResultsWriter | None = None  # the results file starts with the first measured point
        self._saved_affinity = os.sched_getaffinity(0)
        self.cpu_node = self._bind()
        memory = None
        try:
            specs = bench_tier_specs(self.topology, load_tier_config(options.tier_config),
                                     gpu_count=torch.cuda.device_count() if self.device else 0)
            self.memory = memory = BenchMemory(specs)
            self.env = fingerprint.collect(self.topology, memory.manager.tiers.values(), device=self.device,
                                           cpu_node=self.cpu_node)
            self.fingerprint = fingerprint.fingerprint_id(self.env)
            self.stem = options.out_dir / _free_stem(options.out_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
        except BaseException:
            if memory is not None:
                memory.close()
            os.sched_setaffinity(0, self._saved_affinity)
            raise

    @property
    def device_spec(self) -> MemorySpec | None:
        return parse_memory(str(self.device)) if self.device is not None else None

    def node_memories(self) -> list[MemorySpec]:
        """``node:N`` for every NUMA node with memory (empty without libnuma)."""
        return [parse_memory(name) for name in self.memory.manager.tiers if name.startswith("node:")]

    def tier_memories(self) -> list[MemorySpec]:
        """The configured host tiers (``dram``, ``cxl``, ...), without the per-node tiers."""
        return [parse_memory(name) for name in self.memory.manager.tiers if not name.startswith("node:")]

    def cpu_reader_nodes(self) -> tuple[int | None, ...]:
        """Nodes with CPUs and memory (MLC's latency matrix rows); one unbound reader without libnuma."""
        if not numa.available():
            return (None,)
        with_memory = set(numa.nodes())
        return tuple(n.node_id for n in self.topology.nodes if n.has_cpus and n.node_id in with_memory) or (None,)

    def measure(self, points: Sequence[T], measure_one: Callable[[T], Cell], what: str,
                label: Callable[[T], str] = str) -> list[Cell]:
        """Measure every point in order under a progress bar, appending each cell to the results file.

        A failing point stops the run (raises); the cells before it stay in the file.
        """
        writer = self._results()
        return [writer.append(measure_one(point)) for point in self._track(points, what, label)]

    def finish(self, cells: Sequence[Cell]) -> Outputs:
        """Print the tables (and the comparison), write the PNG; returns what was written."""
        writer = self._results()
        writer.close()
        jsonl = writer.path
        png = None
        if self.options.plot:
            png = plot.write_png(cells, self.stem.with_suffix(".png"),
                                 theoretical_gbps=fingerprint.theoretical_pcie_gbps(self.env))
        self.console.print(render_cells(cells))
        comparison = None
        if self._old_cells is not None:
            comparison = compare(self._old_cells, cells)
            self.console.print(render_comparison(comparison))
        self.console.print(f"results: {jsonl}" + (f", plot: {png}" if png else "") +
                           f" (fingerprint {self.fingerprint})")
        return Outputs(jsonl, png, comparison)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.memory.close()
        os.sched_setaffinity(0, self._saved_affinity)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _results(self) -> ResultsWriter:
        if self._writer is None:
            self.options.out_dir.mkdir(parents=True, exist_ok=True)
            self._writer = ResultsWriter(self.stem.with_suffix(".jsonl"),
                                         env_record(self.fingerprint, self.env, self.options.command))
        return self._writer

    def _bind(self) -> int | None:
        node = self.options.cpu_node
        if node is None:
            node = self._gpu_node()
        if node is None:
            log.info("bench: not binding to a NUMA node (none given, GPU node unknown, several nodes)")
            return None
        numa.run_on_node(node)
        return node

    def _gpu_node(self) -> int | None:
        """The GPU's node; the only node with CPUs when sysfs does not say (VMs report -1)."""
        if not numa.available():
            return None
        if self.device is not None:
            gpu = fingerprint.matching_gpu(self.topology, torch.cuda.get_device_properties(self.device),
                                           self.device.index)
            if gpu is not None and gpu.numa_node is not None:
                return gpu.numa_node
        with_cpus = [n.node_id for n in self.topology.nodes if n.has_cpus]
        return with_cpus[0] if len(with_cpus) == 1 else None

    def _track(self, points: Sequence[T], what: str, label: Callable[[T], str]) -> Iterator[T]:
        if not self.options.progress:
            yield from points
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[point]}", markup=False))
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(what, total=len(points), point="")
            for point in points:
                progress.update(task, point=label(point))
                yield point
                progress.advance(task)


def add_session_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """Options every suite takes. ``suppress_defaults`` for sub-parsers, so that an option given before the
    suite name (``tiermem bench --quick copy``) is not overwritten by the suite parser's default."""
    default = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    group = parser.add_argument_group("measurement and output")
    group.add_argument("--out", type=Path, default=default(DEFAULT_OUT_DIR),
                       help=f"folder for JSON lines and the PNG plot (default: {DEFAULT_OUT_DIR}/, git-ignored)")
    group.add_argument("--quick", action="store_true", default=default(False),
                       help="fewer, shorter trials (3 x 20 ms instead of 5 x 100 ms); results are labelled quick")
    group.add_argument("--trials", type=int, default=default(None), help="timed trials per point (>= 3 unless --quick)")
    group.add_argument("--min-trial-ms", type=float, default=default(None),
                       help="each trial lasts at least this long (>= 100 unless --quick)")
    group.add_argument("--rotations", type=int, default=default(None), help="buffer slots cycled through per point")
    group.add_argument("--compare", type=Path, default=default(None), metavar="OLD.jsonl",
                       help="compare with an earlier results file; points > 5%% worse are marked REGRESSION")
    group.add_argument("--no-plot", dest="plot", action="store_false", default=default(True), help="skip the PNG")
    group.add_argument("--tier-config", type=Path, default=default(None), metavar="TIERS.toml",
                       help="host tiers to measure ([[tiers]] tables as for TierManager); default: this host's")
    group.add_argument("--device", type=int, default=default(0), help="CUDA device index (default 0)")
    group.add_argument("--cpu-node", type=int, default=default(None),
                       help="bind to this NUMA node's CPUs (default: the GPU's node, or the only node)")
    group.add_argument("--no-progress", dest="progress", action="store_false", default=default(True),
                       help="no progress bar")
    group.add_argument("--name", default=default(None),
                       help="results file name after the time stamp (default: the suite), e.g. copy-tuning")


def session_options(args: argparse.Namespace, *, quick: bool = False) -> SessionOptions:
    """Options from parsed arguments; ``quick`` makes the quick method the default (the no-suite sweep)."""
    quick = quick or args.quick
    base = QUICK if quick else STANDARD
    method = Method(
        trials=args.trials if args.trials is not None else base.trials,
        min_trial_s=args.min_trial_ms / 1e3 if args.min_trial_ms is not None else base.min_trial_s,
        warmup=base.warmup, rotations=args.rotations if args.rotations is not None else base.rotations,
        max_iterations=base.max_iterations, quick=quick,
    )
    return SessionOptions(method=method, out_dir=args.out, plot=args.plot, compare=args.compare,
                          tier_config=args.tier_config, device_index=args.device, cpu_node=args.cpu_node,
                          progress=args.progress, command=shlex.join(["tiermem", *sys.argv[1:]]))


def _device(index: int) -> torch.device | None:
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise TopologyError(f"bench: CUDA device {index} does not exist; this host has {count} (--device 0..{count - 1})")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _free_stem(folder: Path, stem: str) -> str:
    candidate, n = stem, 1
    while (folder / f"{candidate}.jsonl").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate
