"""TieredMoEMethod on a tiny layer, on a CPU: load through SGLang's own loaders, page, run, compare.

The layer is a real ``FusedMoE`` whose ``__init__`` is skipped (it needs a published SGLang runtime
context and a GPU runner) and whose attributes are set as ``__init__`` would for one GPU. The base
method is SGLang's ``UnquantizedFusedMoEMethod`` (real ``create_weights`` and post-load step) with a
torch ``apply`` in place of the triton kernel, and the runner contract is its torch equivalent: what
the GPU runs is the same sequence of method calls with SGLang's kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, entry_outputs, expert_weights, reference_moe

pytest.importorskip("sglang")

from sglang.srt.layers.moe import MoeRunnerConfig
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.moe.paged_experts.runners import run_on_slots
from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput
from sglang.srt.layers.moe.topk import StandardTopKOutput
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
from tiermem.errors import ConfigError
from tiermem.predict.trace import RouteTrace, save_trace

from tiermem_sglang.config import ExpertPager, ExpertTier, ExpertTierConfig
from tiermem_sglang.method import TieredMoEMethod
from tiermem_sglang.runtime import close_runtimes

NUM_SLOTS = 3
LAYER_ID = 0
TOKENS = 5


class TorchUnquantizedMethod(UnquantizedFusedMoEMethod):
    """SGLang's unquantized method with its kernel replaced by torch (router-weighted entries: no_combine)."""

    def create_moe_runner(self, layer, moe_runner_config):
        self.runner_config = moe_runner_config

    def apply(self, layer, dispatch_output):
        hidden, topk = dispatch_output.hidden_states, dispatch_output.topk_output
        assert self.runner_config.no_combine and self.runner_config.num_local_experts == layer.num_local_experts
        entries = torch.stack([
            torch.cat([entry_outputs(hidden[t:t + 1], layer.w13_weight.data[int(topk.topk_ids[t, k])],
                                     layer.w2_weight.data[int(topk.topk_ids[t, k])], topk.topk_weights[t, k:k + 1])
                       for t in range(hidden.shape[0])])
            for k in range(topk.topk_ids.shape[1])
        ], dim=1)
        return dispatch_output._replace(hidden_states=entries)


class TorchContract:
    """The triton contract of ``paged_experts.runners`` in torch: merge wave entries, sum top-k in order."""

    def run_wave(self, base_method, layer, dispatch_output, slots, merged):
        partial = run_on_slots(base_method, layer, dispatch_output, slots)
        return partial if merged is None else torch.where((slots < 0).unsqueeze(-1), merged, partial)

    def finish(self, merged, hidden_states, routed_scaling_factor):
        out = merged[:, 0].clone()
        for k in range(1, merged.shape[1]):
            out += merged[:, k]
        return out * routed_scaling_factor if routed_scaling_factor != 1.0 else out


def tiny_fused_moe() -> FusedMoE:
    layer = FusedMoE.__new__(FusedMoE)
    torch.nn.Module.__init__(layer)
    attributes = {
        "layer_id": LAYER_ID, "layer_name": "model.layers.0.mlp.experts", "quant_config": None, "with_bias": False,
        "use_triton_kernels": False, "use_flashinfer_trtllm_moe": False, "use_deep_gemm": False, "moe_tp_rank": 0,
        "moe_tp_size": 1, "use_presharded_weights": False, "num_experts": NUM_EXPERTS, "top_k": TOP_K,
        "hidden_size": HIDDEN, "intermediate_size_per_partition": INTERMEDIATE, "weight_load_method": None,
        "_has_fused_shared": False, "num_local_experts": NUM_EXPERTS, "_num_local_routed": NUM_EXPERTS,
        "_num_global_routed": NUM_EXPERTS,
    }
    for name, value in attributes.items():
        setattr(layer, name, value)
    layer.moe_runner_config = MoeRunnerConfig(
        num_experts=NUM_EXPERTS, num_local_experts=NUM_EXPERTS, hidden_size=HIDDEN,
        intermediate_size_per_partition=INTERMEDIATE, top_k=TOP_K, params_dtype=torch.float32)
    return layer


