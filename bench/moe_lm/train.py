"""Train the MoE language model on the corpus's training documents; report train and held-out loss; save it.

Invariants:
- Seeded: initialisation, the document split (``split_seed``) and every batch (``seed``) are fixed by the
  settings. On the GPU, attention's backward pass may still differ in the last bits from run to run.
- Held-out documents (``held_out_fraction`` of them) are never trained on; the held-out loss is measured
  on fixed windows of them, and the checkpoint lists them so ``record`` draws its sequences from them.
- Training stops at ``steps`` or ``time_budget_s``, whichever comes first; the learning-rate schedule
  follows the further of the two, so either way it ends annealed (the step count binds when the
  device is fast enough, and then runs repeat exactly).
- bf16 autocast on CUDA (router in float32), float32 on the CPU.

Usage, from the repository root: ``python -m bench.moe_lm.train --out /tmp/tiermem-moe-lm/model.pt``
(``--tiny --steps 20`` for a CPU check).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.moe_lm.data import CORPUS_DIR, Corpus, WindowSampler, load_corpus, split_documents
from bench.moe_lm.model import ModelConfig, MoeLM, tiny_config
from tiermem.config import from_dict, option, require, to_dict
from tiermem.errors import ConfigError, TierMemError

logger = logging.getLogger("tiermem.bench.moe_lm")

CHECKPOINT_FORMAT = "tiermem.moe-lm/1"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, stopping and split settings."""

    steps: int = option(1500, help="optimiser steps (upper bound; see time_budget_s)")
    time_budget_s: float = option(120.0, help="wall-clock cap on the training loop")
    batch_size: int = option(48, help="sequences of seq_len tokens per step")
    learning_rate: float = option(1.5e-3, help="peak AdamW learning rate")
    min_lr_fraction: float = option(0.1, help="final learning rate as a share of the peak (cosine decay)")
    warmup_steps: int = option(100, help="linear warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices (not on norms and embeddings)")
    grad_clip: float = option(1.0, help="global gradient-norm clip")
    held_out_fraction: float = option(0.03, help="share of documents held out (never trained on)")
    split_seed: int = option(0, help="seed of the document split")
    seed: int = option(0, help="seed of initialisation and batches")
    eval_every: int = option(250, help="steps between held-out loss checks")
    eval_batches: int = option(8, help="fixed held-out batches per check")
    log_every: int = option(50, help="steps between training-loss lines")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            require(getattr(self, name) >= 1, self, f"{name} must be >= 1")
        require(self.time_budget_s > 0 and self.learning_rate > 0, self, "need time_budget_s > 0, learning_rate > 0")
        require(0 <= self.min_lr_fraction <= 1 and self.warmup_steps >= 0, self,
                "need 0 <= min_lr_fraction <= 1 and warmup_steps >= 0")


class Stop(str, enum.Enum):
    """What ended training."""

    STEPS = "steps"  # the step count: the run repeats exactly
    TIME = "time"  # the wall budget: the step count depends on the device's speed


@dataclass(frozen=True)
class TrainResult:
    """How far training got and the losses at the end."""

    steps: int
    seconds: float
    tokens_per_s: float
    train_loss: float  # mean language-model loss over the last log interval
    held_out_loss: float
    balance_loss: float
    stopped_by: Stop


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_fraction`` over ``progress`` 0..1."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine)


