"""``tiermem bench``: bandwidth and latency sweeps across tiers (nvbandwidth + Intel MLC in one tool).

``tiermem bench`` alone runs a quick sweep (< 60 s) of whatever this host has. Suites:
``copy``, ``gather``, ``latency``, ``matrix``, and ``report`` (tables, checks and comparison of earlier
results). Every run writes JSON lines (schema ``tiermem.bench/1``) and a PNG into ``--out``.

Add a suite: a module exposing ``add_parser(bench_subparsers)`` (see ``tiermem.bench.session``), listed
in ``EXTRA_SUITES``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from tiermem.bench import engram, fingerprint, moe, plot, suites
from tiermem.bench.acceptance import all_passed, run_checks
from tiermem.bench.compare import compare
from tiermem.bench.copy import CopySweep, Direction, Engine
from tiermem.bench.gather import GatherMethod, GatherSweep
from tiermem.bench.latency import LatencySweep
from tiermem.bench.matrix import MatrixSweep
from tiermem.bench.memory import MemorySpec, parse_memory
from tiermem.bench.report import render_cells, render_checks, render_comparison
from tiermem.bench.results import read_jsonl
from tiermem.bench.session import Session, add_session_options, session_options
from tiermem.config import parse_bytes

EXTRA_SUITES = (moe, engram)  # modules with add_parser(bench_subparsers)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="bandwidth and latency sweeps across tiers (quick sweep without a suite)",
        description="Measure every path that matters to offloading on this host. Without a suite: a quick sweep "
                    "(< 60 s). Results: a table, JSON lines and a PNG in --out.")
    add_session_options(parser)
    parser.set_defaults(func=run_quick)
    suites_parsers = parser.add_subparsers(dest="suite", metavar="SUITE")
    for add in (_add_copy, _add_gather, _add_latency, _add_matrix, _add_report):
        add(suites_parsers)
    for module in EXTRA_SUITES:
        module.add_parser(suites_parsers)


def _suite(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help)
    add_session_options(parser, suppress_defaults=True)
    return parser


def _sizes(values: list[str], what: str) -> tuple[int, ...]:
    return tuple(parse_bytes(v, what=what) for v in values)


def _memories(values: list[str], device: int) -> tuple[MemorySpec, ...]:
    return tuple(parse_memory(v, device_index=device) for v in values)


def _add_copy(subparsers: argparse._SubParsersAction) -> None:
    parser = _suite(subparsers, "copy", "object copies: direction x memory x size x engine (x chunk x streams)")
    parser.add_argument("--direction", nargs="+", choices=[d.value for d in Direction],
                        help="default: h2d d2h bidir with a GPU, h2h without")
    parser.add_argument("--memory", nargs="+", help="host memories (pageable, pinned, node:N, tier names); "
                        "default: pinned pageable dram with a GPU, every node and host tier without")
    parser.add_argument("--peer", nargs="+", help="h2h destinations (default: the --memory list)")
    parser.add_argument("--size", nargs="+", help="object sizes, e.g. 4KiB 64MiB 1GiB (default: 4KiB..1GiB)")
    parser.add_argument("--engine", nargs="+", choices=[e.value for e in Engine], default=["torch", "tiermem"],
                        help="torch: raw copy_; tiermem: the transfer engine; sm: Triton copy kernel; "
                             "plain-loop: copy_ loop timed with perf_counter (the harness reference)")
    parser.add_argument("--chunk", nargs="+", help="tiermem engine chunk sizes (default: the engine's)")
    parser.add_argument("--streams", nargs="+", type=int, help="tiermem engine streams per direction")
    parser.set_defaults(func=run_copy)


def _add_gather(subparsers: argparse._SubParsersAction) -> None:
    parser = _suite(subparsers, "gather", "scattered rows of a host table: method x row bytes x rows")
    parser.add_argument("--memory", nargs="+", help="where the table lives (default: dram)")
    parser.add_argument("--method", nargs="+", choices=[m.value for m in GatherMethod],
                        help="default: uva cpu-staged naive with a GPU, host without")
    parser.add_argument("--row-bytes", nargs="+", type=int, default=list(suites.ROW_BYTES),
                        help="row sizes in bytes (multiples of 16; default 64..16384)")
    parser.add_argument("--rows", nargs="+", type=int, help="rows per gather (default: --gather-bytes / row bytes)")
    parser.add_argument("--gather-bytes", default="16MiB", help="bytes per gather when --rows is not given")
    parser.add_argument("--table-bytes", default="1GiB", help="table size (indices are uniform over it)")
    parser.add_argument("--staging-chunk", default="4MiB", help="cpu-staged: bytes gathered per staging chunk")
    parser.add_argument("--destination", default="pageable", help="host method: where rows land")
    parser.set_defaults(func=run_gather)


def _add_latency(subparsers: argparse._SubParsersAction) -> None:
    parser = _suite(subparsers, "latency", "idle load latency by pointer chasing, from CPUs and the GPU")
    parser.add_argument("--memory", nargs="+", help="where the chain lives (default: every node and host tier, "
                        "and the GPU's memory)")
    parser.add_argument("--reader-node", nargs="+", type=int,
                        help="CPU readers: NUMA nodes to chase from (default: every node with CPUs)")
    parser.add_argument("--no-cpu", action="store_true", help="no CPU reader")
    parser.add_argument("--no-gpu", action="store_true", help="no GPU reader")
    parser.add_argument("--buffer-bytes", help="chain size (default: max(256MiB, 4 x last-level cache))")
    parser.set_defaults(func=run_latency)


def _add_matrix(subparsers: argparse._SubParsersAction) -> None:
    parser = _suite(subparsers, "matrix", "source x destination copy bandwidth at one size (nvbandwidth style)")
    parser.add_argument("--endpoint", nargs="+", help="memories (default: every node, host tier and GPU)")
    parser.add_argument("--size", default="256MiB", help="bytes per copy (default 256MiB)")
    parser.add_argument("--engine", choices=["torch", "tiermem"], default="torch")
    parser.set_defaults(func=run_matrix)


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="tables, plot, checks and comparison of results files",
                                   description="Read results files (JSON lines) written by earlier runs.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    parser.add_argument("--compare", type=Path, metavar="OLD.jsonl", help="mark points > 5%% worse than OLD")
    parser.add_argument("--check", action="store_true",
                        help="run the acceptance checks (exit 1 if one fails)")
    parser.add_argument("--plot", dest="png", type=Path, metavar="OUT.png", help="write a PNG of the cells")
    parser.set_defaults(func=run_report)


def run_quick(args: argparse.Namespace) -> int:
    with Session(session_options(args, quick=True), name=args.name or "quick") as session:
        session.finish(suites.quick_cells(session))
    return 0


def run_copy(args: argparse.Namespace) -> int:
    with Session(session_options(args), name=args.name or "copy") as session:
        device = session.device_spec
        if args.memory:
            memories = _memories(args.memory, args.device)
        elif device is not None:
            memories = (parse_memory("pinned"), parse_memory("pageable"), suites.gpu_host_memory(session))
        else:
            memories = tuple(suites.host_memories(session))
        directions = args.direction or (["h2d", "d2h", "bidir"] if device is not None else ["h2h"])
        sweep = CopySweep(
            directions=tuple(Direction(d) for d in directions), memories=memories,
            peers=_memories(args.peer, args.device) if args.peer else memories,
            sizes=_sizes(args.size, "--size") if args.size else suites.COPY_SIZES,
            engines=tuple(Engine(e) for e in args.engine),
            chunk_bytes=_sizes(args.chunk, "--chunk") if args.chunk else (None,),
            streams=tuple(args.streams) if args.streams else (None,), device=device)
        session.finish(suites.run_copy(session, sweep))
    return 0


def run_gather(args: argparse.Namespace) -> int:
    with Session(session_options(args), name=args.name or "gather") as session:
        device = session.device_spec
        methods = args.method or (["uva", "cpu-staged", "naive"] if device is not None else ["host"])
        sweep = GatherSweep(
            memories=_memories(args.memory, args.device) if args.memory else (suites.gpu_host_memory(session),),
            methods=tuple(GatherMethod(m) for m in methods), row_bytes=tuple(args.row_bytes),
            rows=tuple(args.rows or ()), gather_bytes=parse_bytes(args.gather_bytes, what="--gather-bytes"),
            table_bytes=parse_bytes(args.table_bytes, what="--table-bytes"),
            staging_chunk_bytes=parse_bytes(args.staging_chunk, what="--staging-chunk"), device=device,
            destination=parse_memory(args.destination, device_index=args.device))
        session.finish(suites.run_gather(session, sweep))
    return 0


def run_latency(args: argparse.Namespace) -> int:
    with Session(session_options(args), name=args.name or "latency") as session:
        device = None if args.no_gpu else session.device_spec
        default = suites.host_memories(session) + ([device] if device is not None else [])
        buffer_bytes = (parse_bytes(args.buffer_bytes, what="--buffer-bytes") if args.buffer_bytes
                        else suites.latency_buffer_bytes(session))
        readers = () if args.no_cpu else tuple(args.reader_node or session.cpu_reader_nodes())
        sweep = LatencySweep(memories=_memories(args.memory, args.device) if args.memory else tuple(default),
                             cpu_nodes=readers, device=device, buffer_bytes=buffer_bytes)
        session.finish(suites.run_latency(session, sweep))
    return 0


def run_matrix(args: argparse.Namespace) -> int:
    with Session(session_options(args), name=args.name or "matrix") as session:
        device = session.device_spec
        default = suites.host_memories(session) + ([device] if device is not None else [])
        sweep = MatrixSweep(endpoints=_memories(args.endpoint, args.device) if args.endpoint else tuple(default),
                            nbytes=parse_bytes(args.size, what="--size"), engine=Engine(args.engine))
        session.finish(suites.run_matrix(session, sweep))
    return 0


def run_report(args: argparse.Namespace) -> int:
    console = Console()
    results = [read_jsonl(path) for path in args.files]
    cells = [cell for result in results for cell in result.cells]
    console.print(render_cells(cells))
    for result in results:
        for env in result.envs:
            console.print(f"fingerprint {env['fingerprint']}: {env['command']}")
    if args.compare:
        console.print(render_comparison(compare(read_jsonl(args.compare).cells, cells)))
    if args.png:
        theoretical = next((gbps for r in results for e in r.envs
                            if (gbps := fingerprint.theoretical_pcie_gbps(e["env"])) is not None), None)
        written = plot.write_png(cells, args.png, theoretical_gbps=theoretical)
        console.print(f"plot: {written}" if written else "plot: nothing to plot")
    if args.check:
        checks = run_checks(cells)
        console.print(render_checks(checks))
        return 0 if all_passed(checks) else 1
    return 0

