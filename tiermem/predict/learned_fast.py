"""The learned predictor's decode-time forward: one compiled (numba) call instead of ~30 torch ops.

At batch 1..8 a ``RouteNet`` forward is ~20-160 k multiply-adds per token but ~30 torch op dispatches
of several microseconds each, and the prefetcher runs it after every routed layer, on the decode
critical path. ``CompiledRouteNet`` copies the trained weights once into contiguous float32 arrays and
computes the same function in one ``numba.njit`` call: each routing bag is a sum of gathered table rows
(no multi-hot matrix), the dense layers are dot products in 2 x 2 register tiles (torch's ``[out, in]``
layout), GELU uses a branch-free erf so that it vectorises, and only the first ``distance`` layers
ahead are computed. Against the torch forward on one CPU thread (8 layers x 32 experts, top-4, hidden
state of 512, default config; ``bench/moe_lm/README.md``): 10 vs 306 us per call at batch 1 and 42 vs
348 at batch 8; with the hidden-state paths 21 vs 353 and 70 vs 429. Why not the alternatives: torch
at batch 1 is dispatch-bound (~30 ops), and the net on a GPU is slower still (0.9-1.1 ms per call on
the H100: launches and a copy back); numpy's BLAS costs a dispatch per matmul and leaves the gathers
and paths to Python. The torch forward stays for training and for large batches, where its matrix
kernels win (``learned.COMPILED_MAX_BATCH``).

Invariants:
- Same inputs, same function as ``RouteNet.forward`` + sigmoid in eval mode (no dropout): probabilities
  agree to float32 rounding (summation order differs; rtol 1e-5, atol 1e-6 in the tests, at every
  anchor and distance, with and without hidden states, token ids and history).
- The weights are a snapshot taken at construction; a net trained further needs a new instance.
- An expert id outside ``[-1, E)`` raises ``TraceError`` (compiled code does not bound-check).
- The kernel is compiled (or loaded from numba's cache) at construction, never during a decode step.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.base import RouteContext

_NO_IDS = np.empty((0, 0, 0), dtype=np.int16)
_NO_TOKENS = np.empty(0, dtype=np.int64)
_NO_COUNTS = np.empty((0, 0, 0), dtype=np.float32)
_NO_HIDDEN = np.empty((0, 0), dtype=np.float32)
_UNKNOWN = 2  # step source of a target whose layer was not routed one token earlier (0 previous, 1 current)
# Compiled once per machine (numba's cache) and callable without the GIL. numpy's error model lets a
# division vectorise (Python's checks every divisor for zero); dot products also reassociate their
# float32 sums (vectorised, as torch's own kernels sum). No other fast-math assumption.
_COMPILED = {"cache": True, "nogil": True, "error_model": "numpy"}
_DOT = {**_COMPILED, "fastmath": {"reassoc", "nsz", "contract"}}
# erf(z) ~ z P(z^2) / Q(z^2) on [-4, 4] (Eigen's generic_fast_erf_float coefficients, lowest order first)
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
          -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
          -1.45660718464996e-05)


def _array(tensor: torch.Tensor | None, empty: tuple[int, ...] = ()) -> np.ndarray:
    """A contiguous float32 copy of ``tensor``; zeros of shape ``empty`` when the part is absent."""
    if tensor is None:
        return np.zeros(empty, dtype=np.float32)
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


def _heads(params: torch.nn.ParameterList | None, empty: tuple[int, ...], *, transpose: bool = False) -> np.ndarray:
    """Per-head parameters stacked ``[heads, ...]``, the last two axes swapped with ``transpose``."""
    if params is None:
        return np.zeros(empty, dtype=np.float32)
    stacked = torch.stack([p.detach() for p in params])
    return _array(stacked.transpose(-1, -2) if transpose else stacked)


class CompiledRouteNet:
    """A ``RouteNet``'s eval-mode forward + sigmoid as one compiled call, built once from the trained net.

    ``token_hash`` is the multiplier of the token-id hash of ``learned.features``.
    """

    def __init__(self, net: torch.nn.Module, *, token_hash: int) -> None:
        config = net.config
        heads, depth, experts = net.num_layers + 1, config.max_distance, net.num_experts
        self.num_experts = experts
        self.token_hash = np.uint64(token_hash)
        self.token_buckets = np.uint64(max(config.token_buckets, 1))
        self.uses_tokens = net.token is not None
        self.uses_history = net.history is not None
        trunk_in, trunk_out = net.trunk[0], net.trunk[3]
        self._weights = (
            _array(net.current.weight.T), _array(net.previous.weight.T),  # bags [L*E, Dx], gathered by row
            _array(None if net.history is None else net.history.weight, (0, 0)),  # dense layers: [out, in]
            _array(net.anchor.weight), _array(None if net.token is None else net.token.weight, (0, 0)),
            _array(None if net.state is None else net.state.weight, (0, 0)),
            _array(trunk_in.weight), _array(trunk_in.bias), _array(trunk_out.weight), _array(trunk_out.bias),
            _heads(net.head_weight, ()), _heads(net.head_bias, ()),  # [heads, D*E, hidden_dim], [heads, D*E]
            _heads(net.wide_anchor, (heads, depth, 0, 0), transpose=True),  # [heads, D, source, target]
            _heads(net.wide_step, (heads, depth, 0, 0), transpose=True),
            _heads(net.history_gain, (heads, 0, 0)),  # [heads, D, E]
            _heads(net.state_head, (heads, 0, 0)),  # [heads, D*E, H]
        )
        known = net.step_known[:, :, 0].cpu().numpy() > 0  # per head and distance: the target's layer a token earlier
        self._step_source = np.where(known, net.step_kind.cpu().numpy(), _UNKNOWN).astype(np.int64)
        self._step_layer = net.step_layer.cpu().numpy().astype(np.int64)
        self._targets = np.array(net._targets, dtype=np.int64).reshape(heads, depth)
        blank = np.full((1, net.num_layers, 1), -1, dtype=np.int16)
        self.probabilities(RouteContext(num_experts=experts, layer=-1, current=blank), 1,  # compile (or load) now
                           np.zeros((1, net.hidden_size), dtype=np.float32) if net.hidden_size else None)

    def probabilities(self, context: RouteContext, distance: int, hidden: np.ndarray | None) -> np.ndarray:
        """float32 ``[distance, B, E]``; ``hidden`` float32 ``[B, H]`` where the anchor's head uses it, else None.

        The caller has checked ``context`` and ``distance`` against the net (``LearnedPredictor.predict``).
        """
        previous = _NO_IDS if context.previous is None else np.ascontiguousarray(context.previous, dtype=np.int16)
        tokens = (np.ascontiguousarray(context.token_ids, dtype=np.int64)
                  if context.token_ids is not None and self.uses_tokens else _NO_TOKENS)
        counts = (np.ascontiguousarray(context.activation, dtype=np.float32)
                  if context.activation is not None and self.uses_history else _NO_COUNTS)
        try:
            return _forward(*self._weights, self._step_source, self._step_layer, self._targets,
                            context.layer + 1, distance, np.ascontiguousarray(context.current, dtype=np.int16),
                            previous, tokens, self.token_hash, self.token_buckets, counts,
                            _NO_HIDDEN if hidden is None else np.ascontiguousarray(hidden, dtype=np.float32))
        except IndexError:
            routed = [context.current] + ([] if context.previous is None else [context.previous])
            found = sorted({int(e) for ids in routed for e in np.unique(ids) if not -1 <= e < self.num_experts})
            raise TraceError(f"predict: the learned model scores experts 0..{self.num_experts - 1}, but the context "
                             f"routes experts {found}; pass the routing of the model it was trained for, with -1 "
                             f"for unrouted slots") from None


def host_hidden(hidden: torch.Tensor) -> np.ndarray:
    """The hidden state as float32 numpy ``[B, H]``: one device-to-host copy where it lives on a GPU.

    The copy waits for the work queued before it on the current stream; a runtime that has already
    synchronised on the layer's routing (as ``tiermem.experts`` does) pays the copy, not a new wait.
    """
    host = hidden.detach().to("cpu")
    return host.numpy() if host.dtype == torch.float32 else host.float().numpy()


@numba.njit(**_COMPILED, inline="always")
def _first(ids: np.ndarray, k: int) -> bool:  # pragma: no cover - compiled
    """Whether ``ids[k]`` is a routed expert not listed earlier in ``ids`` (a multi-hot counts it once)."""
    if ids[k] < 0:
        return False
    for j in range(k):
        if ids[j] == ids[k]:
            return False
    return True


@numba.njit(**_COMPILED)
def _bag(parts: np.ndarray, b: int, offset: int, table: np.ndarray, routed: np.ndarray,
         num_experts: int) -> None:  # pragma: no cover - compiled
    """``parts[b, offset:] += table[l * E + e]`` for every distinct expert e routed at any layer l."""
    for layer in range(routed.shape[0]):
        ids = routed[layer]
        for k in range(ids.shape[0]):
            if ids[k] >= num_experts or ids[k] < -1:
                raise IndexError("expert id out of range")
            if _first(ids, k):
                row = layer * num_experts + ids[k]
                for i in range(table.shape[1]):
                    parts[b, offset + i] += table[row, i]


@numba.njit(**_COMPILED)
def _add_rows(logits: np.ndarray, b: int, table: np.ndarray, ids: np.ndarray, start: int,
              stop: int) -> None:  # pragma: no cover - compiled
    """``logits[b, d*E:(d+1)*E] += table[d, e]`` for ``start <= d < stop``, every distinct expert e of ``ids``."""
    num_experts = table.shape[2]
    for k in range(ids.shape[0]):
        if _first(ids, k):
            for d in range(start, stop):
                for e in range(num_experts):
                    logits[b, d * num_experts + e] += table[d, ids[k], e]


@numba.njit(**_DOT)
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:  # pragma: no cover - compiled
    """``a . b`` in float32."""
    total = np.float32(0.0)
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


@numba.njit(**_DOT)
def _dot_2x2(w0: np.ndarray, w1: np.ndarray, x0: np.ndarray,
             x1: np.ndarray) -> tuple[np.float32, np.float32, np.float32, np.float32]:  # pragma: no cover - compiled
    """``w0 . x0, w0 . x1, w1 . x0, w1 . x1`` in one pass: each load feeds two products (a register tile)."""
    t00 = t01 = t10 = t11 = np.float32(0.0)
    for i in range(x0.shape[0]):
        u, v, p, q = w0[i], w1[i], x0[i], x1[i]
        t00 += u * p
        t01 += u * q
        t10 += v * p
        t11 += v * q
    return t00, t01, t10, t11


@numba.njit(**_COMPILED)
def _linear(out: np.ndarray, inputs: np.ndarray, weight: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out [B, O] += inputs [B, I] @ weight[:O].T`` (torch's ``[out, in]`` layout), in 2 x 2 tiles."""
    rows, width = out.shape
    for o in range(0, width - 1, 2):
        for b in range(0, rows - 1, 2):
            t00, t01, t10, t11 = _dot_2x2(weight[o], weight[o + 1], inputs[b], inputs[b + 1])
            out[b, o] += t00
            out[b + 1, o] += t01
            out[b, o + 1] += t10
            out[b + 1, o + 1] += t11
        if rows % 2:
            out[rows - 1, o] += _dot(weight[o], inputs[rows - 1])
            out[rows - 1, o + 1] += _dot(weight[o + 1], inputs[rows - 1])
    if width % 2:
        for b in range(rows):
            out[b, width - 1] += _dot(weight[width - 1], inputs[b])


