"""Batch 8, 25%: LRU vs tiermem host phases and tokens/s, Qwen3 / Qwen1.5 shapes on the Qwen trace; one process of an
A/B between two trees (the tree is whatever PYTHONPATH names); modes rotated per round."""
import json, sys
from pathlib import Path
import torch
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE, copy_bandwidth_gbps
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig
label, rounds = sys.argv[1], int(sys.argv[2])
dev = torch.device("cuda")
for work in workloads(Path(".traces"), ["qwen3-30b-a3b@qwen", "qwen1.5-moe-a2.7b@qwen"], False):
    layers = work.trace.layers
    nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
    manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
    raw = copy_bandwidth_gbps(manager, dev, 1 << 30)
    store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
    pred = CrossFitted(work.routes, 1)
    pf = PrefetchConfig(distance=1, objects_per_layer=2, min_score=PREFETCH_MIN_SCORE, link_gbps=raw)
    steps, _ = batch_steps(work.trace, 8, 40)
    modes = ["lru", "tiermem"]
    for mode in modes:  # warm-up, untimed
        run_mode(store, work, steps[:4], mode=mode, fraction=0.25, batch=8, device=dev, prefetch=pf, predictor=pred)
    for rnd in range(rounds):
        for mode in modes[rnd % 2:] + modes[:rnd % 2]:
            r = run_mode(store, work, steps, mode=mode, fraction=0.25, batch=8, device=dev, prefetch=pf, predictor=pred)
            print(json.dumps({"tree": label, "workload": work.name, "fraction": 0.25, "round": rnd, "mode": mode,
                              "tokens_per_s": round(r["tokens_per_s"], 1), "hit_rate": round(r["hit_rate"], 3),
                              "prefetch": [r["prefetch_loads"], r["prefetch_used"]],
                              "host_us": {k: round(v) for k, v in r["host_us_per_layer"].items()}}), flush=True)
    store.close(); manager.close()
