"""``tiermem bench engram``: Engram lookups from a host-tier table vs an HBM-resident one, in a decode step.

For each shape, the Engram tables are filled with a cheap deterministic pattern (generated on the
GPU, never with CPU random numbers), placed once in pinned host memory (the ``dram`` tier of a
TierManager) and once in HBM. The rows each host variant gathers are first checked equal to the
resident rows (decode batch and a prefill chunk); only then is anything timed. Per decode batch:

| record     | what                                                                            |
|------------|---------------------------------------------------------------------------------|
| cache      | per cache fraction and layer: rows cached, HBM bytes (rows + row map), profiling |
| batch      | rows per step and distinct rows among them (hashed on the host, off the clock)   |
| lookup     | tokens known -> rows ready, alone: eager (launches included) and CUDA-graph      |
|            | time; rows per step read from the table (requested, or distinct where the path   |
|            | de-duplicates, less cache hits)                                                  |
| cache_hits | per cached variant, batch and layer: share of probed rows served from HBM (the   |
|            | fused kernel probes every requested row; de-duplicating paths each distinct row) |
| step       | a whole decode step, eager (one sync per step, stall per Engram layer) and graph |
| verdict    | step-time overhead vs the resident table, against the target (<= 2% at <= 256)  |

Token streams (``engram_stream``): with ``--corpus DIR`` every decode step gives each sequence the
next token of a real document (odd documents of the corpus), and hot-row caches are chosen from the
even documents, so no measured text was profiled; without it, uniform random ids (records say
which in ``stream``).

Variants (``--methods``) fix how a host table is read, whatever ``auto`` would pick: ``uva`` (one
fused hash + gather kernel per layer on a few CTAs), ``uva-high`` (the same on a high-priority side
stream), ``uva-burst`` (the same, high priority, one CTA per block of rows: the whole GPU for a short
burst instead of a few SMs for long, since a one-wave GEMM that finds one SM busy runs a second wave),
``uva-unfused`` (the first run's path: torch hashing, sort-based de-duplication, a gather
kernel over the whole GPU), ``staged`` (CPU gather into pinned staging + one copy). Variants
ending in ``-cache`` add an HBM hot-row cache per layer (``HotRowCache``, probed inside the fused
kernel; ``staged-cache`` takes hits out on the host plan) of each ``--cache-fractions`` of a
layer's rows, named ``<variant>@<fraction>``; they need ``--corpus``. ``resident`` (the
baseline) uses the fused kernel on the HBM table, ``none`` is the backbone without Engram. Methods
alternate within each of three rounds, so drift of clocks or host load hits all alike. The run ends
with a table of verdicts and one of cache hit rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from tiermem.bench.engram_model import (
    SHAPES,
    VOCAB,
    Backbone,
    Captured,
    Shape,
    eager_steps,
    lookup_alone,
    percentile,
    scaled,
)
from tiermem.bench.engram_report import ACCEPT_MAX_BATCH, ACCEPT_MAX_OVERHEAD_PCT, Results, hit_table, verdict_table
from tiermem.bench.engram_stream import Corpus, CorpusStream, RandomStream
from tiermem.bench.engram_variants import (
    VARIANTS,
    build_cache_sets,
    build_tables,
    capturable,
    check_rows,
    ids_for,
    make_lookups,
)
from tiermem.engram import EngramLookup, GatherMethod, NgramHasher, TableLayout
from tiermem.errors import TierMemError
from tiermem.manager import TierManager

ROUNDS = 3
PRESETS = {  # table fraction, model divisor, batches, timed steps, warm-up steps
    "full": (1.0, 1, (1, 8, 32, 64, 128, 256, 512), 60, 8),
    "quick": (1 / 16, 1, (1, 64, 256), 15, 3),
    "smoke": (1 / 4096, 32, (1, 4), 2, 1),
}


def run_shape(shape: Shape, args: argparse.Namespace, device: torch.device, out: Results) -> None:
    hasher = NgramHasher(shape.hash)
    row_bytes = TableLayout(1, shape.row_dim, shape.row_format).row_bytes
    table_bytes = sum(hasher.rows_for_layer(layer) for layer in shape.hash.layer_ids) * row_bytes
    stream = CorpusStream(args.corpus) if args.corpus is not None else RandomStream(VOCAB)
    with TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": table_bytes + (1 << 30)}]}) as tm:
        host, resident = build_tables(shape, hasher, tm, device, out)
        caches = build_cache_sets(shape, hasher, host, args, device, out)
        lookups = make_lookups(hasher, host, resident, caches, args, device, out, shape)
        good = check_rows(shape, lookups, max(args.batches), stream, device, out)
        model = Backbone(shape, device, torch.bfloat16)
        for batch in args.batches:
            measure_batch(shape, hasher, model, {m: lookups[m] for m in lookups if m in good}, batch, stream, args,
                          device, out)
        for lookup in lookups.values():
            lookup.close()
        del model, lookups, host, resident, caches
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batch(shape: Shape, hasher: NgramHasher, model: Backbone, lookups: dict, batch: int, stream,
                  args: argparse.Namespace, device: torch.device, out: Results) -> None:
    """Lookup alone, then eager and graph decode steps; methods alternate within each of ROUNDS rounds."""
    window, total = shape.hash.max_ngram_order, args.steps + args.warmup
    host_seq = stream.decode_windows(batch, window, total)
    device_seq = [ids.to(device) for ids in host_seq]
    feeds = {m: [ids_for(lookup, ids, device) for ids in host_seq] for m, lookup in lookups.items()}
    feeds["none"] = device_seq
    live = ["none", *lookups]
    lookups = {"none": None, **lookups}
    tag = {"shape": shape.name, "batch": batch, "stream": args.stream_kind}
    distinct = [sum(torch.unique(i).numel() for i in hasher.hash(ids).values()) for ids in host_seq]
    rows_per_step = batch * shape.hash.heads_per_layer * len(shape.hash.layer_ids)
    out.write(kind="batch", **tag, rows_per_step=rows_per_step, distinct_rows_per_step=statistics.fmean(distinct),
              token_source=stream.label)
    graphs = device.type == "cuda" and not args.no_graphs

    def attempt(method: str, action, *arguments, drop: bool = True):
        try:
            return action(*arguments)
        except Exception as exc:  # one failing variant must not end a one-shot GPU run
            out.errors += 1
            if drop and method in live:
                live.remove(method)
            out.write(kind="error", method=method, **tag, error=repr(exc), trace=traceback.format_exc(limit=8))
            return None

    for method in live[1:]:
        lookup = lookups[method]
        before = _counters(lookup)
        times = attempt(method, lookup_alone, lookup, feeds[method], device, args.warmup)
        after = _counters(lookup)
        captured = attempt(method, Captured.lookup, lookup, device_seq[0], drop=False) \
            if graphs and capturable(lookup) and times is not None else None
        if times is None:
            continue
        p50 = percentile(times, 0.5)
        table_rows = sum(after[k][0] - before[k][0] for k in after) / total
        out.write(kind="lookup", method=method, **tag, rows_per_step=rows_per_step, table_rows_per_step=table_rows,
                  eager_us_p50=p50 * 1e6, eager_us_p90=percentile(times, 0.9) * 1e6, rows_per_s=rows_per_step / p50,
                  graph_us=captured.replay_us(device_seq, args.warmup) if captured else None)
        for layer, cache in lookup.caches.items():
            probed, hits = (after[layer][1 + i] - before[layer][1 + i] for i in range(2))
            out.write(kind="cache_hits", method=method, **tag, layer=layer, probed_rows=probed, hit_rows=hits,
                      hit_rate=hits / probed if probed else 0.0, cache_rows=cache.capacity_rows,
                      cache_bytes=cache.nbytes, probed="requested rows" if lookup.fused[layer] else "distinct rows")
    states = {m: {k: model.engrams[str(k)].new_conv_state(batch) for k in shape.hash.layer_ids} for m in live}
    eager = {m: ([], []) for m in live}
    for round_index in range(ROUNDS):
        for method in _rotated(list(live), round_index):
            result = attempt(method, eager_steps, model, lookups[method], device_seq, feeds[method],
                             states[method], args.warmup)
            if result is not None:
                eager[method][0].extend(result[0])
                eager[method][1].extend(result[1])
    step_us = {}
    for method in live:
        times, stalls = eager[method]
        step_us[(method, "eager")] = percentile(times, 0.5) * 1e6
        stall = [statistics.fmean(s[j] for s in stalls) for j in range(len(stalls[0]))] if stalls and stalls[0] else None
        out.write(kind="step", method=method, mode="eager", **tag, step_us_p50=step_us[(method, "eager")],
                  step_us_p90=percentile(times, 0.9) * 1e6, stall_us_per_engram_layer=stall)
    if graphs:
        captured = {m: attempt(m, Captured.step, model, lookups[m], device_seq[0], states[m])
                    for m in list(live) if capturable(lookups[m])}
        rounds = {m: [] for m, graph in captured.items() if graph is not None}
        for round_index in range(ROUNDS):
            for method in _rotated(list(rounds), round_index):
                mean = attempt(method, captured[method].replay_us, device_seq, args.warmup)
                if mean is None:
                    del rounds[method]
                else:
                    rounds[method].append(mean)
        for method, means in rounds.items():
            step_us[(method, "graph")] = statistics.median(means)
            out.write(kind="step", method=method, mode="graph", **tag, step_us_median_of_round_means=step_us[(method, "graph")],
                      round_means_us=means)
    for (method, mode), micros in step_us.items():
        base = step_us.get(("resident", mode))
        if method in ("none", "resident") or base is None:
            continue
        overhead = (micros - base) / base * 100
        out.write(kind="verdict", method=method, mode=mode, **tag, overhead_vs_resident_pct=overhead,
                  meets_target=None if batch > ACCEPT_MAX_BATCH else overhead <= ACCEPT_MAX_OVERHEAD_PCT)


def _counters(lookup: EngramLookup) -> dict[int, tuple[int, int, int]]:
    """Per layer: rows read from the table, and the cache's probed and hit rows (0 without a cache); a sync."""
    stats = lookup.stats()
    counts = {layer: lookup.caches[layer].stats() for layer in lookup.caches}
    return {layer: (s.fetched_rows, *((counts[layer].probed_rows, counts[layer].hit_rows) if layer in counts
                                      else (0, 0))) for layer, s in stats.items()}


