import cProfile, io, pstats, sys, time
from pathlib import Path
import torch
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE, copy_bandwidth_gbps
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig
out = Path(sys.argv[1]); dev = torch.device("cuda")
work = workloads(Path(".traces"), ["qwen3-30b-a3b@moe-lm"], False)[0]
layers = work.trace.layers
nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
raw = copy_bandwidth_gbps(manager, dev, 1 << 30)
store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
t0 = time.perf_counter(); pred = CrossFitted(work.routes, 1, "learned"); print("fit s", round(time.perf_counter() - t0, 1), flush=True)
pf = PrefetchConfig(distance=1, objects_per_layer=4, min_score=PREFETCH_MIN_SCORE, link_gbps=raw)
for batch in (1, 8):
    steps, _ = batch_steps(work.trace, batch, 60 if batch == 1 else 20)
    for mode in ("lru", "tiermem"):
        run_mode(store, work, steps[:5], mode=mode, fraction=0.5, batch=batch, device=dev, prefetch=pf, predictor=pred)
        r = run_mode(store, work, steps, mode=mode, fraction=0.5, batch=batch, device=dev, prefetch=pf, predictor=pred)
        print(batch, mode, round(r["tokens_per_s"], 1), round(r["hit_rate"], 3), {k: round(v) for k, v in r["host_us_per_layer"].items()}, flush=True)
    pr = cProfile.Profile(); pr.enable()
    run_mode(store, work, steps, mode="tiermem", fraction=0.5, batch=batch, device=dev, prefetch=pf, predictor=pred)
    pr.disable()
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("cumtime").print_stats(70)
    (out / f"cprof-learned-b{batch}.txt").write_text(s.getvalue())
