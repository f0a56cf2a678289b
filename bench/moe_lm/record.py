"""Run the trained MoE language model over held-out text and write its routing as ``RouteTrace`` files.

Each held-out sequence is the start of one held-out document (never trained on); its first
``prompt_tokens`` are prefill rows, the rest decode rows. The text is fed as one causal forward pass
(teacher forcing), which routes every token exactly as feeding the same tokens one step at a time
would, so the decode rows are the routing of decoding that text. ``seq_id`` is the document id.

Invariants:
- ``experts`` are the router's top-k of each token at each layer, ``weights`` the renormalised
  probabilities the model combines the experts with, ``token_ids`` the input tokens; the forward pass
  runs in float32.
- ``hidden[t, l]`` is the input of layer l's router (the residual after layer l's attention) at unit
  RMS, the norm's gain being folded into ``gates.npy`` (float32 ``[L, E, d]``, ``model.router_gates``),
  so ``gates[l] @ hidden[t, l]`` are layer l's router logits. It is the hidden state of a prediction
  context anchored at layer l (``tiermem.predict.contexts``); the per-row extra ``embedding[t]`` (the
  residual entering layer 0 at unit RMS) is that of anchor -1. ``NextGatePredictor`` and the learned
  predictor's ``train(..., gates=...)`` take the gates.
- Files in ``--out``: ``trace.npz`` (every sequence, with hidden states: large, stays where it was
  made), ``routes.npz`` (every sequence, no hidden states: small), ``sample.npz`` (the first sequences
  within ``--sample-tokens``, with hidden states) and ``gates.npy``.

Usage, from the repository root:
``python -m bench.moe_lm.record --checkpoint /tmp/tiermem-moe-lm/model.pt --out /tmp/tiermem-moe-lm``
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.moe_lm.data import CORPUS_DIR, held_out_sequences, load_corpus
from bench.moe_lm.model import MoeLM, router_gates
from bench.moe_lm.train import load
from tiermem.errors import TierMemError
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace, save_trace

logger = logging.getLogger("tiermem.bench.moe_lm")


def record(model: MoeLM, sequences: list[tuple[int, np.ndarray]], *, prompt_tokens: int, model_name: str = "",
           batch_size: int = 16, pad_id: int = 0) -> RouteTrace:
    """The routing of ``model`` over ``(seq_id, tokens)`` sequences (ascending ids), as a trace with hidden states."""
    device = next(model.parameters()).device
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        length = max(tokens.size for _, tokens in batch)
        padded = np.full((len(batch), length), pad_id, dtype=np.int64)  # right padding: causal, so it changes nothing
        for row, (_, tokens) in enumerate(batch):
            padded[row, :tokens.size] = tokens
        with torch.inference_mode():
            output = model(torch.from_numpy(padded).to(device), record=True)
        valid = (np.arange(length)[None, :] < np.array([t.size for _, t in batch])[:, None]).reshape(-1)
        parts.append({
            "experts": np.stack([_rows(r.experts, valid) for r in output.routes], axis=1),
            "weights": np.stack([_rows(r.weights, valid) for r in output.routes], axis=1),
            "hidden": np.stack([_rows(r.hidden, valid) for r in output.routes], axis=1).astype(np.float16),
            "embedding": _rows(output.embedded, valid).astype(np.float16),
            "token_ids": padded.reshape(-1)[valid],
            "seq_id": np.repeat([seq for seq, _ in batch], [t.size for _, t in batch]),
            "pos": np.concatenate([np.arange(t.size) for _, t in batch]),
        })
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    phase = np.where(joined["pos"] < prompt_tokens, PREFILL, DECODE).astype(np.uint8)
    config = model.config
    return RouteTrace(
        experts=joined["experts"].astype(np.int16), seq_id=joined["seq_id"], pos=joined["pos"], phase=phase,
        num_experts=config.num_experts, model=model_name, weights=joined["weights"], token_ids=joined["token_ids"],
        hidden=joined["hidden"], extras={"embedding": joined["embedding"]},
        source=(f"bench/moe_lm/record.py: {len(sequences)} held-out documents, first {prompt_tokens} tokens prefill, "
                f"the rest decode (teacher-forced real text)"),
    )


def _rows(tensor: torch.Tensor, valid: np.ndarray) -> np.ndarray:
    return tensor.cpu().numpy()[valid]


def gate_agreement(trace: RouteTrace, gates: torch.Tensor) -> float:
    """Share of (token, layer) whose top-k of ``gates[l] @ hidden[t, l]`` is the recorded set (float16 rounding)."""
    logits = torch.einsum("tlh,leh->tle", torch.from_numpy(trace.hidden.astype(np.float32)), gates)
    chosen = np.sort(logits.topk(trace.top_k, dim=-1).indices.numpy(), axis=-1)
    return float((chosen == np.sort(trace.experts, axis=-1)).all(axis=-1).mean())


def expert_load(trace: RouteTrace) -> np.ndarray:
    """Per layer, the busiest expert's share of routed slots times E (1.0 = perfectly balanced)."""
    counts = np.stack([np.bincount(trace.experts[:, layer].reshape(-1), minlength=trace.num_experts)
                       for layer in range(trace.num_layers)])
    return counts.max(axis=1) / counts.sum(axis=1) * trace.num_experts


