"""OffloadedMoE and tiermem.offload: bit-identical to the all-resident module, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiermem.errors import CapacityError, ConfigError
from tiermem.experts import OffloadedMoE, offload
from tiermem.experts.compute import route
from tiermem.experts.grouped import wave_rows
from tiermem.predict.base import RouteContext

from .conftest import HIDDEN, NUM_EXPERTS, TOP_K, FusedExperts

DECODE_STEPS = 6
BATCH = 3


class TopKRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.top_k = TOP_K
        self.weight = nn.Parameter(torch.randn(NUM_EXPERTS, HIDDEN))

    def forward(self, hidden):
        logits = F.linear(hidden, self.weight)
        weights, index = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), TOP_K, dim=-1)
        return logits, (weights / weights.sum(dim=-1, keepdim=True)).to(hidden.dtype), index


class ReferenceMoE(nn.Module):
    """The transformers reference loop (eager experts), with a DeepSeek-style shared expert."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = TopKRouter()
        self.experts = FusedExperts()
        self.shared_experts = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, hidden_states):
        flat = hidden_states.view(-1, HIDDEN)
        _, weights, index = self.gate(flat)
        final = torch.zeros_like(flat)
        mask = F.one_hot(index, num_classes=NUM_EXPERTS + 1).permute(2, 1, 0)
        for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            pos, tokens = torch.where(mask[expert[0]])
            gate, up = F.linear(flat[tokens], self.experts.gate_up_proj[expert[0]]).chunk(2, dim=-1)
            out = F.linear(self.experts.act_fn(gate) * up, self.experts.down_proj[expert[0]])
            final.index_add_(0, tokens, (out * weights[tokens, pos, None]).to(final.dtype))
        return final.view(hidden_states.shape) + self.shared_experts(hidden_states)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = ReferenceMoE()


class TinyModel(nn.Module):
    def __init__(self, num_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(num_layers)])

    def forward(self, hidden):
        for layer in self.layers:
            hidden = hidden + layer.mlp(hidden)
        return hidden


class FirstExperts:
    """A predictor that always expects experts 0 and 1."""

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        scores = np.zeros((distance, context.batch_size, context.num_experts), dtype=np.float32)
        scores[:, :, :2] = 1.0
        return scores


@pytest.mark.parametrize("config, predictor", [
    ({"resident_fraction": 0.34, "policy": "lru"}, None),
    ({"resident_fraction": 0.5, "policy": "lfu", "slot_layout": "shared"}, None),
    ({"resident_fraction": 0.34, "prefetch": {"distance": 1, "objects_per_layer": 1}}, FirstExperts()),
    ({"resident_fraction": 0.5, "slot_layout": "shared", "prefetch": {"distance": 1, "objects_per_layer": 2}},
     FirstExperts()),
])
def test_offloaded_moe_is_bit_identical_to_the_resident_module(config, predictor):
    torch.manual_seed(0)
    model = TinyModel().eval()
    prompt = torch.randn(BATCH, 5, HIDDEN)
    steps = [torch.randn(BATCH, 1, HIDDEN) for _ in range(DECODE_STEPS)]
    with torch.no_grad():
        expected = [model(prompt)] + [model(x) for x in steps]
        handle = offload(model, tier="sim", config=config, predictor=predictor)
        got = [model(prompt)] + [model(x) for x in steps]
    assert isinstance(model.layers[0].mlp, OffloadedMoE)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    stats = handle.stats()
    assert stats["misses"] > 0 and 0.0 < stats["hit_rate"] < 1.0 and stats["bytes_by_tier"]["sim"] > 0
    assert "gate.weight" in dict(model.layers[0].mlp.named_parameters())
    handle.close()
    handle.close()
    with pytest.raises(ConfigError, match="closed"), torch.no_grad():
        model(prompt)


def test_a_budget_below_one_tokens_working_set_says_how_many_bytes_are_needed():
    model = TinyModel()
    with pytest.raises(CapacityError, match=r"needs \d+ object\(s\) = \d+ bytes"):
        offload(model, tier="sim", hbm_budget_bytes=4096)


