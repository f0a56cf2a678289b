"""``tiermem bench engram``: Engram lookups from a host-tier table vs an HBM-resident one, in a decode step.

For each shape, the Engram tables are filled with a cheap deterministic pattern (generated on the
GPU, never with CPU random numbers), placed once in pinned host memory (the ``dram`` tier of a
TierManager) and once in HBM. The rows each host variant gathers are first checked equal to the
resident rows (decode batch and a prefill chunk); only then is anything timed. Per decode batch:

| record    | what                                                                             |
|-----------|----------------------------------------------------------------------------------|
| batch     | rows per step and distinct rows among them (hashed on the host, off the clock)    |
| lookup    | tokens known -> rows ready, alone: eager (launches included) and CUDA-graph time |
| step      | a whole decode step, eager (one sync per step, stall per Engram layer) and graph |
| verdict   | step-time overhead vs the resident table, against the target (<= 2% at <= 256)  |

Variants (``--methods``) fix how a host table is read, whatever ``auto`` would pick: ``uva`` (one
fused hash + gather kernel per layer on a few CTAs), ``uva-high`` (the same on a high-priority side
stream), ``uva-burst`` (the same, high priority, one CTA per block of rows: the whole GPU for a short
burst instead of a few SMs for long, since a one-wave GEMM that finds one SM busy runs a second wave),
``uva-unfused`` (the first run's path: torch hashing, sort-based de-duplication, a gather
kernel over the whole GPU), ``staged`` (CPU gather into pinned staging + one copy). ``resident`` (the
baseline) uses the fused kernel on the HBM table, ``none`` is the backbone without Engram. Methods
alternate within each of three rounds, so drift of clocks or host load hits all alike. The run ends
with a table of verdicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
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
    sync,
)
from tiermem.engram import (
    EngramLookup,
    EngramLookupConfig,
    EngramTable,
    GatherMethod,
    NgramHasher,
    StreamPriority,
    TableLayout,
)
from tiermem.errors import TierMemError
from tiermem.manager import TierManager

ACCEPT_MAX_BATCH = 256
ACCEPT_MAX_OVERHEAD_PCT = 2.0
ROUNDS = 3
VARIANTS = {  # name -> (gather method, config overrides)
    "uva": (GatherMethod.UVA, {}),
    "uva-high": (GatherMethod.UVA, {"side_stream_priority": StreamPriority.HIGH}),
    "uva-burst": (GatherMethod.UVA, {"side_stream_priority": StreamPriority.HIGH, "gather_max_programs": 1 << 16}),
    "uva-unfused": (GatherMethod.UVA, {"fuse_hash_gather": False, "gather_max_programs": 1 << 16}),
    "staged": (GatherMethod.STAGED, {}),
}
PRESETS = {  # table fraction, model divisor, batches, timed steps, warm-up steps
    "full": (1.0, 1, (1, 8, 32, 64, 128, 256, 512), 60, 8),
    "quick": (1 / 16, 1, (1, 64, 256), 15, 3),
    "smoke": (1 / 4096, 32, (1, 4), 2, 1),
}


class Results:
    """JSON lines to ``path``, one object per measurement, a compact line on stdout, verdicts kept."""

    SHOWN = ("lookup", "step", "verdict", "error")

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        self.errors = 0
        self.verdicts: list[dict] = []

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record["kind"] == "verdict":
            self.verdicts.append(record)
        if record["kind"] in self.SHOWN:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def build_tables(shape: Shape, hasher: NgramHasher, tm: TierManager, device: torch.device, out: Results):
    host, resident = {}, {}
    for layer in shape.hash.layer_ids:
        layout = TableLayout(hasher.rows_for_layer(layer), shape.row_dim, shape.row_format)
        start = time.perf_counter()
        storage = tm.empty((layout.num_rows, layout.row_bytes), tier="dram")
        allocated = time.perf_counter()
        host[layer] = EngramTable.filled(layout, storage=storage, seed=layer, work_device=device, name=f"layer{layer}")
        filled = time.perf_counter()
        resident[layer] = host[layer].copy_to(torch.empty_like(storage, device=device))
        sync(device)
        out.write(kind="setup", shape=shape.name, layer=layer, rows=layout.num_rows, row_bytes=layout.row_bytes,
                  table_bytes=layout.nbytes, host_alloc_s=allocated - start, fill_s=filled - allocated,
                  resident_copy_s=time.perf_counter() - filled, host_pinned=host[layer].is_pinned,
                  auto_would_pick="uva" if layout.row_bytes >= EngramLookupConfig().uva_min_row_bytes else "staged")
    return host, resident


def check_rows(shape: Shape, lookups: dict, batch: int, device: torch.device, out: Results) -> set[str]:
    """Variants whose rows equal the resident rows bit for bit (decode batch and a prefill chunk)."""
    window = shape.hash.max_ngram_order
    sequences = min(4, batch)
    positions = batch // sequences
    cases = {"decode": (torch.randint(0, VOCAB, (batch, window)), 1),
             "prefill": (torch.randint(0, VOCAB, (sequences, positions + window)), positions)}
    good = set()
    for method, lookup in lookups.items():
        equal = True
        for case, (ids, positions) in cases.items():
            expected = {k: h.wait() for k, h in lookups["resident"].submit(ids.to(device), positions).items()}
            got = {k: h.wait() for k, h in lookup.submit(_ids_for(lookup, ids, device), positions).items()}
            sync(device)
            same = all(torch.equal(got[k], expected[k]) for k in expected)
            out.write(kind="correctness", shape=shape.name, method=method, case=case, tokens=ids.shape[0] * positions,
                      fused=sorted(k for k, fused in lookup.fused.items() if fused), equal=same)
            equal = equal and same
        if equal:
            good.add(method)
        else:
            out.errors += 1
    return good


def _ids_for(lookup: EngramLookup, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Staged lookups hash on the host (the scheduler has the tokens there); the others on the device."""
    staged = GatherMethod.STAGED in lookup.methods.values() and device.type == "cuda"
    return ids if staged else ids.to(device)