def sample(trace: RouteTrace, max_tokens: int) -> RouteTrace:
    """The first whole sequences of ``trace`` within ``max_tokens`` rows (at least one), with their extras."""
    ends = np.cumsum([rows.size for _, rows in trace.sequence_rows()])
    count = max(1, int(np.searchsorted(ends, max_tokens, side="right")))
    rows = np.arange(ends[count - 1])
    subset = trace.select_rows(rows)
    return replace(subset, extras={name: value[rows] for name, value in trace.extras.items()})


def forward_ms(model: MoeLM, *, repeats: int = 50) -> float:
    """Median wall milliseconds of one forward pass of one token (B=1): a lower bound on a decode step,
    which also attends over a KV cache; the scale the route predictors' per-token cost compares with."""
    device = next(model.parameters()).device
    token = torch.ones((1, 1), dtype=torch.long, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 5):
            start = time.perf_counter()
            model(token)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return float(np.median(times[5:]) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="model written by bench.moe_lm.train")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help=f"corpus folder (default {CORPUS_DIR}/)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for trace.npz, routes.npz, sample.npz and gates.npy")
    parser.add_argument("--sequences", type=int, default=64, help="held-out documents to run (default 64)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per sequence at most (default 512)")
    parser.add_argument("--min-tokens", type=int, default=256, help="shortest document used (default 256)")
    parser.add_argument("--prompt-tokens", type=int,
                        help="prefill rows per sequence (default: a quarter of --max-tokens, 128 for 512)")
    parser.add_argument("--sample-tokens", type=int, default=1600,
                        help="rows of sample.npz (whole sequences; 1600 x 8 layers x d 512 x 2 B = 13 MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of held-out documents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    model, saved = load(args.checkpoint, args.device)
    config = model.config
    corpus = load_corpus(args.corpus)
    max_tokens = min(args.max_tokens, config.seq_len)
    sequences = held_out_sequences(corpus, np.asarray(saved["held_out_docs"]), count=args.sequences,
                                   max_tokens=max_tokens, min_tokens=min(args.min_tokens, max_tokens), seed=args.seed)
    name = (f"tiermem-moe-lm {config.num_layers}L x {config.num_experts}E top-{config.top_k} d{config.d_model} "
            f"({saved['result']['steps']} steps, held-out loss {saved['result']['held_out_loss']:.3f})")
    prompt_tokens = max_tokens // 4 if args.prompt_tokens is None else args.prompt_tokens
    trace = record(model, sequences, prompt_tokens=prompt_tokens, model_name=name, pad_id=corpus.eos_id)
    gates = router_gates(model).cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "gates.npy", gates.numpy())
    save_trace(trace, args.out / "trace.npz")
    save_trace(replace(trace, hidden=None, extras={}), args.out / "routes.npz")
    save_trace(sample(trace, args.sample_tokens), args.out / "sample.npz")
    logger.info("recorded %d sequences, %d tokens (%d decode) of %s", len(sequences), trace.num_tokens,
                int((trace.phase == DECODE).sum()), name)
    logger.info("gates reproduce the recorded top-%d set for %.4f of (token, layer) pairs (hidden in float16)",
                trace.top_k, gate_agreement(trace, gates))
    logger.info("one-token forward pass of the model (B=1, %s, eager; a lower bound on a decode step): %.2f ms",
                args.device, forward_ms(model))
    logger.info("busiest expert per layer, x uniform share: %s", " ".join(f"{x:.2f}" for x in expert_load(trace)))
    for file in ("trace.npz", "routes.npz", "sample.npz", "gates.npy"):
        logger.info("wrote %s (%.1f MiB)", args.out / file, (args.out / file).stat().st_size / 2**20)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierMemError as exc:
        sys.exit(f"error: {exc}")
