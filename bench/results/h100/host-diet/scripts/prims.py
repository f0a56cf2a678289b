"""Host cost of the primitives the pager calls, on this machine (µs per call)."""
import timeit, random, ctypes
import numpy as np, torch
from tiermem.residency.policies import CacheEntry, eviction_order, PredictedPolicy
from tiermem.residency.signals import PredictionScores
from tiermem.prefetch.planner import plan_prefetch, plan_demand, PrefetchBudget
from tiermem.transfer import cudart
from tiermem.types import ObjectKey
def t(name, f, n=20000):
    f(); print(f"{name:28s} {timeit.timeit(f, number=n) / n * 1e6:8.2f} us", flush=True)
keys = [ObjectKey("expert", "moe", 3, i) for i in range(60)]
ps = PredictionScores(); ps.update({k: random.random() for k in keys})
ents = {k: CacheEntry(key=k, slot=i, loaded_tick=i, last_use_tick=i) for i, k in enumerate(keys[:30])}
res = set(ents); pol = PredictedPolicy(ps)
t("eviction_order(30)", lambda: eviction_order((ents[k] for k in res), pol))
order = eviction_order((ents[k] for k in res), pol)
sc = {keys[40]: 0.9, keys[41]: 0.8}; sc.update({k: ps.score(k) for k in order})
b = PrefetchBudget(max_bytes=200, object_bytes=100)
t("plan_prefetch", lambda: plan_prefetch(sc, order, frozenset(), frozenset(), 0, b, frozenset(keys[:4])))
t("PredictionScores.update(60)", lambda: ps.update(zip(keys, [0.1] * 60)))
a = np.random.rand(60)
t("argsort(60).tolist", lambda: np.argsort(-a, kind="stable").tolist())
t("python call", lambda: None, 200000)
dev = torch.device("cuda:0")
s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
t("current_stream(dev)", lambda: torch.cuda.current_stream(dev))
def ev_rec():
    e = torch.cuda.Event(); e.record(s1)
t("Event()+record", ev_rec)
e = torch.cuda.Event(); e.record(s1)
t("event.record (reuse)", lambda: e.record(s1))
t("stream.record_event()", lambda: s1.record_event())
t("stream.wait_event", lambda: s2.wait_event(e))
t("event.query", lambda: e.query())
host = torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
hbm = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
t("is_pinned", lambda: host.is_pinned())
hp, dp, sh = host.data_ptr(), hbm.data_ptr(), s1.cuda_stream
t("cudart.memcpy_async 4K", lambda: cudart.memcpy_async(dp, hp, 4096, sh), 5000)
torch.cuda.synchronize()
t("copy_ non_blocking 4K", lambda: hbm[:4096].copy_(host[:4096], non_blocking=True), 5000)
torch.cuda.synchronize()
with torch.cuda.stream(s1):
    t("with stream ctx", lambda: None)
def ctx():
    with torch.cuda.stream(s1): pass
t("torch.cuda.stream ctx", ctx)
x = torch.zeros(8, device=dev)
t("tiny kernel launch (add_)", lambda: x.add_(1), 5000)
torch.cuda.synchronize()
idx = torch.zeros(4, dtype=torch.int64, device=dev)
t("4-int D2H sync .cpu()", lambda: idx.cpu(), 5000)
