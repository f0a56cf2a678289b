"""``tiermem simulate``: expert-cache hit rates and modelled tokens/s, from a routing trace or for capacity planning.

Two modes:
- replay: ``tiermem simulate --trace T.npz --fraction 0.25 0.5 --policy lru lfu belady`` replays the
  trace's decode tokens through per-layer caches and prints one table; ``--predictor cooccurrence``
  adds prediction-aware eviction + prefetch, with the predictor cross-fitted by sequence halves;
- capacity planning: ``tiermem simulate --model deepseek-v3 --hbm-gib 80 --host-tier cxl`` splits HBM
  between dense weights, a reserve and expert slots, and simulates flat routing at the model's shape.
Times come from the cost model in ``tiermem.simulate.cost`` (declared or measured link profiles and
a memory-bound decode compute model), never from a GPU.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from tiermem.cli.repair import add_repair_parser
from tiermem.config import format_bytes, from_dict, to_dict
from tiermem.errors import ConfigError
from tiermem.predict import PREDICTORS, Predictor, sequence_folds
from tiermem.predict import load_trace as load_route_trace
from tiermem.residency.policies import EVICTION_POLICIES
from tiermem.simulate.capacity import CapacityPlan, decode_cost, plan_capacity
from tiermem.simulate.cost import CostModel
from tiermem.simulate.engine import CacheLifetime, SimConfig, SimResult, simulate
from tiermem.simulate.models import (
    GPUS,
    HOST_LINKS,
    MODELS,
    PAGERS,
    gpu_profile,
    host_link,
    model_for_trace,
    model_shape,
    pager_profile,
)
from tiermem.simulate.result import combine
from tiermem.simulate.trace import SimTrace, load_trace, select_sequences

GIB = 2**30
REPLAY_POLICIES = ("lru", "lfu", "belady")  # "predicted" (+ prefetch) is added by --predictor


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate expert-cache policies on a routing trace, or plan HBM capacity for a model",
        description="Replay a routing trace through per-layer HBM expert caches (hit rates, bytes moved, "
                    "modelled stall time and tokens/s), or, without --trace, estimate what a model gets from "
                    "a given HBM size with its experts on a host tier.",
    )
    parser.add_argument("--trace", help="routing trace .npz (format of ../shared/data/traces); omit to plan capacity")
    parser.add_argument("--model", choices=sorted(MODELS), help="model shapes for the cost model "
                        "(default with --trace: the model whose expert count and top-k match the trace)")
    parser.add_argument("--policy", nargs="+", default=list(REPLAY_POLICIES),
                        choices=[p for p in EVICTION_POLICIES.names() if p != "predicted"],
                        help="eviction policies to compare (belady is the oracle bound)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="decode batch sizes")
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.25, 0.5],
                        help="with --trace: fraction of each layer's experts resident in HBM")
    parser.add_argument("--warm-with-prefill", action="store_true",
                        help="with --trace: feed prompt tokens through the cache first (uncounted)")
    parser.add_argument("--lifetime", choices=[c.value for c in CacheLifetime], default=CacheLifetime.PER_BATCH.value,
                        help="with --trace: when the cache starts cold (default: per batch of sequences)")
    parser.add_argument("--only-complete-layers", action="store_true",
                        help="with --trace: drop (sequence, layer) pairs the trace marks incomplete (layer_ok)")
    parser.add_argument("--predictor", choices=PREDICTORS.names(),
                        help="with --trace: add prediction-aware eviction + prefetch with this predictor, fitted "
                             "on the other half of the sequences (seq_id parity) of each half it is tested on")
    parser.add_argument("--prefetch-distance", type=int, default=1,
                        help="with --predictor: traced layers ahead to prefetch (default 1)")
    parser.add_argument("--prefetch-experts", type=int, default=1,
                        help="with --predictor: most experts prefetched into a layer per step (default 1)")
    parser.add_argument("--hbm-gib", type=float, help="capacity planning: GPU memory in GiB (default: the GPU's)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="capacity planning: HBM kept for KV cache and activations (default 4)")
    parser.add_argument("--steps", type=int, help="capacity planning: decode steps to simulate (default: automatic)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU profile for compute time")
    parser.add_argument("--host-tier", choices=sorted(HOST_LINKS), default="dram",
                        help="where the experts live; picks the declared link profile")
    parser.add_argument("--pager", "--host-pager", dest="pager", choices=sorted(PAGERS), default="ideal",
                        help="what paging costs per layer: ideal (a host never behind the GPU), python-h100 "
                             "(tiermem's host pager, its host time as measured at batch 1 on the lent H100's host) "
                             "or device-h100 (tiermem's device pager: no host in the loop, its paging kernel's GPU "
                             "time and its copy kernel's share of the link as measured there; no prefetch)")
    parser.add_argument("--bandwidth-gbps", type=float, help="override the host link bandwidth (GB/s)")
    parser.add_argument("--latency-us", type=float, help="override the host link latency per copy (us)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result instead of tables")
    parser.set_defaults(func=run)
    scenarios = parser.add_subparsers(dest="scenario", metavar="SCENARIO",
                                      help="instead of expert caching: 'repair' (EP coverage repair)")
    add_repair_parser(scenarios)


def run(args: argparse.Namespace) -> int:
    gpu = gpu_profile(args.gpu)
    link = host_link(args.host_tier)
    if args.bandwidth_gbps is not None or args.latency_us is not None:
        link = replace(link, measured=False,
                       bandwidth_gbps=args.bandwidth_gbps if args.bandwidth_gbps is not None else link.bandwidth_gbps,
                       latency_us=args.latency_us if args.latency_us is not None else link.latency_us)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped output: do not squeeze the tables into 80 columns
    if args.trace:
        trace = load_trace(args.trace)
        model = model_shape(args.model) if args.model else model_for_trace(trace.num_experts, trace.top_k)
        pager = pager_profile(args.pager)
        if args.predictor and not pager.prefetches:
            raise ConfigError(f"simulate: --predictor adds prefetch, which the {args.pager} pager never does; drop "
                              "--predictor (compare its lru and lfu) or use --pager ideal or python-h100")
        cost = decode_cost(model, gpu, link, pager) if model is not None else None
        folds = cross_fitted(args.trace, trace, args.predictor) if args.predictor else [(trace, None)]
        results = replay(folds, replay_configs(args), cost)
        if args.json:
            for result in results:
                print(json.dumps(result_record(result)))
        else:
            console.print(replay_table(trace, results, model.name if model else None, args.host_tier, args.predictor))
        return 0
    if not args.model:
        raise ConfigError("simulate: give --trace to replay a trace, or --model (and --hbm-gib) to plan capacity")
    model = model_shape(args.model)
    hbm_bytes = int(args.hbm_gib * GIB) if args.hbm_gib is not None else gpu.hbm_bytes
    for batch in args.batch:
        plan = plan_capacity(
            model, gpu=gpu, host_tier=args.host_tier, link=link, hbm_bytes=hbm_bytes,
            reserve_bytes=int(args.reserve_gib * GIB), batch_size=batch, policies=args.policy,
            decode_steps=args.steps, pager=pager_profile(args.pager),
        )
        if args.json:
            for result in plan.results:
                print(json.dumps({"model": model.name, "host_tier": args.host_tier, **result_record(result)}))
        else:
            console.print(capacity_table(plan))
    return 0


def replay_configs(args: argparse.Namespace) -> list[SimConfig]:
    """Every (batch, fraction, policy) combination, plus prediction-aware eviction + prefetch with a predictor."""
    common = {"lifetime": CacheLifetime(args.lifetime), "warm_with_prefill": args.warm_with_prefill,
              "only_complete_layers": args.only_complete_layers}
    configs = []
    for batch in args.batch:
        for fraction in args.fraction:
            configs += [SimConfig(policy=p, resident_fraction=fraction, batch_size=batch, **common) for p in args.policy]
            if args.predictor:
                configs.append(SimConfig(
                    policy="predicted", resident_fraction=fraction, batch_size=batch, **common,
                    prefetch_distance=args.prefetch_distance, prefetch_experts_per_layer=args.prefetch_experts,
                ))
    return configs


def cross_fitted(path: str, trace: SimTrace, name: str) -> list[tuple[SimTrace, Predictor]]:
    """Two folds by seq_id parity: each half of the sequences with the predictor fitted on the other half."""
    entry = PREDICTORS.get(name)
    routes = load_route_trace(path).restrict_to_layers_with_data()
    if list(routes.layer_ids) != list(trace.layers):
        raise ConfigError(
            f"simulate: the predictor's view of {path!r} has layers {list(routes.layer_ids)}, the simulator's "
            f"{list(trace.layers)}; the trace's 'layers' key must list exactly the layers holding data"
        )
    return [
        (select_sequences(trace, test.sequence_ids.tolist()), entry.factory(from_dict(entry.config_cls, {}), train))
        for train, test in sequence_folds(routes, 2)
    ]


def replay(folds: Sequence[tuple[SimTrace, Predictor | None]], configs: Sequence[SimConfig],
           cost: CostModel | None) -> list[SimResult]:
    """Each config over every fold (the predictor only where the config predicts), combined per config."""
    return [
        combine([simulate(part, config, predictor=predictor if config.prefetch_distance else None, cost=cost)
                 for part, predictor in folds])
        for config in configs
    ]


def _label(config: SimConfig) -> str:
    if not config.prefetch_distance:
        return config.policy
    return f"{config.policy} + prefetch d={config.prefetch_distance} k={config.prefetch_experts_per_layer}"


def result_record(result: SimResult) -> dict:
    """A flat JSON-ready record of one result."""
    record = {
        "trace": result.trace, **to_dict(result.config), "slots_per_layer": result.slots_per_layer,
        "hit_rate": result.hit_rate, "on_time_hit_rate": result.on_time_hit_rate,
        "mean_layer_hit_rate": result.mean_layer_hit_rate,
        "per_layer_hit_rate": {s.layer: s.hit_rate for s in result.per_layer},
        "steps": result.steps, "tokens": result.tokens, "demand_loads": result.demand_loads,
        "prefetch_loads": result.prefetch_loads, "prefetch_cancelled": result.prefetch_cancelled,
        "late_hits": result.late_hits,
        "prefetch_precision": result.prefetch_precision,
    }
    if result.timing is not None:
        t = result.timing
        record |= {"elapsed_s": t.elapsed_s, "stall_s": t.stall_s, "compute_s": t.compute_s,
                   "bytes_moved": t.bytes_moved, "step_time_s": t.step_time_s, "tokens_per_s": t.tokens_per_s,
                   "link_utilisation": t.link_utilisation}
    return record


def _gap_closed(result: SimResult, group: Sequence[SimResult]) -> str:
    """Fraction of the LRU -> oracle hit-rate gap this policy closes, when both are in the group."""
    by_policy = {r.config.policy: r.hit_rate for r in group}
    if "lru" not in by_policy or "belady" not in by_policy or by_policy["belady"] <= by_policy["lru"]:
        return "-"
    return f"{(result.hit_rate - by_policy['lru']) / (by_policy['belady'] - by_policy['lru']):.2f}"


def _timing_cells(result: SimResult, lru: SimResult | None) -> list[str]:
    t = result.timing
    if t is None:
        return ["-"] * 5
    speedup = f"{t.tokens_per_s / lru.timing.tokens_per_s:.2f}x" if lru and lru.timing and lru.timing.tokens_per_s else "-"
    return [format_bytes(t.bytes_moved / max(t.tokens, 1)), f"{t.stall_s / t.elapsed_s:.0%}" if t.elapsed_s else "-",
            f"{t.step_time_s * 1e3:.2f}", f"{t.tokens_per_s:.1f}", speedup]


def _add_rows(table: Table, results: Sequence[SimResult], lead: list[str]) -> None:
    lru = next((r for r in results if r.config.policy == "lru"), None)
    for i, result in enumerate(results):
        on_time = f"{result.on_time_hit_rate:.3f}" if result.timing is not None else "-"
        table.add_row(*(lead if i == 0 else [""] * len(lead)), _label(result.config), f"{result.hit_rate:.3f}",
                      on_time, _gap_closed(result, results), str(result.demand_loads), *_timing_cells(result, lru))


def _table(title: str, lead: list[str], caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for name in (*lead, "policy", "hit rate", "on time", "gap closed", "misses",
                 "moved/token", "stall", "step ms", "tokens/s", "vs LRU"):
        table.add_column(name, justify="left" if name == "policy" else "right", no_wrap=True)
    return table


def replay_table(trace: SimTrace, results: Sequence[SimResult], model: str | None, host_tier: str,
                 predictor: str | None) -> Table:
    """One table: rows grouped by (batch, fraction); gap closed = (hit - LRU) / (oracle - LRU).

    "hit rate" counts experts resident or in flight when their layer is routed (the issue's measure);
    "on time" only those already landed (the rest made the layer wait, counted in "stall").
    """
    caption = (f"decode tokens; {len(trace.layers)} of {trace.num_layers} layers traced"
               + (f"; predictor {predictor!r} fitted on the other half of the sequences" if predictor else "")
               + (f"; times: {model} shapes, experts on {host_tier}, over the traced layers only" if model
                  else "; no model matches this trace: pass --model for times"))
    table = _table(f"expert cache simulation: {trace.model}", ["batch", "resident"], caption)
    groups: dict[tuple[int, float], list[SimResult]] = {}
    for result in results:
        groups.setdefault((result.config.batch_size, result.config.resident_fraction), []).append(result)
    for (batch, fraction), group in groups.items():
        _add_rows(table, group, [str(batch), f"{fraction:.0%} ({group[0].slots_per_layer})"])
        timing = group[0].timing
        if timing is not None and timing.compute_s > 0:
            table.add_row("", "", "all in HBM", "1.000", "1.000", "", "0", "0 B", "0%",
                          f"{timing.compute_s / timing.steps * 1e3:.2f}", f"{timing.tokens / timing.compute_s:.1f}", "")
        table.add_section()
    return table


def capacity_table(plan: CapacityPlan) -> Table:
    model = plan.model
    link = plan.link
    label = "measured" if link.measured else "declared"
    caption = (f"HBM {format_bytes(plan.hbm_bytes)} = dense {format_bytes(model.dense_bytes)} + reserve "
               f"{format_bytes(plan.reserve_bytes)} + experts {format_bytes(plan.expert_budget_bytes)}; "
               f"{plan.host_tier} holds {format_bytes(plan.host_bytes)} of experts over a {label} "
               f"{link.bandwidth_gbps:g} GB/s, {link.latency_us:g} us link; flat routing, decode memory-bound "
               f"on {plan.gpu.name} ({plan.gpu.note})")
    table = _table(f"capacity plan: {model.name} ({model.hf_id}), batch {plan.batch_size}", ["resident"], caption)
    _add_rows(table, plan.results, [f"{plan.resident_fraction:.1%} ({plan.slots_per_layer}/{model.num_experts})"])
    table.add_row("", "all in HBM (bound)", "1.000", "1.000", "", "0", "0 B", "0%", "",
                  f"{plan.all_resident_tokens_per_s:.1f}", "")
    return table
