"""``tiermem bench moe``: replay routing traces through real-shaped expert layers, offloaded vs all in HBM.

For each workload (expert shape x routing trace), resident fraction and decode batch, one run per
mode (``--rounds N``: N runs per offloaded mode, interleaved in an order rotated each round, each
reporting its median round with every round's tokens/s beside it), all in one process, on the same
store and steps:

| mode      | what                                                                           |
|-----------|--------------------------------------------------------------------------------|
| all_hbm   | every expert resident (warmed before timing): the upper bound, compute only    |
| lru       | on-demand fetch, LRU eviction (SGLang paged experts, mixtral-offloading)        |
| lfu       | on-demand fetch, LFU eviction (MoE-Infinity)                                    |
| tiermem   | prediction-aware eviction + prefetch (``--predictor``, cross-fitted)            |
| device_lru| on-demand LRU paged on the GPU (``pager="device"``): no host sync per layer     |
|           | where its pairs fit its slot group (batch x top-k <= slots), else one, and waves |
| device_tiermem | the device pager evicting by the cross-fitted co-occurrence step table     |
|           | (``policy="predicted"``), at batch 1 (one step table per step) with a predictor |
| device_pipelined | device_lru with pipelined waves (``device_pipelined_waves``): a layer in    |
|           | waves runs waves of half its slots, wave w+1's copies beside wave w's compute  |

Steps are the simulator's (``tiermem.simulate``): static batches of whole sequences, step-aligned,
each batch starting with a cold cache; the simulator's LRU/LFU/Belady hit rates on the very same
sequences are reported beside the measured ones, and tiermem's share of the LRU -> Belady gap.
Real traces name their experts and top-k; the layer shape (hidden, intermediate) comes from the
named model config. Weights are random, generated on the device and copied down (never CPU RNG).
Raw pinned ``copy_`` bandwidth, measured in the same run, is the denominator of transfer efficiency.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tiermem.bench.moe_report import print_summary, print_table
from tiermem.bench.moe_workloads import (
    CrossFitted,
    ExpertShape,
    Workload,
    batch_steps,
    recorded_router_inputs,
    workloads,
)
from tiermem.experts.layout import ExpertLayout
from tiermem.experts.placement import single_tier
from tiermem.experts.runtime import ExpertCompute, ExpertRuntime, OffloadConfig, Pager
from tiermem.experts.store import ExpertStore
from tiermem.manager import ManagerConfig, TierManager
from tiermem.predict import PREDICTORS
from tiermem.prefetch.prefetcher import PrefetchConfig
from tiermem.simulate.engine import SimConfig, simulate
from tiermem.simulate.steps import Step
from tiermem.simulate.trace import SimTrace
from tiermem.transfer.uva_copy import BlockCopier

log = logging.getLogger("tiermem.bench")

MODES = ("all_hbm", "lru", "lfu", "tiermem", "device_lru", "device_tiermem", "device_pipelined")
DEVICE_MODES = ("device_lru", "device_tiermem", "device_pipelined")


def build_store(manager: TierManager, shape: ExpertShape, layers: tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> ExpertStore:
    """A store of random experts (bf16 N(0, 0.02)), generated on ``device`` and copied to the dram tier."""
    layout = ExpertLayout.build([("gate_up", (2 * shape.intermediate, shape.hidden), dtype),
                                 ("down", (shape.hidden, shape.intermediate), dtype)])
    store = ExpertStore(manager, layout=layout, layers=layers, num_experts=shape.num_experts,
                        placement=single_tier("dram", len(layers), shape.num_experts))
    generator = torch.Generator(device=device).manual_seed(0)
    for layer in layers:
        for expert in range(shape.num_experts):
            tensors = {t.name: torch.randn(t.shape, generator=generator, device=device, dtype=dtype) * 0.02
                       for t in layout.tensors}
            store.write(layer, expert, tensors)
    return store


def run_mode(store: ExpertStore, work: Workload, steps: list[Step], *, mode: str, fraction: float, batch: int,
             device: torch.device, prefetch: PrefetchConfig, compute: ExpertCompute = ExpertCompute.GROUPED,
             cuda_graphs: bool = True, predictor: CrossFitted | None = None) -> dict[str, Any]:
    """Replay ``steps`` through one runtime; returns the record of the run. ``predictor`` serves tiermem mode
    (without one, tiermem mode is LFU without prefetch)."""
    shape = work.shape
    predictor = predictor if mode in ("tiermem", "device_tiermem") else None
    policy = {"all_hbm": "lru", "lru": "lru", "lfu": "lfu", "tiermem": "predicted" if predictor else "lfu",
              "device_lru": "lru", "device_tiermem": "predicted", "device_pipelined": "lru"}[mode]
    config = OffloadConfig(resident_fraction=1.0 if mode == "all_hbm" else fraction, policy=policy,
                           prefetch=prefetch if predictor else PrefetchConfig(distance=0), time_host_phases=True,
                           compute=compute, cuda_graphs=cuda_graphs,
                           pager=Pager.DEVICE if mode in DEVICE_MODES else Pager.HOST,
                           device_pipelined_waves=mode == "device_pipelined")
    runtime = ExpertRuntime(store, config, device=device, top_k=shape.top_k, predictor=predictor)
    router_inputs = recorded_router_inputs(work, steps) if predictor is not None and mode == "tiermem" else None
    # the routing of every step on the device before the timed loop, as a model's routers leave it there:
    # each layer's routing then reaches the host through the runtime's one wait on the GPU per layer
    indices = [[torch.from_numpy(step.experts[:, layer].astype(np.int64)).to(device) for layer in store.layers]
               for step in steps]
    hidden = torch.randn(batch, shape.hidden, device=device, dtype=store.layout.tensors[0].dtype)
    weights = torch.full((batch, shape.top_k), 1.0 / shape.top_k, device=device, dtype=hidden.dtype)
    if mode == "all_hbm":
        _warm_all(runtime, store, hidden, weights)
    for rows in sorted({len(step.rows) for step in steps}):  # graph captures stay out of the timed loop
        runtime.capture_graphs(hidden[:rows], weights[:rows], F.silu)
    runtime.phases.reset()
    _sync(device)
    began = time.perf_counter()
    tokens = 0
    for i, step in enumerate(steps):
        rows = len(step.rows)
        if predictor is not None:
            predictor.seqs = np.asarray(step.seqs)
        for position, layer in enumerate(store.layers):
            runtime.run_layer(layer, hidden[:rows], indices[i][position], weights[:rows], F.silu,
                              router_input=router_inputs[i][position] if router_inputs else None)
        tokens += rows
    _sync(device)
    elapsed = time.perf_counter() - began
    stats = runtime.stats()
    runtime.close()
    moved = stats["demand_bytes"] + stats["prefetch_bytes"]
    return {"mode": mode, "policy": policy, "pager": stats["pager"], "predictor": predictor.name if predictor else None,
            "pipelined_waves": config.device_pipelined_waves,
            "compute": compute.value, "elapsed_s": elapsed, "steps": len(steps), "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / len(steps), "bytes_moved": moved,
            "bytes_per_step": moved / len(steps), **{k: stats[k] for k in (
                "hit_rate", "demands", "hits", "late", "misses", "extra_waves", "prefetch_loads", "prefetch_used",
                "prefetch_capped", "predictions_skipped", "prefetch_precision", "prefetch_recall", "stall_s",
                "slots_per_group", "hbm_bytes", "demand_bytes", "host_us_per_layer", "graphs_captured",
                "graph_replays")}}


def median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tokens/s (the lower one of an even count), with every round's tokens/s."""
    ranked = sorted(rounds, key=lambda run: run["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "round_tokens_per_s": [run["tokens_per_s"] for run in rounds]}


def simulated_hit_rates(trace: SimTrace, fraction: float, batch: int) -> dict[str, float]:
    """The simulator's LRU, LFU and Belady (oracle) hit rates on the same steps."""
    return {f"sim_{p}": simulate(trace, SimConfig(policy=p, resident_fraction=fraction, batch_size=batch)).hit_rate
            for p in ("lru", "lfu", "belady")}


def copy_bandwidth_gbps(manager: TierManager, device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Raw pinned host-to-device ``copy_`` bandwidth (best of ``repeats``), the physical ceiling."""
    host = manager.empty(nbytes, tier="dram")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    manager.free(host)
    return best


def expert_load_gbps(store: ExpertStore, device: torch.device, count: int, per_submit: int, repeats: int = 5) -> float:
    """Bandwidth of ``count`` back-to-back expert loads as the prefetcher issues them: one submit per
    ``per_submit`` experts (a layer's misses), one copy and one completion event per expert; best of
    ``repeats``, as the raw copy it is compared with (a single pass paid the first workload's one-time costs:
    0.72-0.82 of raw for Qwen1.5, measured first, against 0.90-0.98 for DeepSeek-V2-Lite's same-sized experts)."""
    keys = [store.key_at(i % len(store.layers), i % store.num_experts) for i in range(count)]
    slots = torch.empty((count, store.layout.block_bytes), dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        handles = [store.manager.copy([(store.home(keys[i]), slots[i])
                                       for i in range(first, min(first + per_submit, count))])
                   for first in range(0, count, per_submit)]
        for handle in handles:
            handle.wait()
        best = max(best, count * store.layout.block_bytes / (time.perf_counter() - began) / 1e9)
    return best


def device_load_gbps(store: ExpertStore, device: torch.device, count: int, repeats: int = 5) -> float:
    """Bandwidth of the device pager's copy kernel: ``count`` experts read from their homes by one launch,
    timed by CUDA events (best of ``repeats``), for comparison with the raw copy engine."""
    keys = [store.key_at(i % len(store.layers), i % store.num_experts) for i in range(count)]
    slots = torch.empty((count, store.layout.block_bytes), dtype=torch.uint8, device=device)
    copier = BlockCopier([[store.home(key) for key in keys]], [slots])
    rows, counted = torch.arange(count, device=device), torch.tensor([count], device=device)
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copier.copy(0, rows, rows, counted)
        end.record()
        end.synchronize()
        best = max(best, count * store.layout.block_bytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def _warm_all(runtime: ExpertRuntime, store: ExpertStore, hidden: torch.Tensor, weights: torch.Tensor) -> None:
    """Load every expert once (all slots) so that the timed replay never copies."""
    k = runtime.top_k
    for layer in store.layers:
        for first in range(0, store.num_experts, k):
            ids = [(first + j) % store.num_experts for j in range(k)]
            index = torch.tensor([ids], dtype=torch.int64, device=hidden.device)
            runtime.run_layer(layer, hidden[:1], index, weights[:1], F.silu)
    runtime.prefetcher.drain()
    runtime.reset_stats()


def _subset(trace: SimTrace, seqs: list[int]) -> SimTrace:
    rows = np.isin(trace.seq_id, seqs)
    return replace(trace, experts=trace.experts[rows], seq_id=trace.seq_id[rows], phase=trace.phase[rows])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the suite ---------------------------------------------------------------------------------
DEFAULT_WORKLOADS = ("qwen1.5-moe-a2.7b@qwen", "qwen3-30b-a3b@qwen", "mixtral-8x7b@mixtral", "deepseek-v2-lite@uniform")
QUICK_WORKLOADS = ("qwen1.5-moe-a2.7b@qwen",)
PREFETCH_MIN_SCORE = 0.0  # co-occurrence scores are not calibrated probabilities (top-2 precision ~0.55 at batch 1)


def run_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run of the suite; returns (and writes, one JSON line each) the records."""
    device = torch.device(args.device)
    if args.rounds < 1:
        raise SystemExit(f"tiermem bench moe: --rounds must be at least 1, got {args.rounds}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tiermem bench moe: --device cuda but CUDA is not available; use --device cpu for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sink = (out / "moe.jsonl").open("w")
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        sink.write(json.dumps(record) + "\n")
        sink.flush()
        log.info("%s", record)

    raw_gbps = None
    compute = ExpertCompute(args.compute)
    for work in workloads(Path(args.traces_dir), args.workloads, args.quick):
        layers = work.trace.layers
        nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
        manager = TierManager(ManagerConfig.from_dict({"tiers": [  # the store, plus room for arena tails
            {"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
        if device.type == "cuda":  # on the fresh tier, before the store fragments it; freed again at once
            raw_gbps = copy_bandwidth_gbps(manager, device, 1 << 30)
        began = time.perf_counter()
        store = build_store(manager, work.shape, layers, device, dtype)
        header = {"kind": "workload", "workload": work.name, "layers": list(layers), "shape": work.shape.__dict__,
                  "expert_bytes": store.layout.block_bytes, "store_bytes": store.nbytes,
                  "fill_s": time.perf_counter() - began}
        if device.type == "cuda":
            count = min(64, len(layers) * work.shape.num_experts, max(4, (4 << 30) // store.layout.block_bytes))
            loads_gbps = expert_load_gbps(store, device, count, per_submit=work.shape.top_k)
            header.update(raw_copy_gbps=raw_gbps, expert_load_gbps=loads_gbps, transfer_efficiency=loads_gbps / raw_gbps)
            if "device_lru" in args.modes:
                kernel_gbps = device_load_gbps(store, device, count)
                header.update(device_load_gbps=kernel_gbps, device_transfer_efficiency=kernel_gbps / raw_gbps)
        prefetch = PrefetchConfig(distance=args.prefetch_distance, objects_per_layer=args.prefetch_experts,
                                  min_score=args.prefetch_min_score, link_gbps=raw_gbps)
        emit(header)
        predictor = CrossFitted(work.routes, args.prefetch_distance, args.predictor) \
            if {"tiermem", "device_tiermem"} & set(args.modes) and work.routes is not None else None
        for batch in args.batches:
            steps, seqs = batch_steps(work.trace, batch, args.max_steps if batch == 1 else max(args.max_steps // 4, 8))
            compute_only = None
            if "all_hbm" in args.modes:
                compute_only = run_mode(store, work, steps, mode="all_hbm", fraction=1.0, batch=batch, device=device,
                                        prefetch=prefetch, compute=compute, cuda_graphs=args.cuda_graphs)
                emit({"kind": "run", "workload": work.name, "batch": batch, "fraction": 1.0, **compute_only})
            for fraction in args.fractions:
                has_step = batch == 1 and predictor is not None and all(hasattr(m, "step") for m in predictor.models)
                rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes if m != "all_hbm" and (
                    m != "device_tiermem" or has_step)}
                modes = list(rounds)
                for r in range(args.rounds):  # modes interleaved and rotated: each leads a round in turn, so host
                    # jitter, and a drift within a round, fall on every mode alike
                    for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                        rounds[mode].append(run_mode(store, work, steps, mode=mode, fraction=fraction, batch=batch,
                                                     device=device, prefetch=prefetch, compute=compute,
                                                     cuda_graphs=args.cuda_graphs, predictor=predictor))
                runs = {mode: median_run(done) for mode, done in rounds.items()}
                for run in runs.values():
                    emit({"kind": "run", "workload": work.name, "batch": batch, "fraction": fraction,
                          **_checks(run, compute_only, raw_gbps)})
                emit(_summary(work, batch, fraction, runs, simulated_hit_rates(_subset(work.trace, seqs), fraction, batch)))
        store.close()
        manager.close()
    sink.close()
    return records


def _checks(run: dict[str, Any], compute_only: dict[str, Any] | None, raw_gbps: float | None) -> dict[str, Any]:
    """Link utilisation and the overlap check: step time vs max(compute-only, moved bytes / peak)."""
    if raw_gbps is None or compute_only is None:
        return run
    transfer_s = run["bytes_per_step"] / (raw_gbps * 1e9)
    bound = max(compute_only["step_time_s"], transfer_s)
    return {**run, "link_utilisation": run["bytes_moved"] / run["elapsed_s"] / (raw_gbps * 1e9),
            "overlap_bound_s": bound, "overlap_ratio": run["step_time_s"] / bound,
            "overlap_ok": run["step_time_s"] <= 1.15 * bound}


def _summary(work: Workload, batch: int, fraction: float, runs: dict[str, dict[str, Any]],
             simulated: dict[str, float]) -> dict[str, Any]:
    """Per (workload, batch, fraction): hit rates vs the bounds, gap closed, tokens/s ratio."""
    record: dict[str, Any] = {"kind": "summary", "workload": work.name, "batch": batch, "fraction": fraction,
                              **simulated, **{f"{m}_hit_rate": r["hit_rate"] for m, r in runs.items()},
                              **{f"{m}_tokens_per_s": r["tokens_per_s"] for m, r in runs.items()}}
    if "tiermem" in runs and "lru" in runs:
        gap = simulated["sim_belady"] - runs["lru"]["hit_rate"]
        record["gap_closed"] = (runs["tiermem"]["hit_rate"] - runs["lru"]["hit_rate"]) / gap if gap > 0 else None
        record["tokens_per_s_vs_lru"] = runs["tiermem"]["tokens_per_s"] / runs["lru"]["tokens_per_s"]
        record["round_tokens_per_s_vs_lru"] = [t / lru for t, lru in zip(runs["tiermem"]["round_tokens_per_s"],
                                                                         runs["lru"]["round_tokens_per_s"])]
    for mode in (m for m in DEVICE_MODES if m in runs and "lru" in runs):
        record[f"{mode}_vs_lru"] = runs[mode]["tokens_per_s"] / runs["lru"]["tokens_per_s"]
        record[f"round_{mode}_vs_lru"] = [t / lru for t, lru in zip(runs[mode]["round_tokens_per_s"],
                                                                    runs["lru"]["round_tokens_per_s"])]
    if "device_tiermem" in runs and "lru" in runs:
        gap = simulated["sim_belady"] - runs["lru"]["hit_rate"]
        record["device_tiermem_gap_closed"] = (runs["device_tiermem"]["hit_rate"] - runs["lru"]["hit_rate"]) / gap \
            if gap > 0 else None
    return record


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every run of the suite takes (prefetch, compute, predictor, graphs); ``bench/moe_h100.py`` too."""
    parser.add_argument("--prefetch-distance", type=int, default=1, help="MoE layers ahead tiermem prefetches")
    parser.add_argument("--prefetch-experts", type=int, default=2, help="experts tiermem may prefetch per layer")
    parser.add_argument("--prefetch-min-score", type=float, default=PREFETCH_MIN_SCORE,
                        help="prefetch only experts with more expected uses in the batch than this")
    parser.add_argument("--compute", choices=[c.value for c in ExpertCompute], default=ExpertCompute.GROUPED.value,
                        help="expert compute of every mode: grouped (two grouped GEMMs per layer) or loop (per expert)")
    parser.add_argument("--predictor", choices=PREDICTORS.names(), default="cooccurrence",
                        help="tiermem mode's predictor, fitted on the other half of the sequences of each row")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per offloaded mode, interleaved in an order rotated each round; each mode "
                             "reports its median-tokens/s round")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="launch every grouped layer eagerly instead of replaying its CUDA graph (every mode)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``tiermem bench moe``: register the subcommand on the ``bench`` subparsers."""
    parser = subparsers.add_parser("moe", help="replay routing traces through offloaded expert layers (GPU)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces-dir", default=".traces", help="folder of the shared .npz routing traces")
    parser.add_argument("--workloads", nargs="+", default=None,
                        help=f"shape@trace names (trace: qwen, mixtral, uniform); default {list(DEFAULT_WORKLOADS)}")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="resident fractions (0.25 0.5)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="decode batch sizes (1 8 64)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-steps", type=int, default=None, help="decode steps per batch-1 run (others: a quarter)")
    add_run_options(parser)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--out", default="tiermem-results/moe", help="output folder (moe.jsonl)")
    parser.add_argument("--quick", action="store_true", help="one workload, one fraction, batches 1 and 8, few steps")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.workloads = args.workloads or list(QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    args.fractions = args.fractions or ([0.25] if args.quick else [0.25, 0.5])
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    args.max_steps = args.max_steps or (40 if args.quick else 240)
    records = run_suite(args)
    print_table(records)
    print_summary(records)
    return 0
