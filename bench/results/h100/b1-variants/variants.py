"""Batch 1: LRU vs tiermem's parts (predicted eviction alone, + windowed prefetch, + prefetch without the window), interleaved rounds."""
import json, sys, dataclasses
from pathlib import Path
import torch
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE, copy_bandwidth_gbps
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig
dev = torch.device("cuda")
for work in workloads(Path(".traces"), ["qwen3-30b-a3b@qwen", "qwen1.5-moe-a2.7b@qwen"], False):
    layers = work.trace.layers
    nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
    manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
    raw = copy_bandwidth_gbps(manager, dev, 1 << 30)
    store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
    pred = CrossFitted(work.routes, 1)
    window = PrefetchConfig(distance=1, objects_per_layer=2, min_score=PREFETCH_MIN_SCORE, link_gbps=raw)
    variants = {"lru": ("lru", window), "evict-only": ("tiermem", dataclasses.replace(window, objects_per_layer=0)),
                "windowed": ("tiermem", window), "no-window": ("tiermem", dataclasses.replace(window, link_fill=None))}
    steps, _ = batch_steps(work.trace, 1, 120)
    for fraction in (0.25, 0.5):
        for rnd in range(3):
            for name, (mode, pf) in variants.items():
                if rnd == 0:
                    run_mode(store, work, steps[:8], mode=mode, fraction=fraction, batch=1, device=dev, prefetch=pf, predictor=pred)
                r = run_mode(store, work, steps, mode=mode, fraction=fraction, batch=1, device=dev, prefetch=pf, predictor=pred)
                print(json.dumps({"workload": work.name, "fraction": fraction, "round": rnd, "variant": name,
                                  "tokens_per_s": round(r["tokens_per_s"], 1), "hit_rate": round(r["hit_rate"], 3),
                                  "prefetch": [r["prefetch_loads"], r["prefetch_used"]],
                                  "host_us": {k: round(v) for k, v in r["host_us_per_layer"].items()}}), flush=True)
    store.close(); manager.close()
