"""CUDA graphs of a layer's grouped expert compute, replayed whenever one wave covers the whole layer.

At decode batch sizes the host sets the pace of an offloaded layer: a grouped layer is about twenty
small launches (zero the pair rows, gather, two grouped GEMMs, activation, scale, scatter, sum), each
costing the host more than the GPU spends on it. When every routed pair of a layer fits in its slot
group, the layer runs as one wave whose shapes depend only on the slot group, the token count, top-k
and the dtypes; this module captures that wave once per such shape and replays it, so the layer costs
the host three input copies, one replay and one clone of the result.

Invariants:
- a replay runs the kernels the eager path (``grouped.run_wave`` between ``pair_buffer`` and
  ``sum_pairs``) launches, on the same values, so its output is bit-identical to the eager layer;
- inputs are copied into the graph's static buffers on the current stream right before the replay,
  after the stream waited for the wave's copies, and the result is cloned out of the graph's memory,
  so a caller may keep it across later replays;
- the wave's index goes up from a pinned staging buffer of the graph's own, rewritten only after the
  previous replay's copy out of it completed (an event), so the host never waits on the GPU for it
  in practice and no pinned memory is allocated per replay;
- the slot weights are views of the cache memory, whose address is fixed while the runtime is open;
  ``clear()`` drops every graph and the runtime calls it on close;
- a shape whose capture fails is logged once and runs eagerly from then on; at most ``max_graphs``
  shapes are captured, later ones run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tiermem.experts.grouped import (
    SlotWeights,
    WaveRows,
    compute_wave,
    pair_buffer,
    sum_pairs,
    wave_index,
    write_wave_index,
)

log = logging.getLogger("tiermem.experts")

WARMUP_RUNS = 2  # eager runs on a side stream before capture: lazy library state (and Triton's compiles) made outside


@dataclass(frozen=True, eq=False)
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # static inputs, copied in before each replay
    top_k_weights: torch.Tensor
    index: torch.Tensor
    staging: torch.Tensor  # pinned host copy of ``index``, written before each replay
    staged: torch.cuda.Event  # recorded after the copy out of ``staging``
    out: torch.Tensor  # the layer's output, in the graph's memory


class WaveGraphs:
    """One CUDA graph per (slot group, input shapes, dtypes, activation) of a whole-layer wave."""

    def __init__(self, weights: Sequence[SlotWeights], *, max_graphs: int = 64) -> None:
        self.weights = list(weights)
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: set[tuple] = set()
        self.replays = 0

    def run(self, group: int, hidden: torch.Tensor, top_k_weights: torch.Tensor, rows: WaveRows,
            act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """The layer's output ``[T, H]`` for one wave that holds every pair, or None: run it eagerly."""
        captured = self._graph(group, hidden, top_k_weights, rows, act_fn)
        if captured is None:
            return None
        captured.staged.synchronize()  # the previous replay's index copy has read the staging buffer
        write_wave_index(rows, top_k_weights.shape[-1], captured.staging.numpy())
        captured.hidden.copy_(hidden)
        captured.top_k_weights.copy_(top_k_weights)
        captured.index.copy_(captured.staging, non_blocking=True)
        captured.staged.record()
        captured.graph.replay()
        self.replays += 1
        return captured.out.clone()

    def prepare(self, group: int, hidden: torch.Tensor, top_k_weights: torch.Tensor,
                act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Capture the graph for these shapes now, before it is needed (as engines capture per batch size).

        The capture sees a stand-in wave (every pair on the group's first slot); a graph depends only on
        the shapes, so later replays with real waves are unaffected. Returns whether a graph is ready.
        """
        num_rows = top_k_weights.numel()
        slots = self.weights[group].down.shape[0]
        rows = WaveRows(np.arange(num_rows, dtype=np.int64), np.full(slots, num_rows, dtype=np.int64))
        return self._graph(group, hidden, top_k_weights, rows, act_fn) is not None

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def _graph(self, group: int, hidden: torch.Tensor, top_k_weights: torch.Tensor, rows: WaveRows,
               act_fn: Callable[[torch.Tensor], torch.Tensor]) -> _Captured | None:
        """The graph for these shapes, captured now if it is new and may be; None: run eagerly."""
        key = (group, tuple(hidden.shape), hidden.dtype, tuple(top_k_weights.shape), top_k_weights.dtype,
               rows.num_rows, act_fn)
        captured = self._graphs.get(key)
        if captured is None and key not in self._failed and len(self._graphs) < self.max_graphs:
            captured = self._capture(key, group, hidden, top_k_weights, rows, act_fn)
        return captured

    def _capture(self, key: tuple, group: int, hidden: torch.Tensor, top_k_weights: torch.Tensor, rows: WaveRows,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> _Captured | None:
        weights, num_rows = self.weights[group], rows.num_rows
        static_hidden, static_weights = hidden.clone(), top_k_weights.clone()
        static_index = wave_index(rows, top_k_weights.shape[-1]).to(hidden.device)

        def layer() -> torch.Tensor:
            out = pair_buffer(static_hidden, static_weights, weights)
            compute_wave(static_hidden, static_weights, static_index, num_rows, weights, act_fn, out)
            return sum_pairs(out, static_hidden.shape[0], static_hidden.dtype)

        current = torch.cuda.current_stream(hidden.device)
        side = torch.cuda.Stream(device=hidden.device)
        try:
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    layer()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = layer()
        except RuntimeError as exc:  # an op that cannot be captured: this shape stays eager
            self._failed.add(key)
            log.warning("expert graphs: capturing a layer of %d token(s) on slot group %d failed (%s); it runs "
                        "eagerly", hidden.shape[0], group, exc)
            return None
        staging = torch.empty(static_index.shape, dtype=static_index.dtype, pin_memory=True)
        captured = self._graphs[key] = _Captured(graph, static_hidden, static_weights, static_index, staging,
                                                 torch.cuda.Event(), out)
        log.debug("expert graphs: captured slot group %d, %d token(s) (%d graph(s))", group, hidden.shape[0],
                  len(self._graphs))
        return captured

