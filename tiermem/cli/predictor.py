"""``tiermem predictor train | eval``: train the learned route predictor and compare every predictor.

``train`` fits the learned model on a trace's training sequences (even seq ids by default, so the odd
ones stay held out) and saves it. ``eval`` prints one table with every predictor side by side: recall
of the experts actually used within the top k and 2k, and precision at 2k, per prefetch distance and
phase, on held-out sequences only; with ``--model`` the held-out sequences are those the model was not
trained on, otherwise a fresh model is trained per fold of a split by seq_id.

Errors (a malformed trace, a model of another shape) raise ``TraceError``; ``tiermem.cli.main`` prints
them as one line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tiermem.config import to_dict
from tiermem.errors import TraceError
from tiermem.predict import (
    ActivationMatchPredictor,
    CoOccurrenceConfig,
    CoOccurrencePredictor,
    FrequencyConfig,
    FrequencyPredictor,
    LearnedConfig,
    LearnedPredictor,
    RouteTrace,
    load_trace,
)
from tiermem.predict.eval import PHASES, EvalReport, cross_validate, evaluate, predict_cost_us
from tiermem.predict.oracle import OracleRoutes
from tiermem.predict.train import train

_DEFAULTS = LearnedConfig()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predictor", help="train and evaluate expert route predictors on routing traces",
        description="Train the learned route predictor and compare it with the baselines on held-out sequences.",
    )
    commands = parser.add_subparsers(dest="predictor_command", required=True)
    fit = commands.add_parser("train", help="train the learned predictor and save it",
                              description="Train on the trace's even seq ids (odd ones stay held out) and save.")
    fit.add_argument("--trace", type=Path, required=True, help="routing trace (.npz)")
    fit.add_argument("--out", type=Path, required=True, help="where to save the model (torch state dict + config)")
    fit.add_argument("--all-sequences", action="store_true",
                     help="train on every sequence (leaves nothing held out for `eval --model`)")
    _learned_options(fit)
    fit.set_defaults(func=run_train)
    score = commands.add_parser("eval", help="compare every predictor on held-out sequences",
                                description="Recall/precision at k and 2k per distance and phase, held-out sequences.")
    score.add_argument("--trace", type=Path, required=True, help="routing trace (.npz)")
    score.add_argument("--model", type=Path, help="a trained model; scored on the sequences it was not trained on")
    score.add_argument("--folds", type=int, default=2, help="folds by seq_id %% folds when no --model (default 2)")
    score.add_argument("--no-oracle", action="store_true", help="leave out the oracle upper bound")
    score.add_argument("--json", type=Path, help="also write every metric to this JSON file")
    score.add_argument("--device", default="cpu",
                       help="where the learned model runs when scored and timed, e.g. cuda (default cpu)")
    _learned_options(score)
    score.set_defaults(func=run_eval)


def _learned_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steps", type=int, default=_DEFAULTS.max_steps,
                        help=f"upper bound on optimiser steps; early stopping on held-back tokens usually ends "
                             f"sooner (default {_DEFAULTS.max_steps})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"default {_DEFAULTS.seed}")
    parser.add_argument("--max-distance", type=int, default=_DEFAULTS.max_distance,
                        help=f"prefetch distances 1..N in layers (default {_DEFAULTS.max_distance})")
    parser.add_argument("--hidden-dim", type=int, default=_DEFAULTS.hidden_dim, help=f"default {_DEFAULTS.hidden_dim}")
    parser.add_argument("--no-hidden-state", action="store_true",
                        help="ignore the trace's hidden states (by default the model uses them where it has them)")
    parser.add_argument("--gates", type=Path,
                        help="router gates .npy [layers, experts, hidden] (e.g. bench/moe_lm's gates.npy) that start "
                             "the hidden-state paths at speculative gating; needs hidden states in the trace")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small and more threads only contend)")


def _config(args: argparse.Namespace) -> LearnedConfig:
    return LearnedConfig(max_steps=args.max_steps, seed=args.seed, max_distance=args.max_distance,
                         hidden_dim=args.hidden_dim, hidden_state=not args.no_hidden_state)


def _gates(args: argparse.Namespace) -> torch.Tensor | None:
    if args.gates is None:
        return None
    try:
        return torch.from_numpy(np.load(args.gates, allow_pickle=False)).float()
    except (OSError, ValueError) as exc:
        raise TraceError(f"predictor: cannot read router gates {str(args.gates)!r} as a .npy array: {exc}") from None


def prepare(trace: RouteTrace) -> tuple[RouteTrace, tuple[str, ...]]:
    """Blank misaligned layers and keep the layers with data; return the notes that explain it."""
    notes = []
    if "layer_ok" in trace.extras:
        notes.append("decode rows of (sequence, layer) pairs the source marks misaligned (layer_ok) are excluded")
    prepared = trace.mask_unaligned_layers().restrict_to_layers_with_data()
    if prepared.num_layers < trace.num_layers:
        notes.append(
            f"only layers {', '.join(map(str, prepared.layer_ids))} have data; they are treated as the model's "
            f"MoE layers, so distance 1 = the next logged layer"
        )
    return prepared, tuple(notes)


def baselines(train_trace: RouteTrace, max_distance: int) -> dict[str, object]:
    return {
        "popularity": FrequencyPredictor.fit(train_trace, FrequencyConfig(sequence_weight=0.0)),
        "frequency": FrequencyPredictor.fit(train_trace),
        "cooccurrence": CoOccurrencePredictor.fit(train_trace, CoOccurrenceConfig(max_distance=max_distance)),
        "activation-match": ActivationMatchPredictor.fit(train_trace),
    }


def run_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    console = Console()
    trace, notes = prepare(load_trace(args.trace))
    seqs = trace.sequence_ids
    chosen = seqs if args.all_sequences else seqs[seqs % 2 == 0]
    if chosen.size == 0 or (not args.all_sequences and chosen.size == seqs.size):
        raise TraceError(f"predictor train: need even and odd seq ids to hold some out; got {seqs.tolist()} "
                         f"(or pass --all-sequences)")
    started = time.perf_counter()
    model = train(trace.select_sequences(chosen), _config(args), gates=_gates(args))
    elapsed = time.perf_counter() - started
    model.save(args.out)
    for note in notes:
        console.print(f"note: {note}")
    held = np.setdiff1d(seqs, chosen)
    console.print(f"trained on {chosen.size} sequences ({trace.num_layers} layers, {trace.num_experts} experts, "
                  f"top-{trace.top_k}) in {elapsed:.1f} s; held out {held.size}: {held.tolist()}")
    console.print(f"saved {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    trace, notes = prepare(load_trace(args.trace))
    if args.device != "cpu":
        notes += (f"the learned model runs on {args.device} (its features are built on the CPU)",)
    report = _evaluate_with_model(trace, args, notes) if args.model else _cross_validate(trace, args, notes)
    Console().print(render(report, trace, args.trace.name))
    if args.json:
        args.json.write_text(json.dumps(report_dict(report, _config(args)), indent=2))
    return 0


def _cross_validate(trace: RouteTrace, args: argparse.Namespace, notes: tuple[str, ...]) -> EvalReport:
    gates = _gates(args)

    def make(train_trace: RouteTrace) -> dict[str, object]:
        predictors = baselines(train_trace, args.max_distance)
        predictors["learned"] = train(train_trace, _config(args), gates=gates).to(args.device)
        return predictors

    notes += (f"{args.folds}-fold by seq_id % {args.folds}: fit on the other folds, scored on held-out sequences",)
    return cross_validate(trace, make, num_folds=args.folds, max_distance=args.max_distance,
                          include_oracle=not args.no_oracle, notes=notes)


def _evaluate_with_model(trace: RouteTrace, args: argparse.Namespace, notes: tuple[str, ...]) -> EvalReport:
    model = LearnedPredictor.load(args.model, device=args.device)
    if tuple(int(i) for i in trace.layer_ids) != model.layer_ids:
        raise TraceError(f"predictor eval: the model was trained on layers {list(model.layer_ids)}, the trace has "
                           f"{trace.layer_ids.tolist()}")
    held = np.setdiff1d(trace.sequence_ids, model.train_sequences)
    if held.size == 0:
        raise TraceError("predictor eval: the model was trained on every sequence of this trace; nothing is held out")
    train_trace, test = trace.select_sequences(np.asarray(model.train_sequences)), trace.select_sequences(held)
    predictors: dict[str, object] = baselines(train_trace, model.config.max_distance)
    predictors["learned"] = model
    timings = {name: predict_cost_us(p, test, distance=model.config.max_distance) for name, p in predictors.items()}
    if not args.no_oracle:
        predictors["oracle"] = OracleRoutes(test)
    notes += ((f"held out the {held.size} sequences the model was not trained on; baselines fitted on the same "
               f"{len(model.train_sequences)} training sequences"),)
    report = evaluate(predictors, test, max_distance=model.config.max_distance, notes=notes)
    return EvalReport(report.predictors, report.top_k, report.num_experts, report.max_distance, report.tallies,
                      timings, notes)


def render(report: EvalReport, trace: RouteTrace, name: str) -> Table:
    table = Table(title=f"route predictors on {name}: {trace.model} ({trace.num_layers} MoE layers, "
                        f"{report.num_experts} experts, top-{report.top_k})",
                  caption="\n".join(_caption(report)))
    table.add_column("phase")
    table.add_column("distance", justify="right")
    table.add_column("targets", justify="right")
    for predictor in report.predictors:
        table.add_column(predictor, justify="right")
    for phase in PHASES.values():
        for distance in range(1, report.max_distance + 1):
            tallies = [report.tally(p, phase, distance) for p in report.predictors]
            if not any(t.targets for t in tallies):
                continue
            real = [t.recall_k for p, t in zip(report.predictors, tallies) if p != "oracle"]
            best = max(real) if real else None
            cells = []
            for predictor, t in zip(report.predictors, tallies):
                cell = f"{t.recall_k:.3f} / {t.recall_2k:.3f} / {t.precision_2k:.3f}"
                cells.append(f"[bold]{cell}[/bold]" if predictor != "oracle" and t.recall_k == best else cell)
            table.add_row(phase, str(distance), str(tallies[0].targets), *cells)
    timings = (f"{report.predict_us[p]:.0f}" if p in report.predict_us else "-" for p in report.predictors)
    table.add_row("us/call", "B=1", "", *timings)
    return table


def _caption(report: EvalReport) -> list[str]:
    k, set_size = report.top_k, min(2 * report.top_k, report.num_experts)
    lines = [(f"cell = recall@{k} / recall@{set_size} / precision@{set_size} (precision@{k} = recall@{k} when "
              f"every target has {k} experts); best real predictor in bold; us/call = mean wall time of one "
              f"predict call for one decode token, all distances")]
    if "oracle" in report.predictors:
        lines.append("oracle = perfect knowledge of the future: an upper bound, not a predictor")
    return lines + [f"note: {note}" for note in report.notes]


def report_dict(report: EvalReport, config: LearnedConfig) -> dict:
    """Every metric of ``report`` as plain data, with the learned model's config."""
    return {
        "top_k": report.top_k, "num_experts": report.num_experts, "notes": list(report.notes),
        "predict_us": dict(report.predict_us), "learned_config": to_dict(config),
        "metrics": [
            {"predictor": p, "phase": phase, "distance": d, "targets": t.targets, "recall_k": t.recall_k,
             "recall_2k": t.recall_2k, "precision_k": t.precision_k, "precision_2k": t.precision_2k}
            for (p, phase, d), t in sorted(report.tallies.items())
        ],
    }
