"""Seeded synthetic routing traces with known structure, for tests and for sanity-checking predictors.

Invariants:
- The same config (seed included) always yields the same trace, bit for bit.
- Each (token, layer) routes to ``top_k`` distinct experts drawn without replacement in proportion to
  ``r * temporal + (1 - r) * (c * transition + (1 - c) * popularity)``, where ``r`` is
  ``reuse_probability`` and ``c`` is ``layer_correlation``. A term whose source is absent (no previous
  token, or layer 0 for the transition) is left out and the others are renormalised.
- Popularity per layer is Zipf over a random ranking of the experts (exponent 0 = uniform). Each row of
  a layer's transition matrix is Dirichlet with ``transition_concentration``; concentration 0 makes
  the matrix a permutation, so layer l+1's set is a fixed function of layer l's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tiermem.config import option, require
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and structure of a synthetic trace."""

    num_sequences: int = option(8, help="number of sequences (requests)")
    prefill_tokens: int = option(16, help="prompt tokens per sequence")
    decode_tokens: int = option(48, help="generated tokens per sequence")
    num_layers: int = option(8, help="MoE layers")
    num_experts: int = option(16, help="routed experts per layer")
    top_k: int = option(2, help="experts chosen per token per layer")
    zipf_exponent: float = option(0.0, help="popularity skew: the expert of rank r weighs r**-s; 0 = uniform")
    reuse_probability: float = option(0.0, help="weight of the previous token's experts at the same layer")
    layer_correlation: float = option(0.0, help="weight of the layer transition from the previous layer's experts")
    transition_concentration: float = option(
        0.0, help="Dirichlet concentration of each transition row; 0 = a permutation (deterministic)")
    vocab_size: int = option(1000, help="token ids are drawn uniformly from [0, vocab_size)")
    seed: int = option(0, help="seed of every random draw")

    def __post_init__(self) -> None:
        for name in ("num_sequences", "num_layers", "vocab_size"):
            require(getattr(self, name) >= 1, self, f"{name} must be >= 1")
        require(self.prefill_tokens >= 0 and self.decode_tokens >= 0, self, "token counts must be >= 0")
        require(self.prefill_tokens + self.decode_tokens >= 1, self, "each sequence needs at least one token")
        require(1 <= self.top_k <= self.num_experts, self,
                f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        require(self.zipf_exponent >= 0, self, "zipf_exponent must be >= 0")
        require(self.transition_concentration >= 0, self, "transition_concentration must be >= 0")
        for name in ("reuse_probability", "layer_correlation"):
            require(0.0 <= getattr(self, name) <= 1.0, self, f"{name} must be in [0, 1]")


def synthetic_trace(config: SyntheticConfig) -> RouteTrace:
    """Generate a trace with the popularity skew, temporal reuse and layer correlation of ``config``."""
    rng = np.random.default_rng(config.seed)
    popularity, transitions = _structure(config, rng)

    def layer_scores(layer: int, below: np.ndarray | None, before: np.ndarray | None) -> np.ndarray:
        scores = np.broadcast_to(popularity[layer], (config.num_sequences, config.num_experts))
        if below is not None:
            cross = transitions[layer][below.astype(np.int64)].mean(axis=1)
            scores = config.layer_correlation * cross + (1.0 - config.layer_correlation) * scores
        if before is not None:
            temporal = _one_hot(before, config.num_experts).mean(axis=1)
            scores = config.reuse_probability * temporal + (1.0 - config.reuse_probability) * scores
        return scores

    tokens = config.prefill_tokens + config.decode_tokens
    shape = (config.num_sequences, tokens, config.num_layers, config.top_k)
    experts = np.empty(shape, dtype=np.int16)
    weights = np.empty(shape, dtype=np.float32)
    for t in range(tokens):
        for layer in range(config.num_layers):
            below = experts[:, t, layer - 1] if layer > 0 else None
            before = experts[:, t - 1, layer] if t > 0 else None
            scores = layer_scores(layer, below, before)
            chosen = _sample_without_replacement(scores, config.top_k, popularity[layer], rng)
            experts[:, t, layer] = chosen
            weights[:, t, layer] = np.take_along_axis(scores, chosen.astype(np.int64), axis=1)
    weights /= weights.sum(axis=3, keepdims=True)
    phase = np.r_[np.full(config.prefill_tokens, PREFILL), np.full(config.decode_tokens, DECODE)]
    return RouteTrace(
        experts=experts.reshape(-1, config.num_layers, config.top_k),
        seq_id=np.repeat(np.arange(config.num_sequences), tokens),
        pos=np.tile(np.arange(tokens), config.num_sequences),
        phase=np.tile(phase, config.num_sequences),
        num_experts=config.num_experts,
        model="synthetic",
        weights=weights.reshape(-1, config.num_layers, config.top_k),
        token_ids=rng.integers(0, config.vocab_size, size=config.num_sequences * tokens),
        source=f"tiermem.predict.synthetic {config}",
    )


def gate_routed_trace(
    config: SyntheticConfig, *, hidden_size: int = 32, drift: float = 0.1
) -> tuple[RouteTrace, list[torch.Tensor]]:
    """A trace routed by random linear gates on a slowly drifting hidden state, plus those gates.

    Layer l routes token t to ``topk(gates[l] @ h[t, l])`` with ``h[t, l+1] = h[t, l] + drift * noise``,
    so applying layer l+1's gate to the hidden state entering layer l (next-gate speculation) is
    nearly exact when ``drift`` is small. Popularity, reuse and correlation settings are ignored.
    """
    rng = np.random.default_rng(config.seed)
    tokens = config.num_sequences * (config.prefill_tokens + config.decode_tokens)
    gates = [rng.standard_normal((config.num_experts, hidden_size)) for _ in range(config.num_layers)]
    hidden = np.empty((tokens, config.num_layers, hidden_size))
    hidden[:, 0] = rng.standard_normal((tokens, hidden_size))
    for layer in range(1, config.num_layers):
        hidden[:, layer] = hidden[:, layer - 1] + drift * rng.standard_normal((tokens, hidden_size))
    logits = np.einsum("tlh,leh->tle", hidden, np.stack(gates))
    experts = np.argsort(-logits, axis=2)[:, :, : config.top_k]
    base = synthetic_trace(config)
    trace = RouteTrace(
        experts=experts, seq_id=base.seq_id, pos=base.pos, phase=base.phase, num_experts=config.num_experts,
        model="synthetic-gated", token_ids=base.token_ids, hidden=hidden.astype(np.float16),
        source=f"tiermem.predict.synthetic.gate_routed_trace hidden_size={hidden_size} drift={drift} {config}",
    )
    return trace, [torch.tensor(g, dtype=torch.float32) for g in gates]


def _structure(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    experts = config.num_experts
    ranks = np.stack([rng.permutation(experts) for _ in range(config.num_layers)]) + 1.0
    popularity = ranks ** -config.zipf_exponent
    popularity /= popularity.sum(axis=1, keepdims=True)
    transitions = np.empty((config.num_layers, experts, experts))
    for layer in range(config.num_layers):
        if config.transition_concentration == 0.0:
            transitions[layer] = np.eye(experts)[rng.permutation(experts)]
        else:
            transitions[layer] = rng.dirichlet(np.full(experts, config.transition_concentration), size=experts)
    return popularity, transitions


def _one_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    return np.eye(num_experts)[ids.astype(np.int64)]


def _sample_without_replacement(
    scores: np.ndarray, k: int, fallback: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Gumbel top-k: ``k`` distinct columns per row drawn in proportion to ``scores``.

    A vanishing share of ``fallback`` keeps at least ``k`` candidates when ``scores`` has fewer
    positive entries (e.g. a Dirichlet transition row that collides).
    """
    with np.errstate(divide="ignore"):
        keys = np.log(scores + 1e-12 * fallback) + rng.gumbel(size=scores.shape)
    return np.argsort(-keys, axis=1)[:, :k].astype(np.int16)