def _capturable(lookup: EngramLookup | None) -> bool:
    return lookup is None or GatherMethod.STAGED not in lookup.methods.values()


def run_shape(shape: Shape, args: argparse.Namespace, device: torch.device, out: Results) -> None:
    hasher = NgramHasher(shape.hash)
    row_bytes = TableLayout(1, shape.row_dim, shape.row_format).row_bytes
    table_bytes = sum(hasher.rows_for_layer(layer) for layer in shape.hash.layer_ids) * row_bytes
    dtype = torch.bfloat16
    with TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": table_bytes + (1 << 30)}]}) as tm:
        host, resident = build_tables(shape, hasher, tm, device, out)
        config = EngramLookupConfig(max_tokens_per_submit=max(args.batches), fuse_hash_gather=not args.no_fuse)
        lookups = {"resident": EngramLookup(hasher, resident, config, device=device, out_dtype=dtype)}
        for name in args.methods:
            method, overrides = VARIANTS[name]
            try:
                lookups[name] = EngramLookup(hasher, host, dataclasses.replace(config, method=method, **overrides),
                                             device=device, out_dtype=dtype)
            except TierMemError as exc:  # e.g. no Triton for uva: report it, measure the others
                out.errors += 1
                out.write(kind="error", shape=shape.name, method=name, error=str(exc))
        good = check_rows(shape, lookups, max(args.batches), device, out)
        model = Backbone(shape, device, dtype)
        for batch in args.batches:
            measure_batch(shape, hasher, model, {m: lookups[m] for m in lookups if m in good}, batch, args, device, out)
        for lookup in lookups.values():
            lookup.close()
        del model, lookups, host, resident
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batch(shape: Shape, hasher: NgramHasher, model: Backbone, lookups: dict, batch: int,
                  args: argparse.Namespace, device: torch.device, out: Results) -> None:
    """Lookup alone, then eager and graph decode steps; methods alternate within each of ROUNDS rounds."""
    window, total = shape.hash.max_ngram_order, args.steps + args.warmup
    host_seq = [torch.randint(0, VOCAB, (batch, window)) for _ in range(total)]
    device_seq = [ids.to(device) for ids in host_seq]
    feeds = {m: [_ids_for(lookup, ids, device) for ids in host_seq] for m, lookup in lookups.items()}
    feeds["none"] = device_seq
    live = ["none", *lookups]
    lookups = {"none": None, **lookups}
    tag = {"shape": shape.name, "batch": batch}
    distinct = [sum(torch.unique(i).numel() for i in hasher.hash(ids).values()) for ids in host_seq]
    rows_per_step = batch * shape.hash.heads_per_layer * len(shape.hash.layer_ids)
    out.write(kind="batch", **tag, rows_per_step=rows_per_step, distinct_rows_per_step=statistics.fmean(distinct),
              token_source="uniform random ids")
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
        times = attempt(method, lookup_alone, lookups[method], feeds[method], device, args.warmup)
        captured = attempt(method, Captured.lookup, lookups[method], device_seq[0], drop=False) \
            if graphs and _capturable(lookups[method]) and times is not None else None
        if times is not None:
            p50 = percentile(times, 0.5)
            out.write(kind="lookup", method=method, **tag, rows_per_step=rows_per_step, eager_us_p50=p50 * 1e6,
                      eager_us_p90=percentile(times, 0.9) * 1e6, rows_per_s=rows_per_step / p50,
                      graph_us=captured.replay_us(device_seq, args.warmup) if captured else None)
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
                    for m in list(live) if _capturable(lookups[m])}
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


