"""Training of the learned route predictor on a trace's replayed contexts (BCE, multi-label).

Invariants:
- Examples are the contexts of ``contexts.anchor_batches`` at every anchor layer -1 .. L-1, so the
  model learns from exactly what it will see when serving, with no access to the future.
- Only the sequences of the given trace are used; the caller holds test sequences out (the CLI splits
  by seq_id) and the saved model records its training sequences.
- How long to train is chosen on the training data alone: a search run fits on all but the last
  ``validation_fraction`` of each training sequence's tokens and checks the recall at k of those
  tokens every ``eval_every`` steps, keeping its best network. The held-back tokens then join in as
  ``config.refit`` says: ``continue`` trains the best network on every token for the share of steps
  they add (the default: about 1.4x the search's cost in all), ``scratch`` retrains on every token
  for the scaled step count, ``none`` keeps the best network. So one setting suits traces of any size.
- Training is seeded and runs on CPU: the same trace and config give the same weights.
- Hidden states (``config.hidden_state``) are used at exactly the anchors where the trace gives every
  context one (``contexts.anchor_hidden``: layers >= 0 with ``trace.hidden``, anchor -1 also needs the
  ``embedding`` extra); the model records those anchors and needs them when serving. Router ``gates``
  ``[L, E, H]`` (optional) initialise its hidden-state paths.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tiermem.errors import TraceError
from tiermem.predict.common import multi_hot
from tiermem.predict.contexts import EMBEDDING, anchor_batches
from tiermem.predict.learned import Inputs, LearnedConfig, LearnedPredictor, Refit, RouteNet, features
from tiermem.predict.registry import PREDICTORS
from tiermem.predict.trace import RouteTrace

logger = logging.getLogger("tiermem.predict")

_BCE = nn.BCEWithLogitsLoss(reduction="none")


@dataclass(frozen=True, eq=False)
class Examples:
    """Training contexts of one anchor layer with the experts that followed."""

    inputs: Inputs
    targets: torch.Tensor  # [N, D, E] multi-hot of the experts used at each distance
    valid: torch.Tensor  # [N, D] whether that distance has a target
    held: torch.Tensor  # [N] whether the token is in its sequence's validation tail

    @property
    def count(self) -> int:
        return int(self.valid.shape[0])

    def subset(self, keep: torch.Tensor) -> Examples:
        return Examples(self.inputs.subset(keep), self.targets[keep], self.valid[keep], self.held[keep])


def hidden_heads(trace: RouteTrace, config: LearnedConfig) -> tuple[int, tuple[bool, ...]]:
    """The hidden size the model uses (0 = none) and, per anchor -1 .. L-1, whether its contexts have one."""
    if not config.hidden_state or trace.hidden is None:
        return 0, (False,) * (trace.num_layers + 1)
    return int(trace.hidden.shape[2]), (EMBEDDING in trace.extras,) + (True,) * trace.num_layers


def training_examples(trace: RouteTrace, config: LearnedConfig) -> list[Examples]:
    """Every replayed context of ``trace`` with at least one target, one ``Examples`` per anchor layer."""
    cutoff = validation_cutoff(trace, config.validation_fraction)
    _, uses_hidden = hidden_heads(trace, config)
    grouped: dict[int, list[Examples]] = {}
    for batch in anchor_batches(trace, config.max_distance, anchors=range(-1, trace.num_layers),
                                with_activation=config.history):
        targets = np.ascontiguousarray(batch.targets.transpose(1, 0, 2))  # [B, D, K]
        grouped.setdefault(batch.anchor_layer + 1, []).append(Examples(
            features(batch.context, config, with_hidden=uses_hidden[batch.anchor_layer + 1]),
            torch.from_numpy(multi_hot(targets, trace.num_experts)),
            torch.from_numpy((targets >= 0).any(axis=2)), torch.from_numpy(trace.pos[batch.rows] >= cutoff[batch.rows]),
        ))
    examples = []
    for anchor, parts in grouped.items():
        inputs = Inputs(anchor, *(torch.cat([getattr(p.inputs, name) for p in parts])
                                  for name in ("current", "previous", "token", "history")),
                        torch.cat([p.inputs.hidden for p in parts]) if uses_hidden[anchor] else None)
        joined = Examples(inputs, *(torch.cat([getattr(p, name) for p in parts]) for name in ("targets", "valid", "held")))
        joined = joined.subset(joined.valid.any(dim=1))
        if joined.count:
            examples.append(joined)
    if not examples:
        raise TraceError("train: the trace has no (token, layer) pair with a later layer to learn from")
    return examples


def validation_cutoff(trace: RouteTrace, fraction: float) -> np.ndarray:
    """Per row, the first position of its sequence's validation tail (past the end when there is none)."""
    cutoff = np.empty(trace.num_tokens, dtype=np.int64)
    for _, rows in trace.sequence_rows():
        tail = int(fraction * rows.size)
        cutoff[rows] = trace.pos[rows[-tail]] if tail else trace.pos[rows[-1]] + 1
    return cutoff