def _rotated(items: list, shift: int) -> list:
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


def _fractions(text: str) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in text.split(",") if f)
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"cache fractions must be in (0, 1], got {text!r}")
    return fractions


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="JSON lines output path")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="1/16 tables, batches 1,64,256 (< 2 minutes)")
    preset.add_argument("--smoke", action="store_true", help="tiny shapes: checks the logic (CPU or GPU)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--methods", default="uva,staged", help=f"host-table variants, comma list of {sorted(VARIANTS)}")
    parser.add_argument("--batches", default=None, help="comma list of decode batch sizes (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: preset)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="token corpus folder (tokens.npy, doc_offsets.npy; e.g. .moe_lm from `python -m "
                             "bench.moe_lm.corpus`): decode steps walk its odd documents and caches are chosen "
                             "from its even ones; default: uniform random ids, no cached variants")
    parser.add_argument("--cache-fractions", type=_fractions, default=(0.01,),
                        help="comma list of hot-row cache sizes for the *-cache variants, as fractions of a "
                             "layer's rows (0.01 = 1%%: 362k rows, 58 MB of rows per Engram-27B layer)")
    parser.add_argument("--profile-tokens", type=int, default=None,
                        help="stop profiling the cache after this many tokens of the even documents (default: all)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--no-fuse", action="store_true", help="torch hashing for every lookup, resident included "
                                                                "(the first run's baseline)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``tiermem bench engram``."""
    parser = subparsers.add_parser("engram", help="Engram lookups from a host tier vs HBM inside a decode step",
                                   description=__doc__.split("\n")[0])
    add_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fraction, divisor, batches, steps, warmup = PRESETS["quick" if args.quick else "smoke" if args.smoke else "full"]
    shapes = [scaled(SHAPES[name], fraction, divisor) for name in args.shapes.split(",")]
    unknown = [m for m in args.methods.split(",") if m and m not in VARIANTS]
    if unknown:
        print(f"engram bench: unknown variants {unknown}; choose from {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    on_cpu = args.device == "cpu"
    args.methods = [m for m in args.methods.split(",") if m and (not on_cpu or VARIANTS[m].method is GatherMethod.STAGED)]
    args.batches = tuple(int(b) for b in args.batches.split(",")) if isinstance(args.batches, str) else batches
    args.steps, args.warmup = args.steps or steps, warmup
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("engram bench: no CUDA device here; use --smoke --device cpu to check the logic", file=sys.stderr)
        return 2
    try:
        args.corpus = Corpus.load(args.corpus) if args.corpus is not None else None
    except TierMemError as exc:
        print(exc, file=sys.stderr)
        return 2
    args.stream_kind = "random" if args.corpus is None else f"corpus:{args.corpus.source}"
    torch.manual_seed(0)
    out = Results(args.out)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    out.write(kind="meta", command=" ".join(sys.argv), torch=torch.__version__, triton=triton_version,
              cuda=torch.version.cuda, device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              host_threads=torch.get_num_threads(), tier="dram", emulated=False, batches=list(args.batches),
              steps=args.steps, methods=args.methods, stream=args.stream_kind,
              corpus_docs=None if args.corpus is None else args.corpus.num_docs,
              cache_fractions=list(args.cache_fractions),
              shapes=[dataclasses.asdict(s) | {"row_format": s.row_format.value} for s in shapes])
    started = time.perf_counter()
    with torch.inference_mode():
        for shape in shapes:
            run_shape(shape, args, device, out)
    out.write(kind="done", seconds=time.perf_counter() - started, errors=out.errors)
    print(verdict_table(out.verdicts))
    if out.cache_hits:
        print(hit_table(out.cache_hits))
    print(f"engram bench: {args.out} written in {time.perf_counter() - started:.0f} s, {out.errors} errors, "
          f"stream {args.stream_kind}")
    return 1 if out.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser)
    return run(parser.parse_args(argv))
