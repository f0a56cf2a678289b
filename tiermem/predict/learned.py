"""Learned route predictor in the spirit of ExpertFlow: a small MLP over the routing seen so far.

Inputs per token: the sum of embeddings of the (layer, expert) pairs this step already routed (layers
up to the anchor), the same for the previous step's routing, an embedding of the anchor layer, an
optional hashed token-id embedding, (``history``) an embedding of the sequence's expert shares so
far and (``hidden_state``, where the training trace has hidden states) a projection of the anchor
layer's router input. Output: one logit per expert for each of the next ``max_distance`` layers, from
a head per anchor layer, plus (``wide``) linear paths from the anchor layer's experts and from the
target layer's experts one token earlier (co-occurrence tables learned discriminatively), a
per-expert gain on the sequence's share of each target-layer expert, and (``hidden_state``) a linear
path from the router input to each target layer's logits: speculative gating, initialised from the
target layers' routers when ``train`` gets them, so training starts at next-gate's ranking and adds
the routing history on top. Trained with BCE (multi-label) by ``tiermem.predict.train``.

Invariants:
- The features come from a ``RouteContext`` only, so training (on contexts replayed by
  ``contexts.anchor_batches``) and serving see exactly the same inputs.
- A saved model is ``torch.save`` of plain data (tensors, numbers, strings): the state dict, the frozen
  config as a dict and the shape it was trained for; ``load`` reads it with
  ``weights_only=True`` and rebuilds the config with ``from_dict`` (unknown keys raise). ``FORMAT``
  changes whenever the saved state does; a file of another format is refused with a retrain hint.
- A model trained with hidden states records the anchor layers that had them (``hidden_heads``); it
  refuses a context at such an anchor without ``hidden`` rather than guess (no silent degradation).
- Serving has two paths with the same predictions (float32 rounding apart): batches of up to
  ``compiled_max_batch`` rows run the compiled forward of ``learned_fast`` on the host CPU (a decode
  step's calls: ~10-20 us instead of ~300-500 us at batch 1), larger ones the torch forward on
  ``device``. Training uses the torch module only.
"""

from __future__ import annotations

import copy
import enum
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tiermem.config import from_dict, option, require, to_dict
from tiermem.errors import ConfigError, TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.common import check_context, multi_hot
from tiermem.predict.learned_fast import CompiledRouteNet, host_hidden

_HASH = 2654435761  # Knuth's multiplicative hash, spreads token ids over the buckets
FORMAT_NAME = "tiermem.learned-route-predictor"
FORMAT = f"{FORMAT_NAME}/2"  # /2: hidden-state paths (hidden_size, hidden_heads)
# Rows up to which predict runs the compiled forward. Measured on one CPU thread (8 layers x 32 experts,
# hidden state 512): 64 rows 450 us vs torch's 700 us, 128 rows 880 vs 1160, even at 256; above 64,
# torch's GEMMs on several threads or on a GPU (~0.9 ms per call, flat in the batch) take over.
COMPILED_MAX_BATCH = 64


class Refit(str, enum.Enum):
    """What happens once the search run has chosen the step count on held-back tokens."""

    SCRATCH = "scratch"  # retrain from scratch on every token for the step count scaled to the data
    CONTINUE = "continue"  # keep training the search run's best network on every token (cheaper)
    NONE = "none"  # keep the search run's best network as it is (cheapest; never saw the held-back tokens)