def train(trace: RouteTrace, config: LearnedConfig | None = None, *,
          gates: torch.Tensor | None = None) -> LearnedPredictor:
    """Fit a ``RouteNet`` to the replayed contexts of ``trace`` and return it ready to serve.

    ``gates`` (float ``[L, E, H]``, the routers of the trace's layers in the representation of its hidden
    states) start the hidden-state paths at speculative gating; they need hidden states in ``trace``.
    """
    config = config or LearnedConfig()
    started = time.perf_counter()
    examples = training_examples(trace, config)
    fit = [e.subset(~e.held) for e in examples if (~e.held).any()]
    held = [e.subset(e.held) for e in examples if e.held.any()]
    steps, best_step, recall = config.max_steps, 0, float("nan")
    with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's random state
        if fit and held:
            net, best_step, recall = _search_steps(trace, fit, held, config, gates)
            scale = sum(e.count for e in examples) / sum(e.count for e in fit)
            steps = {Refit.SCRATCH: round(best_step * scale), Refit.CONTINUE: round(best_step * (scale - 1)),
                     Refit.NONE: 0}[config.refit]
            if config.refit is Refit.SCRATCH:
                net = _new_net(trace, config, gates)
        else:
            net = _new_net(trace, config, gates)
        for _ in _steps(net, examples, steps, config):
            pass
    logger.info("train: %d contexts from %d sequences; search: best validation recall@%d %.4f at step %d; "
                "then %d steps on every token (refit %s); %.1f s", sum(e.count for e in examples),
                trace.sequence_ids.size, trace.top_k, recall, best_step, steps, config.refit.value,
                time.perf_counter() - started)
    return LearnedPredictor(net.eval(), layer_ids=tuple(int(i) for i in trace.layer_ids), model=trace.model,
                            train_sequences=tuple(int(s) for s in trace.sequence_ids))


def _search_steps(trace: RouteTrace, fit: list[Examples], held: list[Examples], config: LearnedConfig,
                  gates: torch.Tensor | None) -> tuple[RouteNet, int, float]:
    """Train on ``fit`` while the recall at k of ``held`` improves: the best network, its step, its recall."""
    net = _new_net(trace, config, gates)
    best_step, best_recall, best_state = 0, -1.0, copy.deepcopy(net.state_dict())
    checks_without_gain = 0
    for step in _steps(net, fit, config.max_steps, config):
        if step % config.eval_every:
            continue
        recall = _validation_recall(net, held, trace.top_k)
        if recall > best_recall + 1e-4:
            best_step, best_recall, best_state, checks_without_gain = step, recall, copy.deepcopy(net.state_dict()), 0
        else:
            checks_without_gain += 1
            if checks_without_gain >= config.patience:
                break
    net.load_state_dict(best_state)
    return net.eval(), best_step, best_recall


def _new_net(trace: RouteTrace, config: LearnedConfig, gates: torch.Tensor | None) -> RouteNet:
    """A freshly initialised network; seeding here makes initialisation and dropout reproducible."""
    torch.manual_seed(config.seed)
    hidden_size, heads = hidden_heads(trace, config)
    net = RouteNet(config, trace.num_layers, trace.num_experts, hidden_size=hidden_size, hidden_heads=heads)
    if gates is not None:
        net.init_from_gates(gates)
    return net


def _steps(net: RouteNet, examples: list[Examples], steps: int, config: LearnedConfig) -> Iterator[int]:
    """Train ``net`` one optimiser step at a time, yielding the step count after each."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=True)
    batches = _batches(examples, config.batch_size, generator)
    for step in range(1, steps + 1):
        net.train()
        part = next(batches)
        loss = _BCE(net(part.inputs), part.targets).mean(dim=2)[part.valid].mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        yield step
    net.eval()


def _batches(examples: list[Examples], batch_size: int, generator: torch.Generator) -> Iterator[Examples]:
    """Endless shuffled minibatches; each holds one anchor layer (one head)."""
    while True:
        picks = [(e, pick) for e in examples for pick in torch.randperm(e.count, generator=generator).split(batch_size)]
        for index in torch.randperm(len(picks), generator=generator).tolist():
            e, pick = picks[index]
            yield e.subset(pick)


def _validation_recall(net: RouteNet, held: list[Examples], top_k: int) -> float:
    """Mean recall of the top-k experts over every validation target."""
    net.eval()
    hits, used = 0.0, 0.0
    with torch.inference_mode():
        for examples in held:
            chosen = torch.zeros_like(examples.targets).scatter_(2, net(examples.inputs).topk(top_k, dim=2).indices, 1.0)
            per_target = (chosen * examples.targets).sum(dim=2) / examples.targets.sum(dim=2).clamp(min=1.0)
            hits += float(per_target[examples.valid].sum())
            used += float(examples.valid.sum())
    return hits / used


PREDICTORS.register("learned", LearnedConfig, lambda config, trace: train(trace, config))
