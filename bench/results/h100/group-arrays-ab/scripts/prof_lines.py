import os, sys, subprocess, io
from pathlib import Path
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", ".device/whl", "line_profiler"], check=True)
import torch
from line_profiler import LineProfiler
from tiermem.bench.moe import build_store, run_mode, PREFETCH_MIN_SCORE, copy_bandwidth_gbps
from tiermem.bench.moe_workloads import CrossFitted, workloads, batch_steps
from tiermem.prefetch import window as pwin
from tiermem.residency import policies as rpol, directory as rdir, signals as rsig
from tiermem.transfer import cudart
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import Prefetcher, PrefetchConfig
from tiermem.prefetch import planner, copies
from tiermem.transfer import engine as eng, plan as tplan
from tiermem.experts import cache as ecache, runtime as ert, graphs as egr, grouped as egp
from tiermem.predict import cooccurrence as cooc

out = Path(os.environ.get("OUT", "/tmp"))
dev = torch.device("cuda")
work = workloads(Path(".traces"), ["qwen3-30b-a3b@qwen"], False)[0]
layers = work.trace.layers
nbytes = len(layers) * work.shape.num_experts * (3 * work.shape.hidden * work.shape.intermediate * 2 + 8192)
manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
raw = copy_bandwidth_gbps(manager, dev, 1 << 30)
store = build_store(manager, work.shape, layers, dev, torch.bfloat16)
steps, _ = batch_steps(work.trace, 1, 120)
pf = PrefetchConfig(distance=1, objects_per_layer=2, min_score=PREFETCH_MIN_SCORE, link_gbps=raw)
pred = CrossFitted(work.routes, 1)
rep = io.StringIO()
for mode in ("lru", "tiermem"):
    run_mode(store, work, steps[:10], mode=mode, fraction=0.5, batch=1, device=dev, prefetch=pf, predictor=pred)
    r = run_mode(store, work, steps, mode=mode, fraction=0.5, batch=1, device=dev, prefetch=pf, predictor=pred)
    print(mode, round(r["tokens_per_s"], 1), round(r["hit_rate"], 3), {k: round(v) for k, v in r["host_us_per_layer"].items()}, file=rep, flush=True)
lp = LineProfiler()
fns = [Prefetcher.prefetch, Prefetcher._apply_prefetch, Prefetcher._issue, Prefetcher.demand, Prefetcher._evictable,
       Prefetcher._fetch_some, Prefetcher.ready_all, Prefetcher._reap, Prefetcher._evict, planner.plan_demand,
       ert.ExpertRuntime.run_layer, ert.ExpertRuntime._run_grouped, ert.ExpertRuntime._record_routing, CrossFitted.predict,
       cooc.CoOccurrencePredictor.predict, eng.TransferEngine.submit_direct, eng.TransferEngine._enqueue_chunks, eng._StartAfter.hold,
       eng.TransferHandle.__init__, eng.TransferHandle.done, eng.TransferHandle.wait_on, cudart.memcpy_async,
       pwin.LinkWindow.admitted, pwin.LinkWindow.queued, pwin.LinkWindow.layer_started, pwin.NextDemandShare.resolve, pwin.NextDemandShare.expect,
       rsig.PredictionScores.publish, rsig.ActivationCounts.record_many, Prefetcher._land, copies.SlotCopies.submit,
       egr.WaveGraphs.run, egp.wave_rows]
for name in dir(egr.WaveGraphs):
    f = getattr(egr.WaveGraphs, name)
    if callable(f) and name.startswith("_") and not name.startswith("__"): fns.append(f)
for cls in (ecache.ExpertCache, rdir.Directory):
    for name in dir(cls):
        f = getattr(cls, name)
        if callable(f) and not name.startswith("__") and hasattr(f, "__code__"): fns.append(f)
for f in fns: lp.add_function(f)
mode = sys.argv[1]
lp.enable()
run_mode(store, work, steps, mode=mode, fraction=0.5, batch=1, device=dev, prefetch=pf, predictor=pred)
lp.disable()
s = io.StringIO(); lp.print_stats(stream=s, output_unit=1e-6, stripzeros=True)
(out / f"lines-{mode}.txt").write_text(s.getvalue())
print(rep.getvalue()); (out / f"summary-{mode}.txt").write_text(rep.getvalue())