@dataclass(frozen=True)
class LearnedConfig:
    """Architecture and training settings of the learned predictor."""

    max_distance: int = option(4, help="layers ahead predicted per call (prefetch distance)")
    expert_dim: int = option(64, help="embedding size of a routed (layer, expert) pair; a step sums its pairs")
    anchor_dim: int = option(8, help="embedding size of the anchor layer")
    token_buckets: int = option(4096, help="hash buckets for token ids; 0 = ignore token ids")
    token_dim: int = option(16, help="embedding size of a token-id bucket")
    hidden_dim: int = option(128, help="width of the MLP")
    dropout: float = option(0.3, help="dropout after each hidden layer during training")
    wide: bool = option(True, help="add linear paths from the anchor layer's experts and from the target layer "
                                   "one token earlier to each target (learned co-occurrence tables)")
    history: bool = option(False, help="also use the sequence's expert shares so far (context.activation)")
    hidden_state: bool = option(True, help="use the anchor layer's router input (context.hidden) where the "
                                           "training trace records hidden states; ignored where it does not")
    hidden_state_dim: int = option(64, help="size of the projection of the hidden state fed to the MLP")
    max_steps: int = option(4000, help="upper bound on optimiser steps of the search for the step count")
    batch_size: int = option(256, help="contexts per optimiser step")
    learning_rate: float = option(2e-3, help="AdamW learning rate")
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    validation_fraction: float = option(
        0.2, help="share of each training sequence's last tokens held back to choose the step count; "
                  "0 = train max_steps steps on everything")
    eval_every: int = option(50, help="optimiser steps between validation checks")
    patience: int = option(5, help="validation checks without improvement that end the search")
    refit: Refit = option(Refit.CONTINUE, help="how the held-back tokens join in after the step count is chosen: "
                                              "scratch (retrain on all), continue (train on), none")
    seed: int = option(0, help="seed of initialisation and shuffling")

    def __post_init__(self) -> None:
        for name in ("max_distance", "expert_dim", "anchor_dim", "hidden_dim", "hidden_state_dim", "max_steps",
                     "batch_size", "eval_every", "patience"):
            require(getattr(self, name) >= 1, self, f"{name} must be >= 1")
        require(self.token_buckets >= 0 and self.token_dim >= 1, self, "need token_buckets >= 0, token_dim >= 1")
        require(0.0 <= self.dropout < 1.0, self, "dropout must be in [0, 1)")
        require(self.learning_rate > 0 and self.weight_decay >= 0, self, "need learning_rate > 0, weight_decay >= 0")
        require(0.0 <= self.validation_fraction < 1.0, self, "validation_fraction must be in [0, 1)")


@dataclass(frozen=True, eq=False)
class Inputs:
    """The network inputs of a batch of contexts at one anchor layer."""

    anchor: int  # routed layer + 1: the head index
    current: torch.Tensor  # [B, L, E] multi-hot of this step's routing so far
    previous: torch.Tensor  # [B, L, E] multi-hot of the previous step's routing
    token: torch.Tensor  # [B] token-id bucket, 0 = unknown
    history: torch.Tensor  # [B, L, E] share of each expert in the sequence's earlier tokens, per layer
    hidden: torch.Tensor | None = None  # [B, H] float32 router input of the anchor layer, where used

    def subset(self, keep: torch.Tensor | slice) -> Inputs:
        return Inputs(self.anchor, self.current[keep], self.previous[keep], self.token[keep], self.history[keep],
                      None if self.hidden is None else self.hidden[keep])

    def to(self, device: torch.device) -> Inputs:
        """The inputs on ``device``: routing features in one copy, token ids in another, the hidden state if
        not there."""
        current, previous, history = torch.stack((self.current, self.previous, self.history)).to(device).unbind(0)
        hidden = None if self.hidden is None else self.hidden.to(device)
        return Inputs(self.anchor, current, previous, self.token.to(device), history, hidden)


