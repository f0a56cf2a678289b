"""``tiermem simulate repair``: modelled EP coverage repair of DeepSeek-V3-sized deployments, per source mix.

For each rank count and source mix, one row: the gaps a failure opens, the bytes the repair moves
and over which routes, the modelled time until full coverage and its bottleneck link, how long
serving runs degraded (assumed detection + re-formation + repair), and the modelled reintegration of
the failed ranks, beside the EEP paper's figures (11 s recovery pause, 8 s reintegration) and the
full-restart baseline (348 s unavailable). ``--json`` prints one JSON object per row instead.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tiermem.config import from_dict, load_toml
from tiermem.repair.fabric import FabricConfig, Route
from tiermem.repair.scenario import (
    EEP_RECOVERY_PAUSE_S,
    EEP_REINTEGRATION_S,
    FULL_RESTART_UNAVAILABLE_S,
    SOURCE_MIXES,
    ExpertDtype,
    Failure,
    ScenarioConfig,
    ScenarioResult,
    home_placement,
    run_scenario,
    synthetic_load,
)

_ROUTE_LABELS = {
    Route.NVLINK: "nvlink", Route.GPU_RDMA: "gpu-rdma", Route.LOCAL_DRAM: "dram", Route.LOCAL_CXL: "cxl",
    Route.RDMA_DRAM: "rdma-dram", Route.RDMA_CXL: "rdma-cxl", Route.CXL_POOL: "pool", Route.DISK: "disk",
}


def add_repair_parser(simulate_subparsers: argparse._SubParsersAction) -> None:
    parser = simulate_subparsers.add_parser(
        "repair", help="modelled EP coverage repair of DeepSeek-V3 deployments, per source mix",
        description="Fail one GPU (or a node) of a DeepSeek-V3 deployment over 32/64/256 ranks, plan the repair "
                    "from each mix of backup sources with the bandwidth-aware planner, and compare the modelled "
                    "time to full coverage with the EEP paper and a full restart. Data movement is modelled "
                    "(fluid link model); detection and re-formation times are inputs.",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 256], help="EP sizes (default: 32 64 256)")
    parser.add_argument("--mix", nargs="+", choices=[m.name for m in SOURCE_MIXES],
                        default=[m.name for m in SOURCE_MIXES], help="backup source mixes (default: all)")
    parser.add_argument("--failure", choices=[f.value for f in Failure], default=Failure.GPU.value,
                        help="gpu: rank 0 dies, its host memory survives; node: node 0 and its host memory")
    parser.add_argument("--dtype", choices=[d.value for d in ExpertDtype], default=ExpertDtype.FP8.value,
                        help="expert weights: fp8 (44 MB per expert) or bf16 (88 MB)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers modelled (default: DeepSeek-V3's 58)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--redundant-slots", type=int, default=1, help="redundant expert slots per rank and layer")
    parser.add_argument("--detect-s", type=float, default=1.0, help="assumed failure detection time (default 1 s)")
    parser.add_argument("--reform-s", type=float, default=0.0,
                        help="assumed communicator re-formation time (default 0: an elastic EP backend masks the rank)")
    parser.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the synthetic expert load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fabric", help="TOML file overriding link profiles (keys of tiermem.repair.FabricConfig)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fabric = from_dict(FabricConfig, load_toml(args.fabric)) if args.fabric else FabricConfig()
    mixes = [m for m in SOURCE_MIXES if m.name in args.mix]
    results = []
    for ranks in args.ranks:
        config = ScenarioConfig(
            num_ranks=ranks, num_moe_layers=args.layers, gpus_per_node=args.gpus_per_node,
            redundant_slots_per_rank=args.redundant_slots,
            dtype=ExpertDtype(args.dtype), failure=Failure(args.failure), load_skew=args.skew, seed=args.seed,
            detect_s=args.detect_s, reform_s=args.reform_s,
        )
        load = synthetic_load(config)
        home = home_placement(config, load)
        results += [run_scenario(config, mix, fabric, load=load, home=home) for mix in mixes]
    if args.json:
        for result in results:
            print(json.dumps(_row(result)))
    else:
        Console().print(_table(results, args))
    return 0


def _row(result: ScenarioResult) -> dict:
    repair, back = result.repair, result.reintegration
    return {
        "ranks": result.config.num_ranks, "failure": result.config.failure.value, "mix": result.mix.name,
        "dtype": result.config.dtype.value, "expert_bytes": result.config.expert_bytes, "gaps": result.gaps,
        "unfilled": len(repair.unfilled), "repair_bytes": repair.nbytes,
        "repair_bytes_by_route": {r.value: n for r, n in repair.bytes_by_route().items()},
        "repair_s": repair.makespan_s, "repair_bottleneck": str(repair.bottleneck) if repair.bottleneck else None,
        "degraded_s": result.degraded_s, "detect_s": result.config.detect_s, "reform_s": result.config.reform_s,
        "reintegration_s": back.makespan_s, "reintegration_bytes": back.nbytes,
        "reintegration_unfilled": len(back.unfilled), "eep_pause_s": EEP_RECOVERY_PAUSE_S,
        "eep_reintegration_s": EEP_REINTEGRATION_S, "full_restart_s": FULL_RESTART_UNAVAILABLE_S,
        "planner_wall_s": result.plan_wall_s,
    }


def _seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def _routes(result: ScenarioResult) -> str:
    by_route = sorted(result.repair.bytes_by_route().items(), key=lambda kv: -kv[1])
    return " ".join(f"{_ROUTE_LABELS[r]} {n / 1e9:.1f}" for r, n in by_route) or "-"


def _table(results: Sequence[ScenarioResult], args: argparse.Namespace) -> Table:
    first = results[0].config
    table = Table(
        title=f"EP coverage repair, DeepSeek-V3 ({first.num_moe_layers} MoE layers x 256 experts, {first.dtype.value} "
              f"{first.expert_bytes / 1e6:.0f} MB/expert), one {first.failure.value} failed",
        caption=f"Modelled data movement (fluid link model); degraded = detection {args.detect_s:g} s (assumed) + "
                f"re-formation {args.reform_s:g} s (assumed) + repair. EEP (paper): {EEP_RECOVERY_PAUSE_S:g} s "
                "recovery "
                f"pause, {EEP_REINTEGRATION_S:g} s reintegration; full restart: {FULL_RESTART_UNAVAILABLE_S:g} s "
                "unavailable. Serving continues during repair with gap experts dropped (renormalised top-k).",
    )
    for name, justify in (("ranks", "right"), ("source mix", "left"), ("gaps", "right"), ("GB by route", "left"),
                          ("repair", "right"), ("bottleneck", "left"), ("degraded", "right"), ("vs EEP 11 s", "right"),
                          ("vs restart", "right"), ("reintegration", "right"), ("vs EEP 8 s", "right")):
        table.add_column(name, justify=justify)
    for result in results:
        repair = result.repair
        gaps = f"{result.gaps}" + (f" ([red]{len(repair.unfilled)} unfilled[/red])" if repair.unfilled else "")
        back = _seconds(result.reintegration.makespan_s)
        if result.reintegration.unfilled:
            back += f" ([red]{len(result.reintegration.unfilled)} unfilled[/red])"
        table.add_row(
            str(result.config.num_ranks), result.mix.name, gaps, _routes(result), _seconds(repair.makespan_s),
            escape(str(repair.bottleneck)) if repair.bottleneck else "-", _seconds(result.degraded_s),
            f"{EEP_RECOVERY_PAUSE_S / result.degraded_s:.1f}x",
            f"{FULL_RESTART_UNAVAILABLE_S / result.degraded_s:.0f}x",
            back, f"{EEP_REINTEGRATION_S / max(result.reintegration.makespan_s, 1e-9):.0f}x",
        )
    return table
