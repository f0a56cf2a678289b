import time, sys
import numpy as np, torch
from torch import nn
from tiermem.experts.cache import ExpertCache
from tiermem.experts.sources import ModuleExperts
from tiermem.experts.store import ExpertStore
from tiermem.manager import TierManager
from tiermem.predict.base import RouteContext
from tiermem.prefetch.prefetcher import PrefetchConfig, Prefetcher
from tiermem.residency.policies import PolicySignals
from tiermem.residency.signals import ActivationCounts, PredictionScores
from tiermem.residency.slots import SlotLayout
from tiermem.prefetch.stats import HostPhases
import inspect
E, K, L, SLOTS = 60, 4, 5, 30
class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * 8, 16)); self.down_proj = nn.Parameter(torch.randn(E, 16, 8))
        self.num_experts = E; self.hidden_dim = 16; self.intermediate_dim = 8
class Pred:
    def __init__(s): s.rng = np.random.default_rng(1)
    def predict(s, ctx, d): return s.rng.random((d, 1, E)) ** 4
manager = TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": "64MiB", "arena_bytes": "16MiB"}]})
store = ExpertStore.from_source(manager, ModuleExperts({l: Fused() for l in range(L)}), tier="dram")
preds = PredictionScores()
kw = dict(layout=store.layout, layers=tuple(range(L)), slots_per_group=SLOTS, slot_layout=SlotLayout.PER_LAYER,
          device=torch.device("cpu"), policy=sys.argv[1], signals=PolicySignals(counts=ActivationCounts(), predictions=preds))
if "keys" in inspect.signature(ExpertCache.__init__).parameters:
    kw["keys"] = [tuple(store.key(l, e) for e in range(E)) for l in range(L)]
cache = ExpertCache(**kw)
pf = Prefetcher(cache, store, manager, predictor=Pred() if sys.argv[1] == "predicted" else None, predictions=preds,
                config=PrefetchConfig(distance=1, objects_per_layer=2, link_fill=None), phases=HostPhases(enabled=True))
rng = np.random.default_rng(0)
t_dem = t_pre = 0.0; n = 0
cur = np.full((1, L, K), -1, dtype=np.int16)
for step in range(600):
    for l in range(L):
        experts = sorted(rng.choice(E, K, replace=False).tolist())
        tick = step * L + l
        if step == 100: pf.phases = HostPhases(enabled=True)
        pf.phases.start()
        a = time.perf_counter()
        for wave in pf.demand([store.key(l, e) for e in experts], tick):
            pf.ready_all(wave)
        b = time.perf_counter()
        pf.prefetch(RouteContext(num_experts=E, layer=l, current=cur), tick, needed_now=frozenset())
        c = time.perf_counter()
        pf.phases.layer_done()
        if step >= 100: t_dem += b - a; t_pre += c - b; n += 1
print({k: round(v) for k, v in pf.phases.us_per_layer().items()})
print(sys.argv[1], "demand us", round(t_dem / n * 1e6, 1), "prefetch us", round(t_pre / n * 1e6, 1), "hit", round(pf.collect_stats().hit_rate, 3))
