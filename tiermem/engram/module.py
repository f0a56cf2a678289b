"""The Engram block (DeepSeek's ``Engram`` of ``engram_demo_v1.py``) fed by rows from any tier.

``forward(hidden, rows)`` takes the rows a lookup handle returned, so where the table lives (HBM
or a host tier) only changes where rows come from, never the output. Per hyper-connection group
``g`` (``hc_mult`` groups; 1 for a plain residual stream), with ``e`` the concatenated rows:

    s    = <RMSNorm_g(W_K,g e), RMSNorm_g(h_g)> / sqrt(hidden_size)
    gate = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))
    v_g  = gate * (W_V e)
    out  = h + v + SiLU(causal depthwise conv(RMSNorm(v)))   (kernel 4, dilation max_ngram_order)

Parameter names match the demo (``value_proj``, ``key_projs``, ``norm1``, ``norm2``,
``short_conv.conv``, ``short_conv.norms``), so its state dict loads without the embedding table.
Decode keeps the conv's history in ``conv_state`` (``[B, (kernel - 1) * dilation, hc_mult *
hidden_size]``, normalised values), updated in place, like the conv caches of serving engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.config import option, require
from tiermem.errors import ConfigError

GATE_FLOOR = 1e-6


@dataclass(frozen=True)
class EngramModuleConfig:
    """Dimensions of one Engram block."""

    hidden_size: int = option(help="model hidden size")
    num_heads: int = option(help="rows per token: (max_ngram_order - 1) * heads_per_order")
    row_dim: int = option(help="values per row (the demo's n_embed_per_ngram // n_head_per_ngram)")
    hc_mult: int = option(1, help="hyper-connection groups of the residual stream (1: plain residual)")
    conv_kernel_size: int = option(4, help="taps of the short causal depthwise conv")
    conv_dilation: int = option(3, help="dilation of the conv (the demo uses max_ngram_order)")
    conv_norm_eps: float = option(1e-5, help="epsilon of the RMSNorms before the conv")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "row_dim", "hc_mult", "conv_kernel_size", "conv_dilation"):
            require(getattr(self, name) >= 1, self, f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def conv_span(self) -> int:
        """Past positions the conv reads: (kernel - 1) * dilation."""
        return (self.conv_kernel_size - 1) * self.conv_dilation


class ShortConv(nn.Module):
    """Per-group RMSNorm, then a causal depthwise conv over time, then SiLU."""

    def __init__(self, config: EngramModuleConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.hidden_size * config.hc_mult
        self.norms = nn.ModuleList(nn.RMSNorm(config.hidden_size, eps=config.conv_norm_eps)
                                   for _ in range(config.hc_mult))
        self.conv = nn.Conv1d(channels, channels, config.conv_kernel_size, groups=channels, bias=False,
                              dilation=config.conv_dilation)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, T, G, D] -> [B, T, G, D]; ``conv_state`` [B, span, G*D] is read, then advanced."""
        batch, steps, groups, width = x.shape
        normed = torch.cat([norm(x[:, :, g]) for g, norm in enumerate(self.norms)], dim=-1)
        span = self.config.conv_span
        if conv_state is None:
            history = normed.new_zeros(batch, span, groups * width)
        else:
            history = conv_state
        window = torch.cat([history, normed], dim=1)
        if conv_state is not None:
            conv_state.copy_(window[:, window.shape[1] - span:])
        mixed = F.conv1d(window.transpose(1, 2), self.conv.weight, dilation=self.config.conv_dilation,
                         groups=groups * width)
        return F.silu(mixed).transpose(1, 2).reshape(batch, steps, groups, width)


class EngramModule(nn.Module):
    """Adds the gated, convolved Engram memory of each token to the residual stream."""

    def __init__(self, config: EngramModuleConfig) -> None:
        super().__init__()
        self.config = config
        engram_dim = config.num_heads * config.row_dim
        self.value_proj = nn.Linear(engram_dim, config.hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(engram_dim, config.hidden_size) for _ in range(config.hc_mult))
        self.norm1 = nn.ModuleList(nn.RMSNorm(config.hidden_size) for _ in range(config.hc_mult))
        self.norm2 = nn.ModuleList(nn.RMSNorm(config.hidden_size) for _ in range(config.hc_mult))
        self.short_conv = ShortConv(config)

    def new_conv_state(self, batch: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Zeroed decode history for ``batch`` sequences (what a sequence start looks like)."""
        weight = self.value_proj.weight
        channels = self.config.hc_mult * self.config.hidden_size
        return torch.zeros(batch, self.config.conv_span, channels, dtype=weight.dtype, device=device or weight.device)

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [B, T, D] (or [B, T, G, D] with hyper-connections), ``rows`` [B, T, heads, row_dim].

        Returns ``hidden`` plus the Engram output, same shape. ``conv_state`` carries decode history.
        """
        grouped = hidden if hidden.dim() == 4 else hidden.unsqueeze(2)
        expected = (*grouped.shape[:2], self.config.num_heads, self.config.row_dim)
        if grouped.shape[2:] != (self.config.hc_mult, self.config.hidden_size) or tuple(rows.shape) != expected:
            raise ConfigError(f"engram module: hidden {tuple(hidden.shape)} and rows {tuple(rows.shape)} do not "
                              f"match hidden_size={self.config.hidden_size}, hc_mult={self.config.hc_mult}, rows "
                              f"{expected}")
        memory = rows.flatten(-2).to(self.value_proj.weight.dtype)
        scale = math.sqrt(self.config.hidden_size)
        gates = []
        for g in range(self.config.hc_mult):
            key = self.norm1[g](self.key_projs[g](memory))
            query = self.norm2[g](grouped[:, :, g])
            score = (key * query).sum(dim=-1) / scale
            score = score.abs().clamp_min(GATE_FLOOR).sqrt() * score.sign()
            gates.append(score.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(memory).unsqueeze(2)
        out = (value + self.short_conv(value, conv_state)) + grouped  # the demo's order of additions
        return out if hidden.dim() == 4 else out.squeeze(2)