@numba.njit(**_COMPILED)
def _dense_gelu(inputs: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Exact (erf) GELU of ``inputs @ weight.T + bias``. erf is the rational approximation above, in float64
    (error < 1e-7, below float32 rounding near +-1): branch-free, so it vectorises where libm's would not."""
    out = np.empty((inputs.shape[0], weight.shape[0]), dtype=np.float32)
    for b in range(out.shape[0]):
        out[b] = bias
    _linear(out, inputs, weight)
    for b in range(out.shape[0]):
        for i in range(out.shape[1]):
            x = np.float64(out[b, i])
            z = min(max(x * 0.7071067811865476, -4.0), 4.0)
            z2 = z * z
            p = z2 * _ERF_P[6] + _ERF_P[5]
            p = (((((p * z2 + _ERF_P[4]) * z2 + _ERF_P[3]) * z2 + _ERF_P[2]) * z2 + _ERF_P[1]) * z2 + _ERF_P[0]) * z
            q = (((z2 * _ERF_Q[4] + _ERF_Q[3]) * z2 + _ERF_Q[2]) * z2 + _ERF_Q[1]) * z2 + _ERF_Q[0]
            out[b, i] = np.float32(0.5 * x * (1.0 + p / q))
    return out


@numba.njit(**_COMPILED)
def _forward(current_table, previous_table, history_weight, anchor_table, token_table, state_weight, trunk1_weight,
             trunk1_bias, trunk2_weight, trunk2_bias, head_weight, head_bias, wide_anchor, wide_step, history_gain,
             state_head, step_source, step_layer, targets, head, distance, current, previous, tokens, token_hash,
             token_buckets, counts, hidden):  # pragma: no cover - compiled; tested against RouteNet.forward
    """Sigmoid probabilities ``[distance, B, E]`` of ``RouteNet.forward`` at anchor layer ``head - 1``.

    Absent inputs are empty arrays: ``previous`` (no previous step), ``tokens``, ``counts`` (no history
    or the model does not use it), ``hidden`` (this head has no hidden-state path); so are the weights
    of parts the model lacks (token table, history, state, wide and history-gain tables).
    """
    batch, num_layers, _ = current.shape
    num_experts = current_table.shape[0] // num_layers
    bag_dim, outputs = current_table.shape[1], distance * num_experts
    token_at = 2 * bag_dim + anchor_table.shape[1]  # trunk input: current, previous, anchor, token?, history?, state?
    history_at = token_at + token_table.shape[1]
    state_at = history_at + history_weight.shape[0]
    parts = np.zeros((batch, trunk1_weight.shape[1]), dtype=np.float32)
    shares = np.zeros((batch, num_layers, num_experts), dtype=np.float32)  # per layer: expert counts / total
    for b in range(batch):
        _bag(parts, b, 0, current_table, current[b], num_experts)
        if previous.shape[0]:
            _bag(parts, b, bag_dim, previous_table, previous[b], num_experts)
        parts[b, 2 * bag_dim:token_at] = anchor_table[head]
        if token_table.shape[0]:
            bucket = np.uint64(0)  # unknown token
            if tokens.shape[0]:
                bucket = np.uint64(tokens[b]) * token_hash % token_buckets + np.uint64(1)
            parts[b, token_at:history_at] = token_table[bucket]
        if counts.shape[0]:
            for layer in range(num_layers):
                total = counts[b, layer].sum()
                if total > 0:
                    shares[b, layer] = counts[b, layer] / total
    if history_weight.shape[0]:
        projected = np.zeros((batch, history_weight.shape[0]), dtype=np.float32)
        _linear(projected, shares.reshape(batch, -1), history_weight)
        parts[:, history_at:state_at] = projected
    if hidden.shape[0]:
        projected = np.zeros((batch, state_weight.shape[0]), dtype=np.float32)
        _linear(projected, hidden, state_weight)
        parts[:, state_at:] = projected
    mixed = _dense_gelu(_dense_gelu(parts, trunk1_weight, trunk1_bias), trunk2_weight, trunk2_bias)
    logits = np.empty((batch, outputs), dtype=np.float32)
    for b in range(batch):
        logits[b] = head_bias[head, :outputs]
    _linear(logits, mixed, head_weight[head])
    if hidden.shape[0]:
        _linear(logits, hidden, state_head[head])
    for b in range(batch):
        if wide_anchor.shape[2]:
            if head > 0:  # the anchor layer's experts vote for every target
                _add_rows(logits, b, wide_anchor[head], current[b, head - 1], 0, distance)
            for d in range(distance):  # each target's layer one token earlier votes for it
                source, layer = step_source[head, d], step_layer[head, d]
                if source == 1 or (source == 0 and previous.shape[0]):
                    ids = current[b, layer] if source == 1 else previous[b, layer]
                    _add_rows(logits, b, wide_step[head], ids, d, d + 1)
        if history_gain.shape[1]:
            for d in range(distance):
                for e in range(num_experts):
                    logits[b, d * num_experts + e] += history_gain[head, d, e] * shares[b, targets[head, d], e]
    probabilities = np.empty((distance, batch, num_experts), dtype=np.float32)
    for d in range(distance):
        for b in range(batch):
            for e in range(num_experts):
                probabilities[d, b, e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[b, d * num_experts + e]))
    return probabilities
