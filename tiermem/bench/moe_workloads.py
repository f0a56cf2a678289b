"""The workloads of ``tiermem bench moe``: real expert shapes, the routing traces that drive them, and
what a run replays from a trace.

A workload is ``shape@trace``: an expert shape from a model's published config (``SHAPES``) driven
by a real routing trace (``REAL_TRACES``, files in the traces folder) or by a synthetic uniform one.
Steps are the simulator's static batches of whole sequences (``batch_steps``). tiermem mode's
predictor is cross-fitted (``CrossFitted``): no row is predicted by a model fitted on its own
sequence. Where a trace records its routers' inputs, ``recorded_router_inputs`` hands each layer
the recorded ones, so predictors that read hidden states run on what the model computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tiermem.config import from_dict
from tiermem.errors import ConfigError
from tiermem.predict import PREDICTORS
from tiermem.predict.base import Predictor, RouteContext
from tiermem.predict.trace import RouteTrace
from tiermem.predict.trace import load_trace as load_route_trace
from tiermem.simulate.steps import Step, build_steps
from tiermem.simulate.trace import SimTrace, batch_groups, synthetic_trace
from tiermem.simulate.trace import load_trace as load_sim_trace


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert of a real model: hidden and intermediate sizes, and its routing width."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int


SHAPES = {  # from the models' published configs
    "qwen1.5-moe-a2.7b": ExpertShape(2048, 1408, 60, 4),
    "qwen3-30b-a3b": ExpertShape(2048, 768, 128, 8),
    "mixtral-8x7b": ExpertShape(4096, 14336, 8, 2),
    "deepseek-v2-lite": ExpertShape(2048, 1408, 64, 6),
    "deepseek-v3": ExpertShape(7168, 2048, 256, 8),
    "tiny": ExpertShape(64, 32, 16, 2),  # CPU smoke runs
}
REAL_TRACES = {"qwen": "qwen1.5-moe-a2.7b-chat_vllm-moe-logger.npz", "mixtral": "mixtral-8x7b-instruct-fp8_speculative-moe.npz",
               # the small MoE LM's held-out routing with its routers' inputs (bench/moe_lm: record's trace.npz)
               "moe-lm": "moe-lm-trace.npz"}


@dataclass(frozen=True, eq=False)
class Workload:
    """An expert shape driven by a routing trace (real, or synthetic uniform)."""

    name: str
    shape: ExpertShape
    trace: SimTrace
    routes: RouteTrace | None  # the same trace in the predictor's format (None: synthetic, no predictor)


class CrossFitted:
    """A registered predictor (``PREDICTORS``) fitted on the other half of the sequences (seq_id parity) of each row.

    The bench sets ``seqs`` (the sequence of each batch row) before each step, so no row is ever
    predicted by a model that saw its own sequence.
    """

    def __init__(self, routes: RouteTrace, distance: int, name: str = "cooccurrence") -> None:
        entry = PREDICTORS.get(name)
        fields = {f.name for f in dataclasses.fields(entry.config_cls)}
        config = from_dict(entry.config_cls, {"max_distance": max(distance, 1)} if "max_distance" in fields else {})
        seqs = routes.sequence_ids
        self.name = name
        self.models = [entry.factory(config, routes.select_sequences(seqs[seqs % 2 != parity])) for parity in (0, 1)]
        self.reads_hidden = any(getattr(model, "reads_hidden", True) for model in self.models)
        self._seqs = np.zeros(0, dtype=np.int64)
        self._single: Predictor | None = None  # the one model serving every row of the step, if one does
        self._rows = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)]  # each model's rows of the step

    @property
    def seqs(self) -> np.ndarray:
        return self._seqs

    @seqs.setter
    def seqs(self, seqs: np.ndarray) -> None:
        """The sequence of each batch row of the coming step (each row's model decided here once, not per layer)."""
        self._seqs = np.asarray(seqs, dtype=np.int64)
        parity = self._seqs % 2
        self._single = self.models[int(parity[0])] if parity.size and (parity == parity[0]).all() else None
        self._rows = [np.flatnonzero(parity == p) for p in (0, 1)]

    @property
    def step(self) -> np.ndarray:
        """The step table (``[L, E, E]``) of the model serving this step's rows, for the device pager's predicted
        eviction; only where one model serves every row (always at batch 1)."""
        if not hasattr(self.models[0], "step"):
            raise ConfigError(f"bench predictor: {self.name} has no step table; the device pager's predicted eviction "
                              "needs one (cooccurrence)")
        if self._single is None:
            raise ConfigError("bench predictor: this step's rows come from both halves of the sequences, and one "
                              "step table cannot serve both without leaking; use batch 1 with the device pager")
        return self._single.step

    def predict(self, context: RouteContext, distance: int) -> np.ndarray:
        if self._single is not None:  # one model serves every row (always at batch 1): predict once
            return self._single.predict(context, distance)
        # each model scores only its own rows, as a deployment's one model scores each row once (scoring every
        # row with both and picking would bill tiermem for two predictions per row)
        out = np.empty((distance, context.batch_size, context.num_experts), dtype=np.float32)
        hidden = context.hidden if self.reads_hidden else None  # slicing it costs host time for nothing otherwise
        for model, rows in zip(self.models, self._rows):
            out[:, rows] = model.predict(_rows_of(context, rows, hidden), distance)
        return out


def _rows_of(context: RouteContext, rows: np.ndarray, hidden: torch.Tensor | None) -> RouteContext:
    """``context`` restricted to batch ``rows``, with those rows of ``hidden`` (the runtime hands a predictor
    that reads it the router input on the host)."""
    def pick(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[rows]

    return replace(context, current=context.current[rows], previous=pick(context.previous),
                   activation=pick(context.activation), token_ids=pick(context.token_ids),
                   hidden=None if hidden is None else hidden[torch.from_numpy(rows).to(hidden.device)])


def workloads(traces_dir: Path, names: list[str], quick: bool) -> list[Workload]:
    """``shape@trace`` names, e.g. ``qwen3-30b-a3b@qwen`` (real) or ``deepseek-v2-lite@uniform``."""
    out = []
    for name in names:
        shape_name, _, trace_name = name.partition("@")
        shape = SHAPES[shape_name]
        if trace_name == "uniform":
            trace = synthetic_trace(num_layers=4 if quick else 8, num_experts=shape.num_experts, top_k=shape.top_k,
                                    num_sequences=64, decode_steps=16 if quick else 48, seed=0)
            out.append(Workload(name, shape, trace, None))
            continue
        path = traces_dir / REAL_TRACES[trace_name]
        routes = load_route_trace(path).mask_unaligned_layers().restrict_to_layers_with_data()
        trace = _restrict(load_sim_trace(path), 8 if trace_name == "mixtral" else None)
        routes = routes.select_slots(np.searchsorted(routes.layer_ids, trace.layers))
        out.append(Workload(name, replace(shape, num_experts=trace.num_experts, top_k=trace.top_k), trace, routes))
    return out


def batch_steps(trace: SimTrace, batch: int, max_steps: int) -> tuple[list[Step], list[int]]:
    """Whole batches of sequences, in trace order, until at least ``max_steps`` steps (at least one batch)."""
    steps: list[Step] = []
    seqs: list[int] = []
    for group in batch_groups(trace, batch):
        if steps and len(steps) >= max_steps:
            break
        steps += build_steps(trace, group, False)
        seqs += list(group)
    return steps, seqs


def recorded_router_inputs(work: Workload, steps: list[Step]) -> list[list[torch.Tensor]] | None:
    """Per step and layer position, the recorded router inputs ``[B, H]`` of the step's rows (float32, made
    before the timed loop), for predictors that read ``RouteContext.hidden``; None when the trace has none."""
    if work.routes is None or work.routes.hidden is None:
        return None
    return [[torch.from_numpy(np.ascontiguousarray(work.routes.hidden[list(step.rows), position], dtype=np.float32))
             for position in range(len(work.trace.layers))] for step in steps]


def _restrict(trace: SimTrace, max_layers: int | None) -> SimTrace:
    if max_layers is None or len(trace.layers) <= max_layers:
        return trace
    return replace(trace, layers=trace.layers[:max_layers])
