"""The variants of ``tiermem bench engram`` and their set-up: tables, hot-row caches, lookups, a row check.

A variant fixes how a host table is read (``Variant``: gather method, lookup config overrides,
hot-row cache or not); ``tiermem/bench/engram.py`` says what each one is. Set-up happens before
anything is timed, and a variant is timed only if its rows equal the resident rows bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from tiermem.bench.engram_model import Shape, sync
from tiermem.bench.engram_report import Results
from tiermem.bench.engram_stream import build_caches, row_counts
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


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a host-table variant reads rows: gather method, lookup config overrides, hot-row cache or not."""

    method: GatherMethod
    overrides: dict = dataclasses.field(default_factory=dict)
    cached: bool = False


_HIGH = {"side_stream_priority": StreamPriority.HIGH}
VARIANTS = {
    "uva": Variant(GatherMethod.UVA),
    "uva-high": Variant(GatherMethod.UVA, _HIGH),
    "uva-burst": Variant(GatherMethod.UVA, _HIGH | {"gather_max_programs": 1 << 16}),
    "uva-unfused": Variant(GatherMethod.UVA, {"fuse_hash_gather": False, "gather_max_programs": 1 << 16}),
    "staged": Variant(GatherMethod.STAGED),
    "uva-cache": Variant(GatherMethod.UVA, cached=True),
    "uva-cache-high": Variant(GatherMethod.UVA, _HIGH, cached=True),
    "staged-cache": Variant(GatherMethod.STAGED, cached=True),
}


def build_tables(shape: Shape, hasher: NgramHasher, tm: TierManager, device: torch.device, out: Results):
    """Per Engram layer, the same pattern-filled table in pinned host memory (``dram`` tier) and in HBM."""
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


def build_cache_sets(shape: Shape, hasher: NgramHasher, host: dict, args: argparse.Namespace, device: torch.device,
                     out: Results) -> dict[float, dict]:
    """Per cache fraction, one HBM cache per layer, chosen from the corpus' profiling documents."""
    if not any(VARIANTS[m].cached for m in args.methods) or args.corpus is None:
        return {}
    start = time.perf_counter()
    counts, tokens = row_counts(hasher, args.corpus, device, args.profile_tokens)
    sync(device)
    profiled = time.perf_counter()
    sets = {}
    for fraction in args.cache_fractions:
        built = time.perf_counter()
        sets[fraction] = build_caches(host, counts, fraction, device)
        for layer, cache in sets[fraction].items():
            out.write(kind="cache", shape=shape.name, layer=layer, capacity_fraction=fraction,
                      capacity_rows=cache.capacity_rows, table_rows=host[layer].layout.num_rows,
                      cache_bytes=cache.nbytes, row_bytes_total=cache.rows.numel(), row_map_bytes=cache.row_map.nbytes,
                      row_map_entries=cache.row_map.size, row_map_max_probes=cache.row_map.max_probes,
                      profile_tokens=tokens, profile_s=profiled - start, build_s_all_layers=time.perf_counter() - built,
                      profiled_lookups_covered=float(counts[layer][cache.ids.to(device)].sum() / counts[layer].sum()))
    return sets


def make_lookups(hasher: NgramHasher, host: dict, resident: dict, caches: dict, args: argparse.Namespace,
                 device: torch.device, out: Results, shape: Shape) -> dict:
    """``resident`` plus one lookup per requested variant (cached variants: one per cache fraction)."""
    config = EngramLookupConfig(max_tokens_per_submit=max(args.batches), fuse_hash_gather=not args.no_fuse)
    dtype = torch.bfloat16
    lookups = {"resident": EngramLookup(hasher, resident, config, device=device, out_dtype=dtype)}
    for name in args.methods:
        variant = VARIANTS[name]
        if variant.cached and not caches:
            out.errors += 1
            out.write(kind="error", shape=shape.name, method=name, error="cached variants need --corpus (a cache "
                      "chosen from random ids has nothing to learn)")
            continue
        for fraction, layer_caches in (caches.items() if variant.cached else [(None, None)]):
            label = name if fraction is None else f"{name}@{fraction:g}"
            try:
                lookups[label] = EngramLookup(hasher, host, dataclasses.replace(
                    config, method=variant.method, **variant.overrides), device=device, out_dtype=dtype,
                    caches=layer_caches)
            except TierMemError as exc:  # e.g. no Triton for uva: report it, measure the others
                out.errors += 1
                out.write(kind="error", shape=shape.name, method=label, error=str(exc))
    return lookups


def check_rows(shape: Shape, lookups: dict, batch: int, stream, device: torch.device, out: Results) -> set[str]:
    """Variants whose rows equal the resident rows bit for bit (decode batch and a prefill chunk)."""
    window = shape.hash.max_ngram_order
    sequences = min(4, batch)
    positions = batch // sequences
    cases = {"decode": (stream.decode_windows(batch, window, 1)[0], 1),
             "prefill": (stream.prefill(sequences, positions, window), positions)}
    good = set()
    for method, lookup in lookups.items():
        equal = True
        for case, (ids, positions) in cases.items():
            expected = {k: h.wait() for k, h in lookups["resident"].submit(ids.to(device), positions).items()}
            got = {k: h.wait() for k, h in lookup.submit(ids_for(lookup, ids, device), positions).items()}
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


def ids_for(lookup: EngramLookup, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Staged lookups hash on the host (the scheduler has the tokens there); the others on the device."""
    staged = GatherMethod.STAGED in lookup.methods.values() and device.type == "cuda"
    return ids if staged else ids.to(device)


def capturable(lookup: EngramLookup | None) -> bool:
    return lookup is None or GatherMethod.STAGED not in lookup.methods.values()
