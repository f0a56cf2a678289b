"""Every route predictor side by side on the MoE language model's recorded trace, held out by sequence.

Uses the project's evaluation as it is (``tiermem.predict.eval.cross_validate``: folds by
``seq_id % folds``, fitted on the other folds, scored on held-out sequences; recall at k and 2k and
precision per distance 1..4 and per phase) with the predictor CLI's baselines, next-gate speculation
from the recorded hidden states and router gates, the learned model twice and the oracle bound:
- ``learned``: routing history and token ids only (what it sees on traces without hidden states);
- ``learned+hidden``: the same plus the anchor layer's router input, its hidden-state paths started
  at the router gates of the target layers (``train(..., gates=...)``).
Every context's hidden state is the input of the anchor layer's router (the embedding for anchor -1):
what an engine holds when that layer is routed, never the target router's own input.

The learned predictors' per-call cost (one decode token, all distances) is timed on the CPU and, where
there is one, on the GPU with the hidden state already on the GPU, as inside ``tiermem.offload``.

Usage, from the repository root:
``python -m bench.moe_lm.evaluate --trace /tmp/tiermem-moe-lm/trace.npz --gates /tmp/tiermem-moe-lm/gates.npy``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tiermem.cli.predictor import baselines, render
from tiermem.config import to_dict
from tiermem.errors import TierMemError, TraceError
from tiermem.predict import LearnedConfig, LearnedPredictor, NextGatePredictor, RouteTrace, load_trace
from tiermem.predict.contexts import EMBEDDING, with_row_extras
from tiermem.predict.eval import EvalReport, cross_validate, predict_cost_us
from tiermem.predict.trace import DECODE, sequence_folds
from tiermem.predict.train import train

LEARNED = ("learned", "learned+hidden")


def run(trace: RouteTrace, gates: torch.Tensor, config: LearnedConfig, *, folds: int,
        device: str) -> tuple[EvalReport, dict[str, float]]:
    """The side-by-side report and the learned models' per-call microseconds on each device."""
    if trace.hidden is None or EMBEDDING not in trace.extras:
        raise TraceError("evaluate: next-gate and learned+hidden need a trace with hidden states and the "
                         f"`{EMBEDDING}` extra (trace.npz or sample.npz from bench.moe_lm.record); routes.npz has "
                         "neither: score it with `tiermem predictor eval --trace routes.npz`")
    distance = config.max_distance
    without_hidden = replace(config, hidden_state=False)
    first_fold: dict[str, LearnedPredictor] = {}

    def make(train_trace: RouteTrace) -> dict[str, object]:
        predictors = baselines(train_trace, distance)
        predictors["next-gate"] = NextGatePredictor(list(gates))
        predictors["learned"] = train(train_trace, without_hidden).to(device)
        predictors["learned+hidden"] = train(train_trace, config, gates=gates).to(device)
        for name in LEARNED:
            first_fold.setdefault(name, predictors[name])
        return predictors

    notes = (
        f"{folds}-fold by seq_id % {folds}: fitted on the other folds, scored on held-out sequences",
        "hidden state of anchor a = input of layer a's router (the embedding for a = -1), known when layer a is routed",
        "learned+hidden: learned + the anchor's router input, its hidden-state paths started at the target routers",
    )
    if device != "cpu":
        notes += ((f"the learned models are scored and timed on {device} (routing features built on the CPU, the "
                   "hidden state already on the GPU)"),)
    report = cross_validate(trace, make, num_folds=folds, max_distance=distance, include_oracle=True, notes=notes)
    test = with_row_extras(sequence_folds(trace, folds)[0][1], trace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an engine would run it beside its own work
    timings = {f"{name}@{d}": predict_cost_us(model.to(d), test, distance=distance, device=d)
               for name, model in first_fold.items() for d in dict.fromkeys(("cpu", device))}
    torch.set_num_threads(threads)
    return report, timings


def records(report: EvalReport, trace: RouteTrace, timings: dict[str, float], config: LearnedConfig) -> list[dict]:
    meta = {"kind": "meta", "model": trace.model, "source": trace.source, "tokens": trace.num_tokens,
            "decode_tokens": int((trace.phase == DECODE).sum()), "sequences": int(trace.sequence_ids.size),
            "layers": trace.num_layers, "num_experts": report.num_experts, "top_k": report.top_k,
            "predictors": list(report.predictors), "predict_us": dict(report.predict_us), "learned_us": timings,
            "learned_config": to_dict(config), "notes": list(report.notes),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    return [meta] + [
        {"kind": "metric", "predictor": p, "phase": phase, "distance": d, "targets": t.targets, "recall_k": t.recall_k,
         "recall_2k": t.recall_2k, "precision_k": t.precision_k, "precision_2k": t.precision_2k}
        for (p, phase, d), t in sorted(report.tallies.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="trace.npz (or sample.npz) from bench.moe_lm.record")
    parser.add_argument("--gates", type=Path, required=True, help="gates.npy from bench.moe_lm.record")
    parser.add_argument("--out", type=Path, help="JSON lines: one meta record, then one record per metric")
    parser.add_argument("--folds", type=int, default=2, help="folds by seq_id %% folds (default 2)")
    parser.add_argument("--max-steps", type=int, default=LearnedConfig().max_steps,
                        help=f"learned model's step bound (default {LearnedConfig().max_steps})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the learned model runs when scored")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for fitting and scoring (default 1, as the predictor CLI); per-call "
                             "costs are timed with one thread")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    trace = load_trace(args.trace)
    gates = torch.from_numpy(np.load(args.gates))
    config = LearnedConfig(max_steps=args.max_steps)
    report, timings = run(trace, gates, config, folds=args.folds, device=args.device)
    Console().print(render(report, trace, args.trace.name))
    print(f"learned predictors, one decode token, all {config.max_distance} distances per call, one call per routed "
          f"layer ({trace.num_layers} per token): "
          + ", ".join(f"{name} {us:.0f} us/call = {us * trace.num_layers / 1e3:.2f} ms/token"
                      for name, us in timings.items()))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records(report, trace, timings, config)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierMemError as exc:
        sys.exit(f"error: {exc}")
