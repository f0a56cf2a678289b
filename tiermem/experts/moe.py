"""Drop-in modules whose experts live in tiermem: ``OffloadedExperts`` and the whole block, ``OffloadedMoE``.

``OffloadedExperts`` has the signature of transformers' ``*Experts`` modules,
``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``.
``OffloadedMoE`` replaces a whole MoE block: router -> top-k -> ensure resident -> compute on slot
weights -> combine with the shared expert(s). It keeps the block's router and shared-expert modules
under their original attribute names (``gate``, ``shared_expert``, ``shared_expert_gate``,
``shared_experts``), so their ``state_dict`` keys do not change, and applies them in the reference
order, so the output is bit-identical to the original block. Inference only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.errors import ConfigError
from tiermem.experts.runtime import ExpertRuntime


class SharedExperts(str, enum.Enum):
    """How a block adds its always-on expert(s) to the routed output."""

    NONE = "none"  # Mixtral, Qwen3-MoE, OLMoE
    GATED = "gated"  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
    PLAIN = "plain"  # DeepSeek-V2/V3: shared_experts(x)


class OffloadedExperts(nn.Module):
    """The routed experts of one MoE layer, computed from HBM slots filled out of an ``ExpertStore``."""

    def __init__(self, runtime: ExpertRuntime, layer: int, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.act_fn = act_fn
        self.num_experts = runtime.store.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.runtime.run_layer(self.layer, hidden_states, top_k_index, top_k_weights, self.act_fn)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


class OffloadedMoE(nn.Module):
    """A MoE block: the original router, ``OffloadedExperts``, and the original shared expert(s)."""

    def __init__(self, *, gate: nn.Module, experts: OffloadedExperts, shared: SharedExperts,
                 shared_modules: dict[str, nn.Module]) -> None:
        super().__init__()
        expected = {SharedExperts.NONE: set(), SharedExperts.GATED: {"shared_expert", "shared_expert_gate"},
                    SharedExperts.PLAIN: {"shared_experts"}}[shared]
        if set(shared_modules) != expected:
            raise ConfigError(f"OffloadedMoE: shared mode {shared.value!r} needs modules {sorted(expected)}, "
                              f"got {sorted(shared_modules)}")
        self.gate = gate
        self.experts = experts
        self.shared = shared
        for name, module in shared_modules.items():
            self.add_module(name, module)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routed = self.gate(flat)
        if not (isinstance(routed, tuple) and len(routed) == 3):
            raise ConfigError(
                f"OffloadedMoE: the router {type(self.gate).__name__} returned {type(routed).__name__}; expected the "
                "transformers >= 5 router output (router_logits, top_k_weights, top_k_index)"
            )
        _, top_k_weights, top_k_index = routed
        out = self.experts(flat, top_k_index, top_k_weights)
        if self.shared is SharedExperts.GATED:
            out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        elif self.shared is SharedExperts.PLAIN:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)
