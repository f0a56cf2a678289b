"""A small decoder-only MoE language model whose router per layer is an ``nn.Linear(d, E)`` with softmax top-k.

Each block: ``x + attention(RMSNorm(x))``, then ``h + moe(RMSNorm(h))``. The MoE norm's output feeds the
router and the experts (as in Mixtral); the router runs in float32 (also under autocast), picks the
``top_k`` experts of ``softmax(router(...))`` and weighs their SwiGLU outputs by those probabilities
renormalised over the chosen ``top_k``. The load-balancing loss is Switch Transformer's
``E * sum_e f_e * P_e`` (``f_e``: share of routed slots on expert e, ``P_e``: mean router probability),
averaged over layers.

Invariants:
- Dispatch is dropless: every token reaches all of its ``top_k`` experts (no capacity factor), so the
  recorded routing is exactly the routing the model computes with. Slots are sorted by expert and
  unsorted by a permutation, so no step accumulates with atomics (no ``index_add_``).
- ``route`` returns, per layer, the chosen experts, their weights and ``hidden``: the residual entering
  the layer's router scaled to unit RMS (the norm before its learned gain). ``router_gates`` folds that
  gain into the router weight, so ``topk(gates[l] @ hidden[l]) == experts[l]`` up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.config import option, require
from tiermem.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model and the weight of its load-balancing loss."""

    vocab_size: int = option(8192, help="tokenizer vocabulary size")
    seq_len: int = option(512, help="longest sequence (learned positions)")
    d_model: int = option(512, help="residual width")
    num_heads: int = option(8, help="attention heads")
    num_layers: int = option(8, help="blocks, each with one MoE layer")
    num_experts: int = option(32, help="experts per MoE layer")
    top_k: int = option(4, help="experts per token per layer")
    expert_ffn: int = option(512, help="hidden width of one SwiGLU expert")
    aux_loss_weight: float = option(0.01, help="weight of the load-balancing loss")
    norm_eps: float = option(1e-6, help="RMSNorm epsilon")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "num_heads", "num_layers", "num_experts", "top_k",
                     "expert_ffn"):
            require(getattr(self, name) >= 1, self, f"{name} must be >= 1")
        require(self.d_model % self.num_heads == 0, self, f"d_model {self.d_model} must divide by num_heads "
                                                          f"{self.num_heads}")
        require(self.top_k <= self.num_experts, self, f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        require(self.aux_loss_weight >= 0 and self.norm_eps > 0, self, "need aux_loss_weight >= 0 and norm_eps > 0")


def tiny_config(vocab_size: int) -> ModelConfig:
    """The routing shape of the full model (8 layers, 32 experts, top-4) at a width a CPU trains in seconds."""
    return ModelConfig(vocab_size=vocab_size, seq_len=128, d_model=64, num_heads=4, expert_ffn=64)


@dataclass(frozen=True, eq=False)
class LayerRoutes:
    """One MoE layer's routing of a batch, flattened over ``N = batch x positions`` tokens."""

    experts: torch.Tensor  # int64 [N, K]
    weights: torch.Tensor  # float32 [N, K] renormalised probabilities of the chosen experts
    hidden: torch.Tensor  # float32 [N, d] unit-RMS residual entering the router


@dataclass(frozen=True, eq=False)
class Output:
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # scalar, load balancing, mean over layers
    routes: tuple[LayerRoutes, ...] = ()  # per layer, only when asked for
    embedded: torch.Tensor | None = None  # [N, d] unit-RMS residual entering layer 0, only when asked for


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class MoE(nn.Module):
    """Router + experts; the experts' weights are stacked per layer, ``w13`` fusing gate and up projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, width, ffn = config.num_experts, config.d_model, config.expert_ffn
        self.top_k = config.top_k
        self.router = nn.Linear(width, experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(experts, 2 * ffn, width) / width ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, width, ffn) / ffn ** 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` is ``[N, d]``; returns the output ``[N, d]``, the balance loss, chosen experts and weights."""
        with torch.autocast(x.device.type, enabled=False):
            probs = torch.softmax(self.router(x.float()), dim=-1)  # [N, E]
        top_probs, experts = probs.topk(self.top_k, dim=-1)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        num_tokens, num_experts = probs.shape
        flat = experts.reshape(-1)
        counts = torch.bincount(flat, minlength=num_experts)
        balance = num_experts * (counts.float() / flat.numel() * probs.mean(dim=0)).sum()
        order = flat.argsort(stable=True)  # slots (token * K + k) grouped by expert
        device = x.device.type
        low = x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x  # cast once
        slots = low.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, x.shape[1])[order]
        # split/unbind (not per-expert indexing) so that backward is one cat/stack, not a zero-filled
        # full-size gradient per expert
        chunks = slots.split(counts.tolist())  # one host sync per layer
        outputs = []
        for chunk, w13, w2 in zip(chunks, self.w13.unbind(0), self.w2.unbind(0)):
            gate, up = F.linear(chunk, w13).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, w2))
        per_slot = torch.cat(outputs)[order.argsort()].view(num_tokens, self.top_k, -1)
        out = (per_slot.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        return out, balance, experts, weights


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.moe_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.moe = MoE(config)

    def forward(self, x: torch.Tensor, record: bool) -> tuple[torch.Tensor, torch.Tensor, LayerRoutes | None]:
        h = x + self.attn(self.attn_norm(x))
        batch, length, width = h.shape
        out, balance, experts, weights = self.moe(self.moe_norm(h).reshape(-1, width))
        routes = LayerRoutes(experts, weights, unit_rms(h.reshape(-1, width), self.eps)) if record else None
        return h + out.view(batch, length, width), balance, routes


class MoeLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        for block in self.blocks:  # scale the residual branches down with depth (GPT-2)
            for weight in (block.attn.out.weight, block.moe.w2):
                weight.data.mul_((2 * config.num_layers) ** -0.5)

    def forward(self, tokens: torch.Tensor, *, record: bool = False) -> Output:
        """``tokens`` ``[B, S]``; logits share the embedding matrix; ``record`` also returns every layer's routes."""
        length = tokens.shape[1]
        if length > self.config.seq_len:
            raise ConfigError(f"moe_lm: a sequence of {length} tokens exceeds the model's seq_len "
                              f"{self.config.seq_len}; cut it to {self.config.seq_len} tokens")
        x = self.embed(tokens) + self.positions.weight[:length]
        embedded = unit_rms(x.reshape(-1, x.shape[-1]), self.config.norm_eps) if record else None
        balance, routes = [], []
        for block in self.blocks:
            x, layer_balance, layer_routes = block(x, record)
            balance.append(layer_balance)
            if layer_routes is not None:
                routes.append(layer_routes)
        logits = F.linear(self.norm(x), self.embed.weight)
        return Output(logits, torch.stack(balance).mean(), tuple(routes), embedded)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(language-model loss, load-balancing loss)``; train on ``lm + aux_loss_weight * balance``."""
        output = self(tokens)
        lm = F.cross_entropy(output.logits.float().reshape(-1, output.logits.shape[-1]), labels.reshape(-1))
        return lm, output.aux_loss


def router_gates(model: MoeLM) -> torch.Tensor:
    """float32 ``[L, E, d]``: each router's weight with its MoE norm's gain folded in (for ``NextGatePredictor``)."""
    return torch.stack([block.moe.router.weight.detach().float() * block.moe_norm.weight.detach().float()
                        for block in model.blocks])
