"""Every route predictor side by side on the MoE language model's recorded trace, held out by sequence.

Uses the project's evaluation as it is (``tiermem.predict.eval.cross_validate``: folds by
``seq_id % folds``, fitted on the other folds, scored on held-out sequences; recall at k and 2k and
precision per distance 1..4 and per phase) with the predictor CLI's baselines and learned model, plus
next-gate speculation from the recorded hidden states and router gates, and the oracle bound.

Next-gate appears twice, because *when* its hidden state is known matters:
- ``next-gate``: the contexts' hidden state (``contexts.anchor_batches``), i.e. the input of layer
  a+1's router for anchor a. It exists only after layer a's experts and layer a+1's attention have
  run, and at distance 1 it *is* the target router's input, so distance 1 is exact by construction.
- ``next-gate-early``: the input of layer a's own router (the embedding for a = -1), known at the same
  instant as every other predictor's context: speculation with no look at the target layer.

The learned predictor's per-call cost (one decode token, all distances) is timed on the CPU and, where
there is one, on the GPU.

Usage, from the repository root:
``python -m bench.moe_lm.evaluate --trace /tmp/tiermem-moe-lm/trace.npz --gates /tmp/tiermem-moe-lm/gates.npy``
"""

from __future__ import annotations

import argparse
import json
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
from tiermem.predict.eval import EvalReport, cross_validate, predict_cost_us
from tiermem.predict.trace import DECODE, sequence_folds
from tiermem.predict.train import train


def early_hidden(trace: RouteTrace) -> RouteTrace:
    """The trace whose hidden state at slot l is the input of layer l-1's router (slot 0: the embedding)."""
    embedding = trace.extras.get("embedding")
    if trace.hidden is None or embedding is None:
        raise TraceError("evaluate: next-gate needs a trace with hidden states and the `embedding` extra "
                         "(trace.npz or sample.npz from bench.moe_lm.record); routes.npz has neither: score it "
                         "with `tiermem predictor eval --trace routes.npz`")
    hidden = np.concatenate([embedding[:, None], trace.hidden[:, :-1]], axis=1)
    return replace(trace, hidden=hidden, extras={})


def combine(first: EvalReport, second: EvalReport) -> EvalReport:
    """One report with the predictors of both (scored on the same targets), the oracle last."""
    names = [p for p in first.predictors + second.predictors if p != "oracle"]
    names += ["oracle"] if "oracle" in first.predictors + second.predictors else []
    return EvalReport(tuple(names), first.top_k, first.num_experts, first.max_distance,
                      {**first.tallies, **second.tallies}, {**first.predict_us, **second.predict_us},
                      first.notes + second.notes)


def run(trace: RouteTrace, gates: torch.Tensor, config: LearnedConfig, *, folds: int,
        device: str) -> tuple[EvalReport, dict[str, float]]:
    """The side-by-side report and the learned model's per-call microseconds on each device."""
    distance = config.max_distance
    early = early_hidden(trace)  # fails fast on a trace without hidden states
    learned: list[LearnedPredictor] = []

    def make(train_trace: RouteTrace) -> dict[str, object]:
        predictors = baselines(train_trace, distance)
        learned.append(train(train_trace, config).to(device))
        predictors["learned"] = learned[-1]
        predictors["next-gate"] = NextGatePredictor(list(gates))
        return predictors

    notes = (
        f"{folds}-fold by seq_id % {folds}: fitted on the other folds, scored on held-out sequences",
        ("next-gate: hidden state = input of layer a+1's router (after layer a's experts and layer a+1's attention); "
         "distance 1 is that router itself, exact by construction"),
        ("next-gate-early: hidden state = input of layer a's router (the embedding before layer 0), known when "
         "layer a is routed"),
    )
    if device != "cpu":
        notes += (f"the learned model is scored and timed on {device} (its features are built on the CPU)",)
    main = cross_validate(trace, make, num_folds=folds, max_distance=distance, include_oracle=True, notes=notes)
    early = cross_validate(early, lambda _: {"next-gate-early": NextGatePredictor(list(gates))},
                           num_folds=folds, max_distance=distance)
    test = sequence_folds(trace, folds)[0][1]
    timings = {f"learned@{d}": predict_cost_us(learned[0].to(d), test, distance=distance)
               for d in dict.fromkeys(("cpu", device))}
    return combine(main, early), timings


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
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the predictor CLI)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trace = load_trace(args.trace)
    gates = torch.from_numpy(np.load(args.gates))
    config = LearnedConfig(max_steps=args.max_steps)
    report, timings = run(trace, gates, config, folds=args.folds, device=args.device)
    Console().print(render(report, trace, args.trace.name))
    print("learned predictor, one decode token, all distances: "
          + ", ".join(f"{name} {us:.0f} us/call" for name, us in timings.items()))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records(report, trace, timings, config)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierMemError as exc:
        sys.exit(f"error: {exc}")
