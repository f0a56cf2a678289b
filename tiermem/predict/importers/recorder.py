"""A recorder that models run through ``tiermem.offload`` call to collect their routing as a trace.

Protocol for the caller (the offload hook): ``begin_step(seq_ids, positions, phase)`` once per forward
pass, then ``record(layer, expert_ids)`` for each MoE layer of that pass, then ``build()`` at the end.

Invariants:
- ``record`` keeps a detached copy and never synchronises a device: ids are moved to the host in
  ``build``. Copying on the device is still work on the hot path, so collect traces off the
  critical path of a benchmark.
- A layer not recorded in a step stays -1; recording a layer twice in one step raises.
- ``layer`` is the MoE layer's slot (0 .. num_layers-1); ``layer_ids`` gives the real layer indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.importers.rows import RowBuilder
from tiermem.predict.trace import RouteTrace

Ids = torch.Tensor | np.ndarray


class TraceRecorder:
    """Accumulates (layer, expert ids) calls step by step and builds a ``RouteTrace``."""

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, model: str = "",
                 layer_ids: Sequence[int] | None = None, record_hidden: bool = False) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.model = model
        self.layer_ids = None if layer_ids is None else np.asarray(layer_ids)
        self.record_hidden = record_hidden
        self._steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict]] = []

    def begin_step(self, seq_ids: Sequence[int] | np.ndarray, positions: Sequence[int] | np.ndarray,
                   phase: Sequence[int] | np.ndarray, token_ids: Sequence[int] | np.ndarray | None = None) -> None:
        """Start a forward pass over tokens ``(seq_ids[i], positions[i])``; phase 0 prefill, 1 decode."""
        seq_ids, positions, phase = np.asarray(seq_ids), np.asarray(positions), np.asarray(phase)
        if not seq_ids.shape == positions.shape == phase.shape or seq_ids.ndim != 1:
            raise TraceError(
                f"recorder: seq_ids {seq_ids.shape}, positions {positions.shape} and phase {phase.shape} must "
                f"be 1-D and of one length (tokens in the pass)"
            )
        tokens = None if token_ids is None else np.asarray(token_ids)
        self._steps.append((seq_ids, positions, phase, tokens, {}))

    def record(self, layer: int, expert_ids: Ids, weights: Ids | None = None, hidden: Ids | None = None) -> None:
        """Record the top-k ids ``[tokens, top_k]`` (and optionally weights, hidden state) of ``layer``."""
        if not self._steps:
            raise TraceError("recorder: record() before begin_step(); start each forward pass with begin_step")
        seq_ids, _, _, _, layers = self._steps[-1]
        if not 0 <= layer < self.num_layers:
            raise TraceError(f"recorder: layer {layer} is outside 0..{self.num_layers - 1}")
        if layer in layers:
            raise TraceError(f"recorder: layer {layer} recorded twice in one step; call begin_step per pass")
        if tuple(expert_ids.shape) != (seq_ids.size, self.top_k):
            raise TraceError(
                f"recorder: layer {layer} ids have shape {tuple(expert_ids.shape)}, expected "
                f"[{seq_ids.size} tokens, top-{self.top_k}]"
            )
        if hidden is not None and not self.record_hidden:
            raise TraceError("recorder: hidden states given but the recorder was built with record_hidden=False")
        layers[layer] = tuple(None if x is None else _copy(x) for x in (expert_ids, weights, hidden))

    def build(self) -> RouteTrace:
        """The trace of every recorded step, rows sorted by (seq_id, pos)."""
        builder = RowBuilder(num_layers=self.num_layers, top_k=self.top_k)
        for seq_ids, positions, phase, tokens, layers in self._steps:
            count = seq_ids.size
            experts = np.full((count, self.num_layers, self.top_k), -1, dtype=np.int16)
            weights = np.full(experts.shape, np.nan, dtype=np.float16) if _any(layers, 1) else None
            hidden = None
            for layer, (ids, layer_weights, layer_hidden) in layers.items():
                experts[:, layer] = _host(ids)
                if weights is not None and layer_weights is not None:
                    weights[:, layer] = _host(layer_weights)
                if layer_hidden is not None:
                    values = _host(layer_hidden)
                    if hidden is None:
                        hidden = np.zeros((count, self.num_layers, values.shape[1]), dtype=np.float16)
                    hidden[:, layer] = values
            if self.record_hidden and hidden is None:
                raise TraceError("recorder: record_hidden=True but a step recorded no hidden state")
            builder.add(seq=seq_ids, pos=positions, experts=experts, phase=phase, token_ids=tokens,
                        weights=weights, hidden=hidden)
        return builder.build(num_experts=self.num_experts, model=self.model, source="tiermem TraceRecorder",
                             layer_ids=self.layer_ids)


def _copy(value: Ids) -> Ids:
    return value.detach().clone() if isinstance(value, torch.Tensor) else np.array(value, copy=True)


def _host(value: Ids) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _any(layers: dict, index: int) -> bool:
    return any(entry[index] is not None for entry in layers.values())
