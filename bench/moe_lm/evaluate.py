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

The learned predictors' cost per call (all distances; one call per routed layer, so x L per decode
token) is timed at batch 1 and 8 on each serving path: the compiled forward on the host CPU (what
``predict`` runs up to ``COMPILED_MAX_BATCH`` rows; with the hidden state on the GPU where there is one,
as inside ``tiermem.offload``, so its one device-to-host copy is included and also timed alone) and the
torch forward on the CPU and on the GPU. Each is set against a one-token forward pass of the model
(``record.forward_ms``, of the checkpoint beside the trace), the scale of a decode step.

Usage, from the repository root:
``python -m bench.moe_lm.evaluate --trace /tmp/tiermem-moe-lm/trace.npz --gates /tmp/tiermem-moe-lm/gates.npy``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.moe_lm.record import forward_ms
from bench.moe_lm.train import load
from tiermem.cli.predictor import baselines, render
from tiermem.config import to_dict
from tiermem.errors import TierMemError, TraceError
from tiermem.predict import LearnedConfig, LearnedPredictor, NextGatePredictor, RouteContext, RouteTrace, load_trace
from tiermem.predict.contexts import EMBEDDING, anchor_batches, with_row_extras
from tiermem.predict.eval import EvalReport, cross_validate
from tiermem.predict.learned import COMPILED_MAX_BATCH
from tiermem.predict.learned_fast import host_hidden
from tiermem.predict.trace import DECODE, sequence_folds
from tiermem.predict.train import train

LEARNED = ("learned", "learned+hidden")
BATCHES = (1, 8)  # decode tokens per timed call
COPY = "hidden-state copy"  # the device-to-host copy of the hidden state alone (part of the compiled path's cost)
REPEATS = 50  # timed rounds of one call per routed layer


@dataclass(frozen=True)
class Cost:
    """Mean wall microseconds of one ``predict`` call (all distances) for ``batch`` decode tokens."""

    predictor: str
    path: str  # "compiled" (host CPU; hidden state on the evaluation device), "torch@<device>" or COPY
    batch: int
    us_per_call: float