class RouteNet(nn.Module):
    """The network: bags of routed (layer, expert) embeddings -> MLP -> the anchor's head (+ wide paths).

    One forward pass serves one anchor layer (a ``RouteContext`` has one), so only that head is
    computed: logits ``[B, D, E]``. ``hidden_size`` > 0 adds the hidden-state paths to the heads of the
    anchors in ``hidden_heads`` (index = anchor layer + 1).
    """

    def __init__(self, config: LearnedConfig, num_layers: int, num_experts: int, *, hidden_size: int = 0,
                 hidden_heads: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.config = config
        self.num_layers, self.num_experts = num_layers, num_experts
        self.hidden_size = hidden_size
        self.hidden_heads = hidden_heads if hidden_size else (False,) * (num_layers + 1)
        if len(self.hidden_heads) != num_layers + 1:
            raise TraceError(f"learned: hidden_heads needs one flag per anchor -1..{num_layers - 1}, got "
                             f"{len(self.hidden_heads)}")
        depth = config.max_distance
        self.current = nn.Linear(num_layers * num_experts, config.expert_dim, bias=False)
        self.previous = nn.Linear(num_layers * num_experts, config.expert_dim, bias=False)
        self.history = nn.Linear(num_layers * num_experts, config.expert_dim, bias=False) if config.history else None
        self.anchor = nn.Embedding(num_layers + 1, config.anchor_dim)
        self.token = nn.Embedding(config.token_buckets + 1, config.token_dim) if config.token_buckets else None
        self.state = nn.Linear(hidden_size, config.hidden_state_dim, bias=False) if hidden_size else None
        width = ((3 if config.history else 2) * config.expert_dim + config.anchor_dim
                 + (config.token_dim if self.token else 0) + (config.hidden_state_dim if hidden_size else 0))
        self.trunk = nn.Sequential(
            nn.Linear(width, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout),
        )
        heads = range(num_layers + 1)  # one per anchor layer -1 .. L-1, separate so a step only updates its own
        self.head_weight = nn.ParameterList(
            nn.Parameter(torch.randn(depth * num_experts, config.hidden_dim) / config.hidden_dim ** 0.5) for _ in heads)
        self.head_bias = nn.ParameterList(nn.Parameter(torch.zeros(depth * num_experts)) for _ in heads)
        wide = (depth, num_experts, num_experts)  # [distance, target, source]
        self.wide_anchor = nn.ParameterList(nn.Parameter(torch.zeros(wide)) for _ in heads) if config.wide else None
        self.wide_step = nn.ParameterList(nn.Parameter(torch.zeros(wide)) for _ in heads) if config.wide else None
        self.history_gain = (nn.ParameterList(nn.Parameter(torch.zeros(depth, num_experts)) for _ in heads)
                             if config.history else None)
        # [D*E, H] per head: router input -> logits of each target layer (speculative gating, learned)
        self.state_head = (nn.ParameterList(nn.Parameter(torch.zeros(depth * num_experts, hidden_size)) for _ in heads)
                           if hidden_size else None)
        self._targets = [[(head - 1 + d) % num_layers for d in range(1, depth + 1)] for head in heads]
        sources = [[_step_source(head - 1, d, num_layers) for d in range(1, depth + 1)] for head in heads]
        # Per head and distance: take the target layer from previous (0) or current (1), or nothing (known 0).
        self.register_buffer("step_kind", torch.tensor([[int(k == "current") for k, _ in r] for r in sources]),
                             persistent=False)
        self.register_buffer("step_layer", torch.tensor([[layer for _, layer in r] for r in sources]),
                             persistent=False)
        self.register_buffer("step_known", torch.tensor([[[float(bool(k))] for k, _ in r] for r in sources]),
                             persistent=False)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        current, previous, anchor = inputs.current, inputs.previous, inputs.anchor
        batch = current.shape[0]
        parts = [
            self.current(current.reshape(batch, -1)),
            self.previous(previous.reshape(batch, -1)),
            self.anchor.weight[anchor].expand(batch, -1),
        ]
        if self.token is not None:
            parts.append(self.token(inputs.token))
        if self.history is not None:
            parts.append(self.history(inputs.history.reshape(batch, -1)))
        uses_hidden = self.hidden_heads[anchor]
        if self.state is not None:
            parts.append(self.state(inputs.hidden) if uses_hidden
                         else current.new_zeros(batch, self.config.hidden_state_dim))
        mixed = self.trunk(torch.cat(parts, dim=1))
        logits = torch.nn.functional.linear(mixed, self.head_weight[anchor], self.head_bias[anchor])
        logits = logits.view(batch, self.config.max_distance, self.num_experts)
        if self.wide_anchor is not None:
            experts = self.num_experts
            if anchor > 0:  # [B, E] @ [E, D*E]: the anchor layer's experts vote for every target
                table = self.wide_anchor[anchor].reshape(-1, experts)
                logits = logits + (current[:, anchor - 1] @ table.T).view_as(logits)
            kinds, layers = self.step_kind[anchor], self.step_layer[anchor]
            sources = torch.stack((previous, current), dim=1)[:, kinds, layers] * self.step_known[anchor]
            logits = logits + torch.bmm(sources.transpose(0, 1), self.wide_step[anchor].transpose(1, 2)).transpose(0, 1)
        if self.history_gain is not None:
            logits = logits + self.history_gain[anchor] * inputs.history[:, self._targets[anchor]]
        if uses_hidden:
            logits = logits + torch.nn.functional.linear(inputs.hidden, self.state_head[anchor]).view_as(logits)
        return logits

    def init_from_gates(self, gates: torch.Tensor) -> None:
        """Start each hidden-state path at the routers of its target layers: ``gates`` ``[L, E, H]``."""
        expected = (self.num_layers, self.num_experts, self.hidden_size)
        if self.state_head is None or tuple(gates.shape) != expected:
            raise TraceError(f"learned: router gates of shape {tuple(gates.shape)} do not fit the hidden-state paths "
                             f"(expected {expected}, with hidden states in the training trace)")
        with torch.no_grad():
            for head, targets in enumerate(self._targets):
                self.state_head[head].copy_(gates[targets].reshape(-1, self.hidden_size).float())


def _step_source(anchor: int, distance: int, num_layers: int) -> tuple[str, int]:
    """Where the target's layer was routed one token earlier: ``("previous" | "current" | "", layer)``."""
    steps, layer = divmod(anchor + distance, num_layers)
    if steps == 0:
        return "previous", layer
    if steps == 1 and layer <= anchor:
        return "current", layer
    return "", layer


def features(context: RouteContext, config: LearnedConfig, *, with_hidden: bool = False) -> Inputs:
    """The network inputs of a context; ``with_hidden`` keeps ``context.hidden`` (on its own device)."""
    batch, experts = context.batch_size, context.num_experts
    current = torch.from_numpy(multi_hot(context.current, experts))
    if context.previous is None:
        previous = torch.zeros_like(current)
    else:
        previous = torch.from_numpy(multi_hot(context.previous, experts))
    if context.token_ids is None or config.token_buckets == 0:
        token = torch.zeros(batch, dtype=torch.long)
    else:
        hashed = (context.token_ids.astype(np.uint64) * np.uint64(_HASH)) % np.uint64(config.token_buckets)
        token = torch.from_numpy(hashed.astype(np.int64)) + 1
    if context.activation is None or not config.history:
        history = torch.zeros_like(current)
    else:
        counts = context.activation
        total = counts.sum(axis=2, keepdims=True)
        history = torch.from_numpy(np.divide(counts, total, out=np.zeros_like(counts), where=total > 0))
    hidden = context.hidden.float() if with_hidden and context.hidden is not None else None
    return Inputs(context.layer + 1, current, previous, token, history, hidden)


class LearnedPredictor:
    """Serves a trained ``RouteNet``: sigmoid probabilities for the next ``distance`` layers.

    ``compiled_max_batch``: contexts of up to this many rows run the compiled forward on the host CPU
    (``learned_fast``; a hidden state on a GPU costs one small copy); larger ones run the torch forward on
    ``device``; 0 serves every batch with torch. The net must not change after construction.
    """

    def __init__(self, net: RouteNet, *, layer_ids: tuple[int, ...], model: str = "",
                 train_sequences: tuple[int, ...] = (), device: str | torch.device = "cpu",
                 compiled_max_batch: int = COMPILED_MAX_BATCH) -> None:
        if compiled_max_batch < 0:
            raise ConfigError(f"learned: compiled_max_batch must be >= 0 (0 = always the torch forward), got "
                              f"{compiled_max_batch}")
        self.net = net.to(device).eval()
        self.config = net.config
        self.layer_ids = layer_ids
        self.model = model
        self.train_sequences = train_sequences
        self.device = torch.device(device)
        self.compiled_max_batch = compiled_max_batch
        self.compiled = CompiledRouteNet(self.net, token_hash=_HASH) if compiled_max_batch else None
        self.reads_hidden = any(net.hidden_heads)  # trained with hidden states (Predictor)

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        check_context(context, distance, num_layers=self.net.num_layers, num_experts=self.net.num_experts,
                      who="learned")
        if distance > self.config.max_distance:
            raise TraceError(
                f"predict: the learned model predicts up to {self.config.max_distance} layers ahead, asked "
                f"for {distance}; train with --max-distance {distance}"
            )
        uses_hidden = self.net.hidden_heads[context.layer + 1]
        if uses_hidden and (context.hidden is None or tuple(context.hidden.shape) != (context.batch_size,
                                                                                      self.net.hidden_size)):
            got = "none" if context.hidden is None else f"shape {tuple(context.hidden.shape)}"
            raise TraceError(
                f"predict: the learned model was trained with hidden states and needs context.hidden "
                f"[{context.batch_size}, {self.net.hidden_size}] (the input of layer {context.layer}'s router) at "
                f"this layer; got {got}. Pass the router input, or train with hidden_state=False"
            )
        if self.compiled is not None and context.batch_size <= self.compiled_max_batch:
            return self.compiled.probabilities(context, distance, host_hidden(context.hidden) if uses_hidden else None)
        inputs = features(context, self.config, with_hidden=uses_hidden)
        if self.device.type != "cpu":
            inputs = inputs.to(self.device)
        with torch.inference_mode():
            probabilities = torch.sigmoid(self.net(inputs)[:, :distance])
        return probabilities.permute(1, 0, 2).float().cpu().numpy()

    def to(self, device: str | torch.device, *, compiled_max_batch: int | None = None) -> LearnedPredictor:
        """The same model with its torch forward on ``device`` (features are still built on the CPU) and,
        where given, another ``compiled_max_batch``; this predictor keeps its own net where it is."""
        net = self.net if torch.device(device) == self.device else copy.deepcopy(self.net)
        return LearnedPredictor(net, layer_ids=self.layer_ids, model=self.model,
                                train_sequences=self.train_sequences, device=device,
                                compiled_max_batch=(self.compiled_max_batch if compiled_max_batch is None
                                                    else compiled_max_batch))

    def save(self, path: str | Path) -> None:
        torch.save({
            "format": FORMAT, "config": to_dict(self.config), "state_dict": self.net.state_dict(),
            "num_layers": self.net.num_layers, "num_experts": self.net.num_experts,
            "hidden_size": self.net.hidden_size, "hidden_heads": list(self.net.hidden_heads),
            "layer_ids": list(self.layer_ids), "model": self.model, "train_sequences": list(self.train_sequences),
        }, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu",
             compiled_max_batch: int = COMPILED_MAX_BATCH) -> LearnedPredictor:
        try:
            saved: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise TraceError(f"learned: model file {str(path)!r} does not exist") from None
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # foreign or corrupt
            raise TraceError(f"learned: {str(path)!r} is not a saved route predictor: {exc}") from None
        found = saved.get("format") if isinstance(saved, dict) else None
        if isinstance(found, str) and found.startswith(FORMAT_NAME + "/") and found != FORMAT:
            raise TraceError(f"learned: {str(path)!r} was saved as {found}, this tiermem reads {FORMAT}; retrain it "
                             f"with `tiermem predictor train`")
        if found != FORMAT:
            raise TraceError(f"learned: {str(path)!r} is not a {FORMAT} file (train one with "
                             f"`tiermem predictor train`)")
        net = RouteNet(from_dict(LearnedConfig, saved["config"]), saved["num_layers"], saved["num_experts"],
                       hidden_size=saved["hidden_size"], hidden_heads=tuple(saved["hidden_heads"]))
        net.load_state_dict(saved["state_dict"])
        return cls(net, layer_ids=tuple(saved["layer_ids"]), model=saved["model"],
                   train_sequences=tuple(saved["train_sequences"]), device=device,
                   compiled_max_batch=compiled_max_batch)
