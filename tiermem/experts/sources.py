"""Where expert weights come from before they get a home: in-memory modules (this file) or checkpoints.

An ``ExpertSource`` names the MoE layers (real layer indices), the experts per layer, the packed
layout and, per expert, its tensors under the canonical names of ``tiermem.experts.layout``.

Two in-memory module layouts are understood:
- fused (transformers >= 5 ``*Experts`` modules, SGLang-style): parameters ``gate_up_proj [E, 2I, H]``
  and ``down_proj [E, H, I]``;
- a ``ModuleList`` of per-expert MLPs (transformers < 5, DeepSeek remote code, Mixtral): each with
  ``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2`` linear layers without bias.
Anything else raises ``ConfigError`` naming what the module holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from tiermem.errors import ConfigError
from tiermem.experts.layout import ExpertLayout

# Per-expert MLP attribute names -> canonical projection names.
_MLP_NAMES = (
    {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    {"w1": "gate", "w3": "up", "w2": "down"},
)


class ExpertSource(Protocol):
    """Expert weights of every MoE layer, one expert at a time."""

    layout: ExpertLayout
    layers: tuple[int, ...]
    num_experts: int

    def tensors(self, layer: int, expert: int) -> Mapping[str, torch.Tensor]:
        """The tensors of ``expert`` of real layer ``layer``, named as in ``layout``."""
        ...


def expert_tensors(module: nn.Module) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """``(num_experts, per-expert canonical tensors)`` of an experts module in either layout (no copies)."""
    fused = _fused_tensors(module)
    if fused is not None:
        return len(fused), fused
    if isinstance(module, nn.ModuleList) and len(module) > 0:
        return len(module), [_mlp_tensors(expert, f"[{i}]") for i, expert in enumerate(module)]
    params = sorted(name for name, _ in module.named_parameters(recurse=False))
    raise ConfigError(
        f"experts: cannot read experts from {type(module).__name__} (direct parameters {params}, children "
        f"{[name for name, _ in module.named_children()]}); expected fused gate_up_proj [E, 2I, H] + down_proj "
        f"[E, H, I] parameters, or a ModuleList of MLPs with gate_proj/up_proj/down_proj or w1/w3/w2"
    )


class ModuleExperts:
    """An ``ExpertSource`` over the experts modules of a model, one per MoE layer."""

    def __init__(self, modules: Mapping[int, nn.Module]) -> None:
        if not modules:
            raise ConfigError("experts: no MoE layers given; pass {layer index: experts module}")
        self.layers = tuple(sorted(modules))
        self._experts: dict[int, list[dict[str, torch.Tensor]]] = {}
        counts = set()
        for layer in self.layers:
            count, tensors = expert_tensors(modules[layer])
            self._experts[layer] = tensors
            counts.add(count)
        if len(counts) != 1:
            raise ConfigError(f"experts: MoE layers have different expert counts {sorted(counts)}; a store needs one")
        self.num_experts = counts.pop()
        self.layout = ExpertLayout.of(self._experts[self.layers[0]][0])

    def tensors(self, layer: int, expert: int) -> Mapping[str, torch.Tensor]:
        return self._experts[layer][expert]


def _fused_tensors(module: nn.Module) -> list[dict[str, torch.Tensor]] | None:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        raise ConfigError(
            f"experts: {type(module).__name__} stores transposed or biased expert weights "
            f"(is_transposed={getattr(module, 'is_transposed', False)}, has_bias={getattr(module, 'has_bias', False)}); "
            "only [E, 2I, H] / [E, H, I] weights without bias are supported"
        )
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0] \
            or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise ConfigError(
            f"experts: {type(module).__name__} has gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(down.shape)}; expected [E, 2I, H] and [E, H, I]"
        )
    return [{"gate_up": gate_up.data[e], "down": down.data[e]} for e in range(gate_up.shape[0])]


def _mlp_tensors(expert: nn.Module, where: str) -> dict[str, torch.Tensor]:
    for names in _MLP_NAMES:
        linears = {attr: getattr(expert, attr, None) for attr in names}
        if all(isinstance(m, nn.Linear) for m in linears.values()):
            if any(m.bias is not None for m in linears.values()):
                raise ConfigError(f"experts: expert {where} has biased projections; only bias-free experts are supported")
            return {names[attr]: m.weight.data for attr, m in linears.items()}
    raise ConfigError(
        f"experts: expert {where} ({type(expert).__name__}) has children "
        f"{[name for name, _ in expert.named_children()]}; expected gate_proj/up_proj/down_proj or w1/w3/w2 linears"
    )
