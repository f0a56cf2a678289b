"""Shared by the repair tests: small EP deployments with round link figures, and a tiny safetensors checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from tiermem.repair.backup import BackupMap, BackupPolicyConfig, plan_backup
from tiermem.repair.fabric import FabricConfig
from tiermem.repair.placement import EpPlacement, replicate_hottest
from tiermem.types import LinkProfile

EXPERT_BYTES = 1_000_000
# Round numbers so that modelled times are easy to reason about: 1 MB takes 1 ms on a 1 GB/s link.
FABRIC = FabricConfig(
    gpus_per_node=2, nvlink=LinkProfile(8.0, 0.0), pcie=LinkProfile(4.0, 0.0), nic=LinkProfile(2.0, 0.0),
    host_nic=LinkProfile(2.0, 0.0), cxl=LinkProfile(2.0, 0.0), cxl_pool=LinkProfile(2.0, 0.0),
    disk=LinkProfile(1.0, 0.0),
)


@dataclass(frozen=True)
class Deployment:
    placement: EpPlacement
    backups: BackupMap
    load: list[list[float]]


def deployment(*, num_layers: int = 2, num_experts: int = 8, num_ranks: int = 4, slots_per_rank: int = 3,
               replicate: bool = False, dram_experts_per_node: int = 0, cxl_experts_per_node: int = 0,
               pool_experts: int = 0) -> Deployment:
    """Experts in order over the ranks; spare slots free (or filled with replicas of the hottest)."""
    load = [[float(num_experts - e + layer) for e in range(num_experts)] for layer in range(num_layers)]
    placement = EpPlacement.contiguous(num_layers=num_layers, num_logical_experts=num_experts, num_ranks=num_ranks,
                                       slots_per_rank=slots_per_rank)
    if replicate:
        placement = replicate_hottest(placement, load)
    policy = BackupPolicyConfig(dram_bytes_per_node=dram_experts_per_node * EXPERT_BYTES,
                                cxl_bytes_per_node=cxl_experts_per_node * EXPERT_BYTES,
                                cxl_pool_bytes=pool_experts * EXPERT_BYTES)
    backups = plan_backup(placement, FABRIC, policy, expert_bytes=EXPERT_BYTES, expert_load=load)
    return Deployment(placement, backups, load)


def write_checkpoint(path, *, num_layers: int, num_experts: int, hidden: int, intermediate: int, seed: int) -> None:
    """A safetensors file of SwiGLU experts under DeepSeek/Qwen names (``model.layers.{l}.mlp.experts.{e}.*``)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for expert in range(num_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            tensors[f"{prefix}.gate_proj.weight"] = torch.randn(intermediate, hidden, generator=generator)
            tensors[f"{prefix}.up_proj.weight"] = torch.randn(intermediate, hidden, generator=generator)
            tensors[f"{prefix}.down_proj.weight"] = torch.randn(hidden, intermediate, generator=generator)
    save_file(tensors, str(path))