def test_an_unknown_moe_layout_names_the_modules_found():
    model = nn.Sequential(nn.Module())
    model[0].experts = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match=r"Found: 0 \(Module: children \['experts'\]"):
        offload(model, tier="sim", config={"resident_fraction": 0.5})


def test_belady_is_refused_outside_the_simulator():
    with pytest.raises(ConfigError, match="simulation only"):
        offload(TinyModel(), tier="sim", config={"resident_fraction": 0.5, "policy": "belady"})




def _tiny_transformers_models():
    hf = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    deepseek = dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                    qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1, num_key_value_heads=4)
    return {
        "qwen3_moe": (hf.Qwen3MoeConfig, hf.Qwen3MoeForCausalLM,
                      dict(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
        "qwen2_moe": (hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM,
                      dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                           num_experts_per_tok=2)),
        "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2)),
        "deepseek_v3": (hf.DeepseekV3Config, hf.DeepseekV3ForCausalLM, {**deepseek, "num_hidden_layers": 3}),
    }, common


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_offloaded_transformers_model_gives_the_same_logits(arch, implementation):
    models, common = _tiny_transformers_models()
    config_cls, model_cls, extra = models[arch]
    torch.manual_seed(0)
    model = model_cls._from_config(config_cls(**{**common, **extra}), experts_implementation=implementation).eval()
    ids = torch.randint(0, common["vocab_size"], (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
        handle = offload(model, tier="sim", config={"resident_fraction": 0.25})
        got = model(ids).logits
    assert handle.runtime.compute.value == {"eager": "loop", "grouped_mm": "grouped"}[implementation]
    assert torch.equal(expected, got)
    assert len(handle.blocks) == 2  # DeepSeek-V3: its first layer is dense (first_k_dense_replace=1)
    handle.close()


def test_route_groups_tokens_exactly_as_torch_where_on_the_reference_mask():
    num_tokens, top_k, num_experts = 37, 4, 9
    index = torch.randint(0, num_experts, (num_tokens, top_k), generator=torch.Generator().manual_seed(3))
    index[5, 2] = -1  # a dropped slot is skipped, as the reference's one-hot mask skips it
    routing = route(index, num_experts, torch.device("cpu"))
    mask = index.t()
    expected = [e for e in range(num_experts) if (mask == e).any()]
    assert list(routing.experts) == expected
    for expert in expected:
        top_k_pos, token_idx = torch.where(mask == expert)
        assert torch.equal(routing.token_idx[expert], token_idx)
        assert torch.equal(routing.top_k_pos[expert], top_k_pos)


@pytest.mark.parametrize("config", [
    {"resident_fraction": 0.25, "prefetch": {"distance": 1, "objects_per_layer": 2}},
    {"resident_fraction": 0.5, "slot_layout": "shared", "prefetch": {"distance": 1, "objects_per_layer": 2}},
])
def test_grouped_compute_with_prefetch_and_waves_matches_transformers_grouped_mm(config):
    models, common = _tiny_transformers_models()
    config_cls, model_cls, extra = models["qwen3_moe"]
    torch.manual_seed(1)
    model = model_cls._from_config(config_cls(**{**common, **extra}), experts_implementation="grouped_mm").eval()
    prompts = [torch.randint(0, common["vocab_size"], (3, 5)) for _ in range(DECODE_STEPS)]
    with torch.no_grad():
        expected = [model(ids).logits for ids in prompts]
        handle = offload(model, tier="sim", config=config, predictor=FirstExperts())
        got = [model(ids).logits for ids in prompts]
    stats = handle.stats()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert stats["prefetch_loads"] > 0 and stats["misses"] > 0
    assert config.get("slot_layout") == "shared" or stats["extra_waves"] > 0  # 15 tokens x top-2 need > 2 slots
    handle.close()


def _qwen3_on_gpu(seed: int) -> torch.nn.Module:
    """A small random-weight Qwen3-MoE in bf16 on the GPU, computing its experts with transformers' grouped_mm."""
    hf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = hf.Qwen3MoeConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                               num_experts=32, num_experts_per_tok=4)
    model = hf.Qwen3MoeForCausalLM._from_config(config, experts_implementation="grouped_mm", dtype=torch.bfloat16)
    return model.to("cuda").eval()


FIRST_EXPERTS = FirstExperts()  # stateless: one serves every offload


def _offloaded_logits(model: torch.nn.Module, prompts: list[torch.Tensor], config: dict,
                      predictor: FirstExperts | None = FIRST_EXPERTS,
                      inspect=lambda handle: None) -> tuple[list, list, dict]:
    """The logits of ``prompts`` all-resident, then offloaded to ``dram`` with ``config`` (``inspect`` sees the
    handle before it closes); and the handle's stats."""
    with torch.no_grad():
        expected = [model(ids).logits for ids in prompts]
        handle = offload(model, tier="dram", config=config, predictor=predictor)
        got = [model(ids).logits for ids in prompts]
    inspect(handle)
    stats = handle.stats()
    handle.close()
    return expected, got, stats


@pytest.mark.gpu
def test_grouped_compute_on_the_gpu_is_bit_identical_to_transformers_grouped_mm():
    model = _qwen3_on_gpu(seed=2)
    prompts = [torch.randint(0, 256, (batch, 4), device="cuda") for batch in (1, 8, 1, 8, 64)]
    expected, got, stats = _offloaded_logits(model, prompts, {"resident_fraction": 0.25, "prefetch": {"distance": 1}})
    assert stats["misses"] > 0 and stats["extra_waves"] > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.gpu
def test_layers_replayed_from_cuda_graphs_are_bit_identical_to_transformers_grouped_mm():
    model = _qwen3_on_gpu(seed=4)
    prompts = [torch.randint(0, 256, (batch, 1), device="cuda") for batch in (1, 2, 1, 2, 1, 1, 2)]
    # 16 slots per layer: every decode layer is one wave
    expected, got, stats = _offloaded_logits(model, prompts, {"resident_fraction": 0.5, "prefetch": {"distance": 1}})
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert stats["graphs_captured"] >= 2 and stats["graph_replays"] > stats["graphs_captured"]


class RecordsHidden(FirstExperts):
    """FirstExperts that keeps the hidden state of every context it is asked about."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor | None] = []

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        self.hidden.append(context.hidden)
        return super().predict(context, distance)


def test_predictors_inside_offload_see_the_anchor_layers_router_input():
    models, common = _tiny_transformers_models()
    config_cls, model_cls, extra = models["qwen3_moe"]
    torch.manual_seed(3)
    model = model_cls._from_config(config_cls(**{**common, **extra}), experts_implementation="grouped_mm").eval()
    inputs = []
    model.model.layers[0].mlp.gate.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    predictor = RecordsHidden()
    ids = torch.randint(0, common["vocab_size"], (2, 3))
    with torch.no_grad():
        # no link window: it admits nothing (so predicts nothing) before it has measured a lead, and this test is
        # about what every prediction sees
        handle = offload(model, tier="sim", config={"resident_fraction": 0.5,
                                                    "prefetch": {"distance": 1, "link_fill": None}},
                         predictor=predictor)
        model(ids)
    handle.close()
    assert predictor.hidden and all(h is not None for h in predictor.hidden)
    assert torch.equal(predictor.hidden[0], inputs[0].reshape(predictor.hidden[0].shape))


def test_wave_rows_groups_pairs_by_slot_stably_and_drops_experts_without_a_slot():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_experts, num_slots, num_pairs = rng.integers(1, 70), rng.integers(1, 40), rng.integers(0, 300)
        expert_of_pair = rng.integers(-2, num_experts + 2, num_pairs)  # out-of-range ids: dropped pairs
        slot_of_expert = np.where(rng.random(num_experts) < 0.6, rng.integers(0, num_slots, num_experts), -1)
        rows = wave_rows(expert_of_pair, slot_of_expert, num_slots)
        known = (expert_of_pair >= 0) & (expert_of_pair < num_experts)
        slot = np.full(num_pairs, -1)
        slot[known] = slot_of_expert[expert_of_pair[known]]
        kept = np.flatnonzero(slot >= 0)
        np.testing.assert_array_equal(rows.pairs, kept[np.argsort(slot[kept], kind="stable")])
        np.testing.assert_array_equal(rows.offsets, np.cumsum(np.bincount(slot[kept], minlength=num_slots)))