def verdict_table(verdicts: list[dict]) -> str:
    """Overhead vs resident per (shape, mode, method) row and batch column; * marks a missed target."""
    batches = sorted({v["batch"] for v in verdicts})
    rows: dict[tuple, dict] = {}
    for v in verdicts:
        rows.setdefault((v["shape"], v["mode"], v["method"]), {})[v["batch"]] = v
    head = f"{'shape':<10} {'mode':<6} {'method':<12}" + "".join(f"{b:>9}" for b in batches) + "  target met"
    title = (f"step overhead vs HBM-resident table, % (target <= {ACCEPT_MAX_OVERHEAD_PCT:g}% at batch <= "
             f"{ACCEPT_MAX_BATCH}; * = missed)")
    lines = [title, head]
    for (shape, mode, method), cells in rows.items():
        text = "".join(f"{_cell(cells.get(b)):>9}" for b in batches)
        judged = [c["meets_target"] for c in cells.values() if c["meets_target"] is not None]
        lines.append(f"{shape:<10} {mode:<6} {method:<12}{text}  {sum(judged)}/{len(judged)}")
    return "\n".join(lines)


def _cell(verdict: dict | None) -> str:
    if verdict is None:
        return "-"
    return f"{verdict['overhead_vs_resident_pct']:+.1f}{'*' if verdict['meets_target'] is False else ''}"


def _rotated(items: list, shift: int) -> list:
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="JSON lines output path")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="1/16 tables, batches 1,64,256 (< 2 minutes)")
    preset.add_argument("--smoke", action="store_true", help="tiny shapes: checks the logic (CPU or GPU)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--methods", default="uva,staged", help=f"host-table variants, comma list of {sorted(VARIANTS)}")
    parser.add_argument("--batches", default=None, help="comma list of decode batch sizes (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: preset)")
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
    args.methods = [m for m in args.methods.split(",") if m and (args.device != "cpu" or m == "staged")]
    args.batches = tuple(int(b) for b in args.batches.split(",")) if isinstance(args.batches, str) else batches
    args.steps, args.warmup = args.steps or steps, warmup
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("engram bench: no CUDA device here; use --smoke --device cpu to check the logic", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = Results(args.out)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    out.write(kind="meta", command=" ".join(sys.argv), torch=torch.__version__, triton=triton_version,
              cuda=torch.version.cuda, device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              host_threads=torch.get_num_threads(), tier="dram", emulated=False, batches=list(args.batches),
              steps=args.steps, methods=args.methods,
              shapes=[dataclasses.asdict(s) | {"row_format": s.row_format.value} for s in shapes])
    started = time.perf_counter()
    with torch.inference_mode():
        for shape in shapes:
            run_shape(shape, args, device, out)
    out.write(kind="done", seconds=time.perf_counter() - started, errors=out.errors)
    print(verdict_table(out.verdicts))
    print(f"engram bench: {args.out} written in {time.perf_counter() - started:.0f} s, {out.errors} errors")
    return 1 if out.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser)
    return run(parser.parse_args(argv))
