import dataclasses, sys
from pathlib import Path
import torch
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig
from tiermem.bench.moe_workloads import SHAPES
dev = torch.device("cpu")
work = workloads(Path("/work/main/.traces"), ["qwen1.5-moe-a2.7b@qwen"], False)[0]
work = dataclasses.replace(work, shape=dataclasses.replace(work.shape, hidden=64, intermediate=32))
layers = work.trace.layers
manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": "256MiB", "arena_bytes": "64MiB"}]}))
store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
pred = CrossFitted(work.routes, 1)
steps, _ = batch_steps(work.trace, 1, 120)
pf = PrefetchConfig(distance=1, objects_per_layer=0, min_score=PREFETCH_MIN_SCORE, link_fill=None)
for fraction in (0.25, 0.5):
    for mode in ("lru", "tiermem"):
        r = run_mode(store, work, steps, mode=mode, fraction=fraction, batch=1, device=dev, prefetch=pf, predictor=pred)
        print(fraction, mode, r["hit_rate"], r["misses"])