def optimiser(model: MoeLM, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    embeddings = {id(model.embed.weight), id(model.positions.weight)}
    decays = {name: p.ndim >= 2 and id(p) not in embeddings for name, p in model.named_parameters()}
    groups = [{"params": [p for n, p in model.named_parameters() if decays[n] == decay],
               "weight_decay": config.weight_decay if decay else 0.0} for decay in (True, False)]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")


def held_out_loss(model: MoeLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad(), _autocast(batches[0][0].device):
        losses = [float(model.loss(tokens, labels)[0]) for tokens, labels in batches]
    model.train()
    return float(np.mean(losses))


def fit(model: MoeLM, train: WindowSampler, held_out: list[tuple[torch.Tensor, torch.Tensor]],
        config: TrainConfig) -> TrainResult:
    """Train ``model`` in place until ``config.steps`` or ``config.time_budget_s``."""
    device = next(model.parameters()).device
    opt = optimiser(model, config, device)
    tokens_per_step = train.batch_size * train.seq_len
    recent: list[torch.Tensor] = []
    balance = torch.zeros((), device=device)
    started, step, stopped_by = time.perf_counter(), 0, Stop.STEPS
    model.train()
    while step < config.steps:
        elapsed = time.perf_counter() - started
        if elapsed >= config.time_budget_s:
            stopped_by = Stop.TIME
            break
        rate = learning_rate(config, step, max(step / config.steps, elapsed / config.time_budget_s))
        for group in opt.param_groups:
            group["lr"] = rate
        tokens, labels = train.next()
        with _autocast(device):
            lm, balance = model.loss(tokens, labels)
        loss = lm + model.config.aux_loss_weight * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        step += 1
        recent.append(lm.detach())
        if step % config.log_every == 0:
            seconds = time.perf_counter() - started
            logger.info("step %5d  loss %.4f  balance %.4f  lr %.2e  %6.0f tokens/s  %.0f s", step,
                        float(torch.stack(recent[-config.log_every:]).mean()), float(balance.detach()), rate,
                        step * tokens_per_step / seconds, seconds)
        if step % config.eval_every == 0:
            logger.info("step %5d  held-out loss %.4f", step, held_out_loss(model, held_out))
    seconds = time.perf_counter() - started
    train_loss = float(torch.stack(recent[-config.log_every:]).mean()) if recent else float("nan")
    result = TrainResult(step, seconds, step * tokens_per_step / max(seconds, 1e-9), train_loss,
                         held_out_loss(model, held_out), float(balance.detach()), stopped_by)
    logger.info("trained %d steps in %.1f s (stopped by %s): train loss %.4f, held-out loss %.4f", result.steps,
                result.seconds, result.stopped_by.value, result.train_loss, result.held_out_loss)
    return result


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build(corpus: Corpus, model_config: ModelConfig, config: TrainConfig,
          device: torch.device) -> tuple[MoeLM, WindowSampler, list, np.ndarray]:
    """The seeded model, training sampler, fixed held-out batches and held-out document ids."""
    train_docs, held_docs = split_documents(corpus.num_docs, config.held_out_fraction, config.split_seed)
    torch.manual_seed(config.seed)
    model = MoeLM(model_config).to(device)
    seq_len = model_config.seq_len
    train = WindowSampler(corpus.stream(train_docs), seq_len, config.batch_size, seed=config.seed, device=device)
    held = WindowSampler(corpus.stream(held_docs), seq_len, config.batch_size, seed=config.seed + 1, device=device)
    return model, train, [held.next() for _ in range(config.eval_batches)], held_docs


def save(path: Path, model: MoeLM, config: TrainConfig, result: TrainResult, held_docs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": CHECKPOINT_FORMAT, "model_config": to_dict(model.config), "train_config": to_dict(config),
        "result": to_dict(result), "held_out_docs": held_docs.tolist(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }, path)


def load(path: Path, device: torch.device | str = "cpu") -> tuple[MoeLM, dict]:
    """The trained model (eval mode) and the checkpoint's plain data (configs, result, held-out docs)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"moe_lm: {path} is not a {CHECKPOINT_FORMAT} checkpoint; train one with "
                          f"`python -m bench.moe_lm.train`")
    model = MoeLM(from_dict(ModelConfig, saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help=f"corpus folder (default {CORPUS_DIR}/)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU checks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    defaults = TrainConfig()
    for name in ("steps", "time_budget_s", "batch_size", "seed", "eval_every", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name), help=f"default {getattr(defaults, name)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = replace(defaults, **{n: getattr(args, n) for n in ("steps", "time_budget_s", "batch_size", "seed",
                                                                  "eval_every", "log_every")})
    corpus = load_corpus(args.corpus)
    model_config = tiny_config(corpus.vocab_size) if args.tiny else ModelConfig(vocab_size=corpus.vocab_size)
    model, train, held_out, held_docs = build(corpus, model_config, config, device)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.1f M parameters; corpus %d tokens in %d documents, %d held out; device %s",
                json.dumps(to_dict(model_config)), parameters / 1e6, corpus.tokens.size, corpus.num_docs,
                held_docs.size, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    result = fit(model, train, held_out, config)
    save(args.out, model, config, result, held_docs)
    logger.info("saved %s", args.out)
    print(json.dumps({"kind": "train", **to_dict(result), "model": to_dict(model_config), "train": to_dict(config)}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierMemError as exc:
        sys.exit(f"error: {exc}")
