"""Expert loaders for the checkpoint naming schemes of Qwen/DeepSeek/OLMoE, Mixtral and fused transformers 5."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiermem.errors import ConfigError
from tiermem.experts.checkpoint import CheckpointExperts

LAYERS = (1, 2)
EXPERTS = 3
H, I = 8, 4


def _weights() -> dict[tuple[int, int, str], torch.Tensor]:
    torch.manual_seed(0)
    return {(layer, e, part): torch.randn((H, I) if part == "down" else (I, H))
            for layer in LAYERS for e in range(EXPERTS) for part in ("gate", "up", "down")}


def _per_expert(weights, names: dict[str, str], block: str) -> dict[str, torch.Tensor]:
    return {f"model.layers.{layer}.{block}.experts.{e}.{names[part]}.weight": t for (layer, e, part), t in weights.items()}


@pytest.mark.parametrize("names, block, scheme", [
    ({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "mlp", "per_expert"),  # Qwen2/3, DeepSeek, OLMoE
    ({"gate": "w1", "up": "w3", "down": "w2"}, "block_sparse_moe", "mixtral"),
])
def test_per_expert_checkpoints_load_every_expert(tmp_path, names, block, scheme):
    weights = _weights()
    tensors = _per_expert(weights, names, block)
    tensors["model.layers.1.mlp.gate.weight"] = torch.zeros(EXPERTS, H)  # the router: not an expert tensor
    first = dict(list(tensors.items())[: len(tensors) // 2])
    save_file(first, tmp_path / "model-00001.safetensors")
    save_file({k: v for k, v in tensors.items() if k not in first}, tmp_path / "model-00002.safetensors")
    with CheckpointExperts(tmp_path) as source:
        assert source.scheme == scheme and source.layers == LAYERS and source.num_experts == EXPERTS
        assert source.layout.names == ("gate", "up", "down")
        for (layer, e, part), tensor in weights.items():
            assert torch.equal(source.tensors(layer, e)[part], tensor)


def test_fused_checkpoint_reads_one_expert_slice(tmp_path):
    weights = _weights()
    tensors = {}
    for layer in LAYERS:
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([weights[(layer, e, "gate")], weights[(layer, e, "up")]]) for e in range(EXPERTS)])
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [weights[(layer, e, "down")] for e in range(EXPERTS)])
    save_file(tensors, tmp_path / "model.safetensors")
    source = CheckpointExperts(tmp_path / "model.safetensors", layers=[2])
    assert source.scheme == "fused" and source.layers == (2,) and source.layout.names == ("gate_up", "down")
    got = source.tensors(2, 1)
    assert torch.equal(got["gate_up"], tensors["model.layers.2.mlp.experts.gate_up_proj"][1])
    assert torch.equal(got["down"], weights[(2, 1, "down")])


def test_fp8_scales_are_packed_next_to_their_weights(tmp_path):
    tensors = _per_expert(_weights(), {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "mlp")
    for name in list(tensors):
        tensors[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, tmp_path / "model.safetensors")
    source = CheckpointExperts(tmp_path)
    assert source.layout.names == ("gate", "gate_scale", "up", "up_scale", "down", "down_scale")
    assert source.layout.quantized


def test_missing_expert_tensors_are_named(tmp_path):
    tensors = _per_expert(_weights(), {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "mlp")
    del tensors["model.layers.2.mlp.experts.1.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="missing tensors .*layer 2 expert 1 up"):
        CheckpointExperts(tmp_path)


def test_a_checkpoint_without_experts_says_which_names_it_expects(tmp_path):
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(2, 2)}, tmp_path / "dense.safetensors")
    with pytest.raises(ConfigError, match="no expert tensors.*block_sparse_moe"):
        CheckpointExperts(tmp_path)