@pytest.fixture(params=[(ExpertPager.HOST, 256), (ExpertPager.DEVICE, 256), (ExpertPager.DEVICE, 1)],
                ids=["host-pager", "device-pager", "device-pager-planned"])
def tier_config(tmp_path, request):
    """Each pager; the device pager's multi-token steps in waves decided on the device, or planned (read back)."""
    toml = tmp_path / "tiers.toml"
    toml.write_text('[[tiers]]\nkind = "cxl"\nbacking = "emulated"\ncapacity_bytes = "8MiB"\narena_bytes = "1MiB"\n'
                    'register_cuda = "never"\n')
    pager, waves_max_tokens = request.param
    yield ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=NUM_SLOTS, tiermem_config_path=str(toml),
                           pager=pager, device_waves_max_tokens=waves_max_tokens)
    close_runtimes()


def loaded_layer(config: ExpertTierConfig, experts) -> tuple[FusedMoE, TieredMoEMethod]:
    """Build, load (checkpoint names and shard ids as Qwen-MoE's load_weights uses them) and finish a layer."""
    layer = tiny_fused_moe()
    method = TieredMoEMethod(config, top_k=TOP_K, num_moe_layers=1, base_method=TorchUnquantizedMethod(),
                             contract=TorchContract())
    layer.quant_method = method
    method.create_weights(layer, num_experts=NUM_EXPERTS, hidden_size=HIDDEN,
                          intermediate_size_per_partition=INTERMEDIATE, params_dtype=torch.float32,
                          weight_loader=layer.weight_loader)
    for index, tensors in enumerate(experts):
        gate, up = tensors["gate_up"].chunk(2)
        for param, weight, proj, shard in ((layer.w13_weight, gate, "gate_proj", "w1"),
                                           (layer.w13_weight, up, "up_proj", "w3"),
                                           (layer.w2_weight, tensors["down"], "down_proj", "w2")):
            param.weight_loader(param, weight, f"experts.{index}.{proj}.weight", shard_id=shard, expert_id=index)
    method.create_moe_runner(layer, layer.moe_runner_config)
    method.process_weights_after_loading(layer)
    return layer, method


def dispatch(hidden, topk_ids, topk_weights) -> StandardDispatchOutput:
    return StandardDispatchOutput(hidden_states=hidden, hidden_states_scale=None,
                                  topk_output=StandardTopKOutput(topk_weights, topk_ids, router_logits=None))


def test_the_gpu_holds_k_slots_and_the_host_tier_every_expert(tier_config):
    experts = expert_weights()
    layer, method = loaded_layer(tier_config, experts)
    assert tuple(layer.w13_weight.shape) == (NUM_SLOTS, 2 * INTERMEDIATE, HIDDEN)
    assert tuple(layer.w2_weight.shape) == (NUM_SLOTS, HIDDEN, INTERMEDIATE)
    assert layer.num_local_experts == NUM_SLOTS
    for index, tensors in enumerate(experts):
        home = method.store.read(LAYER_ID, index)
        assert torch.equal(home["gate_up"], tensors["gate_up"]) and torch.equal(home["down"], tensors["down"])
    assert method.store.tier_of(method.store.key(LAYER_ID, 0)) == "cxl"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiered_layer_output_equals_the_unpaged_reference_bit_for_bit(tier_config, seed):
    experts = expert_weights()
    layer, method = loaded_layer(tier_config, experts)
    generator = torch.Generator().manual_seed(seed)
    for step in range(4):  # later steps reuse what earlier steps left in the slots
        hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
        topk_ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
        topk_weights = torch.rand(TOKENS, TOP_K, generator=generator)
        got = method.apply(layer, dispatch(hidden, topk_ids, topk_weights)).hidden_states
        assert torch.equal(got, reference_moe(hidden, topk_ids, topk_weights, experts)), f"step {step}"
    assert method.pager.stats.steps == 4 and method.pager.stats.waves >= 4