def run(trace: RouteTrace, gates: torch.Tensor, config: LearnedConfig, *, folds: int,
        device: str) -> tuple[EvalReport, list[Cost]]:
    """The side-by-side report and the learned models' per-call cost on each serving path."""
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
        (f"learned models: batches of up to {COMPILED_MAX_BATCH} tokens run the compiled forward on the host CPU "
         f"(us/call B=1 here), larger ones (scoring) the torch forward on {device}; both give the same predictions"),
    )
    report = cross_validate(trace, make, num_folds=folds, max_distance=distance, include_oracle=True, notes=notes)
    test = with_row_extras(sequence_folds(trace, folds)[0][1], trace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an engine would run it beside its own work
    costs = [cost for name, model in first_fold.items() for cost in learned_costs(name, model, test, device)]
    torch.set_num_threads(threads)
    return report, costs


def decode_contexts(trace: RouteTrace, *, batch: int, distance: int, device: str) -> list[RouteContext]:
    """One context per routed layer 0..L-1 of ``batch`` decode tokens (spread over the trace), the hidden
    state on ``device``: the calls an engine makes during one decode step."""
    contexts = []
    for anchor in anchor_batches(trace, distance, anchors=range(trace.num_layers)):
        decode = np.flatnonzero(anchor.phase == DECODE)
        if decode.size < batch:
            continue
        rows = decode[np.linspace(0, decode.size - 1, batch).round().astype(np.int64)]
        context = anchor.context
        contexts.append(RouteContext(
            num_experts=context.num_experts, layer=context.layer, current=_take(context.current, rows),
            previous=_take(context.previous, rows), activation=_take(context.activation, rows),
            token_ids=_take(context.token_ids, rows),
            hidden=None if context.hidden is None else context.hidden[rows].to(device)))
        if len(contexts) == trace.num_layers:
            return contexts
    raise TraceError(f"evaluate: the test trace has no sequence group with {batch} decode tokens at every layer")


def _take(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else np.ascontiguousarray(values[rows])


def mean_us(call, contexts: list[RouteContext]) -> float:
    """Mean wall microseconds of ``call(context)`` over ``REPEATS`` rounds of every context, after one warm round."""
    for context in contexts:
        call(context)
    start = time.perf_counter()
    for _ in range(REPEATS):
        for context in contexts:
            call(context)
    return (time.perf_counter() - start) / (REPEATS * len(contexts)) * 1e6


def learned_costs(name: str, model: LearnedPredictor, test: RouteTrace, device: str) -> list[Cost]:
    """``model``'s cost per call on each path at each of ``BATCHES``, and the hidden state's copy alone."""
    distance = model.config.max_distance
    paths = {"compiled": (model.to("cpu"), device)}  # the hidden state where the engine holds it
    paths.update({f"torch@{d}": (model.to(d, compiled_max_batch=0), d) for d in dict.fromkeys(("cpu", device))})
    costs = []
    for batch in BATCHES:
        contexts = {d: decode_contexts(test, batch=batch, distance=distance, device=d) for d in {"cpu", device}}
        for path, (predictor, where) in paths.items():
            costs.append(Cost(name, path, batch, mean_us(lambda c, p=predictor: p.predict(c, distance),
                                                          contexts[where])))
        if device != "cpu" and model.net.hidden_size:
            costs.append(Cost(name, COPY, batch, mean_us(lambda c: host_hidden(c.hidden), contexts[device])))
    return costs


def cost_table(costs: list[Cost], num_layers: int, step_ms: float | None) -> Table:
    """us/call and ms/token per predictor, path and batch, with the share of a one-token forward pass."""
    step = f"one-token forward pass {step_ms:.2f} ms" if step_ms else "no checkpoint: no forward pass timed"
    table = Table(title=f"learned predictors: cost of one call (all distances), {num_layers} calls per decode token",
                  caption=f"% = ms/token over the {step} (B=1, eager; a lower bound on a decode step)")
    for column in ("predictor", "path", *(f"B={b} {unit}" for b in BATCHES for unit in ("us/call", "ms/token", "%"))):
        table.add_column(column, justify="left" if column in ("predictor", "path") else "right")
    by_key = {(c.predictor, c.path, c.batch): c.us_per_call for c in costs}
    for predictor, path in dict.fromkeys((c.predictor, c.path) for c in costs):
        cells = []
        for batch in BATCHES:
            us = by_key.get((predictor, path, batch))
            token_ms = None if us is None else us * num_layers / 1e3
            cells += ["-"] * 3 if us is None else [
                f"{us:.1f}", f"{token_ms:.3f}", f"{100 * token_ms / step_ms:.1f}" if step_ms else "-"]
        table.add_row(predictor, path, *cells)
    return table


def records(report: EvalReport, trace: RouteTrace, costs: list[Cost], config: LearnedConfig,
            step_ms: float | None) -> list[dict]:
    meta = {"kind": "meta", "model": trace.model, "source": trace.source, "tokens": trace.num_tokens,
            "decode_tokens": int((trace.phase == DECODE).sum()), "sequences": int(trace.sequence_ids.size),
            "layers": trace.num_layers, "num_experts": report.num_experts, "top_k": report.top_k,
            "predictors": list(report.predictors), "predict_us": dict(report.predict_us),
            "learned_costs": [asdict(c) for c in costs], "one_token_forward_ms": step_ms,
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
    parser.add_argument("--checkpoint", type=Path,
                        help="the model (bench.moe_lm.train) whose one-token forward pass the per-token costs are set "
                             "against (default: model.pt beside --trace, where run_gpu.sh writes it, if it exists)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    trace = load_trace(args.trace)
    gates = torch.from_numpy(np.load(args.gates))
    config = LearnedConfig(max_steps=args.max_steps)
    report, costs = run(trace, gates, config, folds=args.folds, device=args.device)
    checkpoint = args.checkpoint or args.trace.with_name("model.pt")
    step_ms = forward_ms(load(checkpoint, args.device)[0]) if args.checkpoint or checkpoint.exists() else None
    console = Console()
    console.print(render(report, trace, args.trace.name))
    console.print(cost_table(costs, trace.num_layers, step_ms))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records(report, trace, costs, config, step_ms)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TierMemError as exc:
        sys.exit(f"error: {exc}")
