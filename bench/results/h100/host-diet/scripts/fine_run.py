"""Host phases per layer, LRU vs tiermem, b1/b8 at 25%/50%, Qwen3 shape on the Qwen trace (whatever tiermem is first on sys.path)."""
import os, sys, json
from pathlib import Path
import torch
import tiermem
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE, copy_bandwidth_gbps
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig
label = sys.argv[1]
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["qwen3-30b-a3b@qwen"]
batches = [int(b) for b in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["1"])]
dev = torch.device("cuda")
print(label, tiermem.__file__, file=sys.stderr)
for work in workloads(Path(".traces"), names, False):
    layers = work.trace.layers
    nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
    manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
    raw = copy_bandwidth_gbps(manager, dev, 1 << 30)
    store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
    pf = PrefetchConfig(distance=1, objects_per_layer=2, min_score=PREFETCH_MIN_SCORE, link_gbps=raw)
    pred = CrossFitted(work.routes, 1)
    for batch in batches:
        steps, _ = batch_steps(work.trace, batch, 120 if batch == 1 else 30)
        for fraction in (0.25, 0.5):
            for mode in ("lru", "tiermem"):
                run_mode(store, work, steps[:8], mode=mode, fraction=fraction, batch=batch, device=dev, prefetch=pf, predictor=pred)
                r = run_mode(store, work, steps, mode=mode, fraction=fraction, batch=batch, device=dev, prefetch=pf, predictor=pred)
                print(json.dumps({"label": label, "workload": work.name, "batch": batch, "fraction": fraction, "mode": mode,
                                  "tokens_per_s": round(r["tokens_per_s"], 1), "hit_rate": round(r["hit_rate"], 3),
                                  "prefetch": [r["prefetch_loads"], r["prefetch_used"]],
                                  "host_us": {k: round(v) for k, v in r["host_us_per_layer"].items()}}), flush=True)
    store.close(); manager.close()