def decode_exactly(layer, method, experts, seed: int, steps: int, after=lambda topk_ids: True) -> None:
    """Single-token decode steps of random routing, each equal to the unpaged reference (and ``after`` true)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        hidden = torch.randn(1, HIDDEN, generator=generator)
        topk_ids = torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K].unsqueeze(0)
        topk_weights = torch.rand(1, TOP_K, generator=generator)
        got = method.apply(layer, dispatch(hidden, topk_ids, topk_weights)).hidden_states
        assert torch.equal(got, reference_moe(hidden, topk_ids, topk_weights, experts)), f"step {step}"
        assert after(topk_ids), f"step {step}"


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_steps_that_fit_the_slots_are_one_wave_and_equal_the_reference(tier_config, seed):
    experts = expert_weights()
    layer, method = loaded_layer(tier_config, experts)
    decode_exactly(layer, method, experts, seed, steps=12,
                   after=lambda topk_ids: set(topk_ids.tolist()[0]) <= method.pager.resident_experts())
    stats = method.pager.stats
    assert (stats.steps, stats.waves) == (12, 12)
    assert stats.hits + stats.misses == 12 * TOP_K and 0 < stats.misses < 12 * TOP_K
    for expert in method.pager.resident_experts():  # the slots hold the home bytes of what the pager says they do
        slot = method.pager.slot_of(expert)
        assert torch.equal(layer.w13_weight.data[slot], experts[expert]["gate_up"])
        assert torch.equal(layer.w2_weight.data[slot], experts[expert]["down"])


def test_the_device_pager_with_a_trace_evicts_by_its_step_table_and_stays_exact(tier_config, tmp_path):
    rng = np.random.default_rng(4)
    tokens = 64
    routes = np.stack([rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(tokens)])[:, None, :]
    save_trace(RouteTrace(experts=routes, seq_id=np.repeat(np.arange(8), 8), pos=np.tile(np.arange(8), 8),
                          phase=np.ones(tokens, dtype=np.int64), num_experts=NUM_EXPERTS), tmp_path / "trace.npz")
    config = dataclasses.replace(tier_config, pager=ExpertPager.DEVICE, predictor_path=str(tmp_path / "trace.npz"))
    experts = expert_weights()
    layer, method = loaded_layer(config, experts)
    assert method.pager.pager.policy == "predicted" and bool(method.pager.pager.scores.any())
    decode_exactly(layer, method, experts, seed=2, steps=10)


def test_padded_routing_entries_contribute_nothing(tier_config):
    experts = expert_weights()
    layer, method = loaded_layer(tier_config, experts)
    hidden = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(3))
    topk_ids = torch.tensor([[4, -1], [-1, -1]])
    topk_weights = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    got = method.apply(layer, dispatch(hidden, topk_ids, topk_weights)).hidden_states
    expected = entry_outputs(hidden[:1], experts[4]["gate_up"], experts[4]["down"], topk_weights[0, :1])
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], torch.zeros(HIDDEN))


def test_fewer_slots_than_top_k_is_refused_when_the_layer_is_built(tier_config):
    config = dataclasses.replace(tier_config, slots=TOP_K - 1)
    with pytest.raises(ConfigError, match=f"use --expert-tier-slots {TOP_K} or more"):
        loaded_layer(config, expert_weights())


def test_a_tier_the_manager_lacks_is_refused_naming_its_tiers(tier_config):
    config = dataclasses.replace(tier_config, expert_tier=ExpertTier.DRAM)
    with pytest.raises(ConfigError, match="names no tier of this manager"):
        loaded_layer(config, expert_weights())
