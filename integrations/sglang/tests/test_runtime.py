"""Predictor-driven prefetching: a trace fits a predictor, a layer's routing prefetches the next layer's
experts, and those become hits (no sglang needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_EXPERTS, expert_weights, filled_store, slot_tensors
from tiermem.errors import ConfigError
from tiermem.predict.trace import RouteTrace, save_trace

from tiermem_sglang.config import ExpertPager, ExpertTier, ExpertTierConfig
from tiermem_sglang.device import DeviceLayerPager
from tiermem_sglang.pager import LayerPager
from tiermem_sglang.runtime import RoutePrefetcher, TierRuntime, load_predictor

NUM_LAYERS = 2
NUM_SLOTS = 4
TOP_K = 1
SEQUENCES = 20
TOKENS_PER_SEQUENCE = 10


def chained_trace(path) -> None:
    """Every token routes layer 0 -> expert e and layer 1 -> expert (e + 3) % E: perfectly predictable."""
    rng = np.random.default_rng(0)
    first = rng.integers(0, NUM_EXPERTS, SEQUENCES * TOKENS_PER_SEQUENCE)
    experts = np.stack([first, (first + 3) % NUM_EXPERTS], axis=1)[:, :, None]
    seq_id = np.repeat(np.arange(SEQUENCES), TOKENS_PER_SEQUENCE)
    pos = np.tile(np.arange(TOKENS_PER_SEQUENCE), SEQUENCES)
    trace = RouteTrace(experts=experts, seq_id=seq_id, pos=pos, phase=np.ones_like(pos), num_experts=NUM_EXPERTS)
    save_trace(trace, path)


@pytest.fixture
def pagers(manager):
    experts = expert_weights()
    made = []
    for layer in range(NUM_LAYERS):
        store = filled_store(manager, experts, layer, table=f"layer{layer}")
        pager = LayerPager(manager=manager, store=store, layer=layer, slots=slot_tensors(NUM_SLOTS))
        pager.fill()
        made.append(pager)
    yield made
    for pager in made:
        pager.store.close()


def test_a_trace_fits_a_predictor_whose_prefetches_become_hits(tmp_path, pagers):
    chained_trace(tmp_path / "trace.npz")
    prefetcher = RoutePrefetcher(load_predictor(tmp_path / "trace.npz"), num_experts=NUM_EXPERTS, top_k=TOP_K)
    routed_first = torch.tensor([[2]])  # layer 1 will need (2 + 3) % 8 = 5, not among the filled experts 0..3
    assert 5 not in pagers[1].resident_experts()
    started = prefetcher.after_routing(0, routed_first, pagers)
    assert started == 1 and 5 in pagers[1].resident_experts()
    pagers[1].make_resident([5])
    assert (pagers[1].stats.prefetch_hits, pagers[1].stats.misses) == (1, 0)


def test_large_steps_are_not_prefetched(tmp_path, pagers):
    chained_trace(tmp_path / "trace.npz")
    prefetcher = RoutePrefetcher(load_predictor(tmp_path / "trace.npz"), num_experts=NUM_EXPERTS, top_k=TOP_K)
    assert prefetcher.after_routing(0, torch.zeros(1000, TOP_K, dtype=torch.long), pagers) == 0


def test_device_pagers_get_their_layers_step_table_and_no_prefetcher(tmp_path, manager):
    chained_trace(tmp_path / "trace.npz")
    config = ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=NUM_SLOTS, pager=ExpertPager.DEVICE,
                              predictor_path=str(tmp_path / "trace.npz"))
    runtime = TierRuntime.__new__(TierRuntime)  # the registry part alone: no tiers needed
    runtime.config, runtime.predictor, runtime.pagers, runtime.prefetcher = (
        config, load_predictor(config.predictor_path), {}, None)
    experts = expert_weights()
    pagers = [DeviceLayerPager(store=filled_store(manager, experts, layer, table=f"layer{layer}"), layer=layer,
                               slots=slot_tensors(NUM_SLOTS), policy="predicted") for layer in range(NUM_LAYERS + 1)]
    for layer, pager in enumerate(pagers[:NUM_LAYERS]):
        runtime.add_pager(pager, top_k=TOP_K)
        expected = torch.from_numpy(runtime.predictor.step[layer]).double().mul(1 << 20).round().long()
        assert torch.equal(pager.pager.scores[0], expected)
    assert runtime.prefetcher is None and runtime.after_routing(0, torch.tensor([[2]])) == 0
    with pytest.raises(ConfigError, match=r"tiered MoE layer 2 .* has no step table .*\(2 MoE layers\)"):
        runtime.add_pager(pagers[NUM_LAYERS], top_k=TOP_K)
    for pager in pagers:
        pager.store.close()


def test_a_predictor_file_of_another_kind_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a routing trace"):
        load_predictor(tmp_path / "predictor.json")
