"""Device pager on the H100: copy-kernel configurations, and GPU time per layer of a replayed layer (hits only / misses)."""
import time
import torch, torch.nn.functional as F
import tiermem.transfer.uva_copy as uc
from tiermem.manager import ManagerConfig, TierManager
from tiermem.bench.moe import build_store
from tiermem.bench.moe_workloads import ExpertShape
from tiermem.experts.runtime import ExpertRuntime, OffloadConfig, Pager

dev = torch.device("cuda")
shape = ExpertShape(2048, 768, 60, 4)
layers = tuple(range(4))
manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": 4 << 30, "arena_bytes": "1GiB"}]}))
store = build_store(manager, shape, layers, dev, torch.bfloat16)
block = store.layout.block_bytes
homes = [[store.home(store.key_at(p, e)) for p in layers for e in range(60)]]
raw_host = manager.empty(64 * block, tier="dram"); raw_dev = torch.empty(64 * block, dtype=torch.uint8, device=dev)
def timed(fn, reps=5):
    best = 1e9
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); best = min(best, s.elapsed_time(e) / 1e3)
    return best
for n in (64, 3):
    t = timed(lambda: raw_dev[:n * block].copy_(raw_host[:n * block], non_blocking=True))
    print(f"raw copy_ {n} experts: {n*block/t/1e9:.1f} GB/s ({t*1e6:.0f} us)", flush=True)
uc.BLOCK_WORDS, uc.NUM_WARPS, uc.PROGRAMS_PER_SM = 2048, 8, 4
for fraction, kernel in ((1.0, True), (1.0, False), (0.25, True), (0.25, False)):
    rt = ExpertRuntime(store, OffloadConfig(resident_fraction=fraction, pager=Pager.DEVICE), device=dev, top_k=4)
    rt._device.pager.kernel = kernel
    hidden = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    w = torch.full((1, 4), 0.25, device=dev, dtype=torch.bfloat16)
    rt.capture_graphs(hidden, w, F.silu)
    ids = [torch.randperm(60, device=dev)[:4].reshape(1, 4) for _ in range(400)]
    if fraction == 1.0:
        for p in layers:
            for f in range(0, 60, 4):
                rt.run_layer(p, hidden, torch.arange(f, f + 4, device=dev).reshape(1, 4), w, F.silu)
    rt.reset_stats(); torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    t = time.perf_counter(); s.record()
    for i, x in enumerate(ids):
        rt.run_layer(layers[i % 4], hidden, x, w, F.silu)
    host = time.perf_counter() - t
    e.record(); torch.cuda.synchronize()
    st = rt.stats()
    gpu = s.elapsed_time(e) / 1e3
    print(f"fraction {fraction} kernel {kernel}: host {host/400*1e6:.0f} us/layer, gpu {gpu/400*1e6:.0f} us/layer, misses/layer {st['misses']/400:.2f}, "
          f"copy-only estimate {st['demand_bytes']/400/50e9*1e6:.0f} us/layer at 50 GB/s, replays {st['graph_replays']}", flush=True)
    rt.close()
store.close(); manager.close()
