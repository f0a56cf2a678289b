"""Shared fixtures: a small CPU tier manager and tiny expert weights (sglang-free; modules that need
sglang skip themselves with ``pytest.importorskip``)."""

from __future__ import annotations

import pytest
import torch
from tiermem.experts.layout import ExpertLayout
from tiermem.experts.placement import single_tier
from tiermem.experts.store import ExpertStore
from tiermem.manager import TierManager

SMALL_TIER_BYTES = 8 << 20
NUM_EXPERTS = 8
HIDDEN = 16
INTERMEDIATE = 8
TOP_K = 2
# An emulated cxl tier registered with CUDA (the GPU reads its homes): for GPU tests.
REGISTERED_CXL = {"tiers": [{"kind": "cxl", "backing": "emulated", "capacity_bytes": "8MiB", "arena_bytes": "1MiB"}]}


@pytest.fixture
def manager():
    """An emulated cxl tier and a dram tier, 8 MiB each, never registered with CUDA: fast on a CPU."""
    config = {"tiers": [
        {"kind": "cxl", "backing": "emulated", "capacity_bytes": SMALL_TIER_BYTES, "arena_bytes": "1MiB",
         "register_cuda": "never"},
        {"kind": "dram", "capacity_bytes": SMALL_TIER_BYTES, "arena_bytes": "1MiB", "register_cuda": "never"},
    ]}
    with TierManager.from_config(config) as tm:
        yield tm


def expert_weights(num_experts: int = NUM_EXPERTS, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per-expert ``gate_up [2I, H]`` and ``down [H, I]`` float32 weights, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"gate_up": torch.randn(2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.2,
         "down": torch.randn(HIDDEN, INTERMEDIATE, generator=generator) * 0.2}
        for _ in range(num_experts)
    ]


def filled_store(manager: TierManager, experts: list[dict[str, torch.Tensor]], layer: int, *,
                 tier: str = "cxl", table: str = "experts") -> ExpertStore:
    """An ``ExpertStore`` holding ``experts`` as MoE layer ``layer``'s, every home on ``tier``."""
    store = ExpertStore(manager, layout=ExpertLayout.of(experts[0]), layers=[layer], num_experts=len(experts),
                        placement=single_tier(tier, 1, len(experts)), table=table)
    for index, tensors in enumerate(experts):
        store.write(layer, index, tensors)
    return store


def slot_tensors(num_slots: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Zeroed slots for the tiny experts: ``gate_up [K, 2I, H]`` and ``down [K, H, I]``."""
    return {"gate_up": torch.zeros(num_slots, 2 * INTERMEDIATE, HIDDEN, device=device),
            "down": torch.zeros(num_slots, HIDDEN, INTERMEDIATE, device=device)}


def entry_outputs(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """One routed entry's output, router-weighted: ``w * down(silu(gate x) * up x)``; rows of ``hidden``."""
    gate, up = (hidden @ gate_up.T).chunk(2, dim=-1)
    return weight[:, None] * ((torch.nn.functional.silu(gate) * up) @ down.T)


def reference_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  experts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The unpaged MoE output: every entry on its own expert, summed over top-k in order."""
    entries = torch.stack([
        torch.cat([entry_outputs(hidden[t:t + 1], experts[int(topk_ids[t, k])]["gate_up"],
                                 experts[int(topk_ids[t, k])]["down"], topk_weights[t, k:k + 1])
                   for t in range(hidden.shape[0])])
        for k in range(topk_ids.shape[1])
    ], dim=1)  # [T, top_k, H]
    out = entries[:, 0].clone()
    for k in range(1, entries.shape[1]):
        out += entries[:, k]
    return out
