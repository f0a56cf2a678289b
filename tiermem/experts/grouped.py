"""Grouped expert computation on HBM slots: a whole wave of experts in two grouped GEMMs.

The per-expert loop (``tiermem.experts.compute``) costs about eight kernel launches per hit
expert, so at decode batch sizes the host, not the GPU or the link, sets the pace. This module
mirrors transformers' ``grouped_mm`` experts implementation (``grouped_mm_experts_forward``)
instead: every (token, top-k position) pair is one row; rows are grouped by the slot that holds
their expert; one ``grouped_mm`` per projection runs over the slot group's stacked weights (views
into the cache memory, no copy); the routing weight scales each row; the rows go back to (token,
position) order and are summed over the positions (``sum(dim=1)``). About a dozen launches per
layer, whatever the number of experts.

Invariants:
- each row is computed by one GEMM group that reads only its own expert's weights, so its value
  depends neither on which slot holds the expert nor on the other rows: the output is
  bit-identical to transformers' ``grouped_mm`` experts on the all-resident weights (tested on CPU,
  checked on the H100);
- the host builds each wave's row order and group offsets (one compiled counting sort; it already holds the routing)
  and ships them in one small asynchronous copy from pinned memory; no data-dependent GPU op and
  no synchronisation, so the host goes on (to plan the prefetch) while the wave waits for its copies;
- rows whose expert id is outside ``[0, num_experts)`` stay zero (dropped slots).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch

from tiermem.errors import ConfigError
from tiermem.experts.layout import ExpertLayout, Projections, TensorSpec

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm  # public name since torch 2.10


@dataclass(frozen=True, eq=False)
class SlotWeights:
    """One slot group's weights as stacked views ``[slots, out, in]`` into the cache memory (no copy)."""

    gate_up: torch.Tensor  # [G, 2I, H], gate rows first
    down: torch.Tensor  # [G, H, I]

    @classmethod
    def of(cls, layout: ExpertLayout, memory: torch.Tensor) -> SlotWeights:
        """Views of ``memory`` (``[G, block_bytes]`` uint8, one slot a row) laid out as ``layout``."""
        if layout.quantized:
            raise ConfigError(f"grouped experts: quantized layouts are not supported ({layout.describe()})")
        if layout.projections is Projections.FUSED:
            gate_up = layout.spec("gate_up")
        else:
            gate, up = layout.spec("gate"), layout.spec("up")
            if gate.offset_bytes + gate.nbytes != up.offset_bytes or gate.dtype != up.dtype:
                raise ConfigError(
                    f"grouped experts: gate and up must be adjacent in the block to form one [2I, H] matrix "
                    f"({layout.describe()}); use compute='loop' for this layout"
                )
            gate_up = TensorSpec("gate_up", (2 * gate.shape[0], gate.shape[1]), gate.dtype, gate.offset_bytes)
        return cls(_stacked(memory, gate_up, layout.block_bytes), _stacked(memory, layout.spec("down"), layout.block_bytes))


@dataclass(frozen=True)
class WaveRows:
    """A wave's rows in slot order: ``pairs`` index the flattened ``[T * K]`` routing, ``offsets`` end each slot."""

    pairs: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [G], cumulative row counts per slot of the group

    @property
    def num_rows(self) -> int:
        return len(self.pairs)


def wave_rows(expert_of_pair: np.ndarray, slot_of_expert: np.ndarray, num_slots: int) -> WaveRows:
    """Group the pairs whose expert has a slot (``slot_of_expert[e] >= 0``) by slot, stable within one."""
    pairs, offsets = _counting_sort(np.ascontiguousarray(expert_of_pair, dtype=np.int64),
                                    np.ascontiguousarray(slot_of_expert, dtype=np.int64), num_slots)
    return WaveRows(pairs, offsets)


@functools.cache
def compile_now() -> None:
    """Compile (or load from numba's cache) ``wave_rows``' kernel now, not in a decode's first layer."""
    wave_rows(np.zeros(1, np.int64), np.zeros(1, np.int64), 1)


@numba.njit(cache=True, nogil=True)
def _counting_sort(expert_of_pair: np.ndarray, slot_of_expert: np.ndarray,
                   num_slots: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``wave_rows`` in one compiled pass (a counting sort by slot): a handful of numpy calls per layer
    cost the decode host more than the sort itself."""
    num_experts = slot_of_expert.shape[0]
    slot = np.full(expert_of_pair.shape[0], -1, dtype=np.int64)
    offsets = np.zeros(num_slots, dtype=np.int64)
    for row in range(expert_of_pair.shape[0]):
        expert = expert_of_pair[row]
        if 0 <= expert < num_experts and slot_of_expert[expert] >= 0:
            slot[row] = slot_of_expert[expert]
            offsets[slot[row]] += 1
    starts = np.empty(num_slots, dtype=np.int64)
    total = 0
    for s in range(num_slots):
        starts[s] = total
        total += offsets[s]
        offsets[s] = total
    pairs = np.empty(total, dtype=np.int64)
    for row in range(expert_of_pair.shape[0]):
        if slot[row] >= 0:
            pairs[starts[slot[row]]] = row
            starts[slot[row]] += 1
    return pairs, offsets


def run_wave(
    hidden: torch.Tensor, top_k_weights: torch.Tensor, rows: WaveRows, weights: SlotWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor,
) -> None:
    """Compute the wave's rows and write them into ``out`` (``[T * K, H]``, pair order); launches only."""
    if rows.num_rows == 0:
        return
    index = wave_index(rows, top_k_weights.shape[-1])
    if hidden.is_cuda:  # from pinned memory (torch's caching host allocator), so the host never waits for it
        index = index.pin_memory().to(hidden.device, non_blocking=True)
    compute_wave(hidden, top_k_weights, index, rows.num_rows, weights, act_fn, out)


def wave_index(rows: WaveRows, top_k: int) -> torch.Tensor:
    """The wave's pair rows, their tokens and the slot offsets, as one int64 host tensor ``[2n + G]``."""
    out = np.empty(2 * rows.num_rows + len(rows.offsets), dtype=np.int64)
    write_wave_index(rows, top_k, out)
    return torch.from_numpy(out)


def write_wave_index(rows: WaveRows, top_k: int, out: np.ndarray) -> None:
    """Fill ``out`` (int64 ``[2n + G]``) with ``wave_index(rows, top_k)``'s values, allocating nothing."""
    n = rows.num_rows
    out[:n] = rows.pairs
    np.floor_divide(rows.pairs, top_k, out=out[n:2 * n])
    out[2 * n:] = rows.offsets


def compute_wave(
    hidden: torch.Tensor, top_k_weights: torch.Tensor, index: torch.Tensor, num_rows: int, weights: SlotWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor,
) -> None:
    """The wave's kernels for ``index`` (``wave_index``, on ``hidden``'s device, ``num_rows`` pairs) into ``out``."""
    n = num_rows
    pairs, tokens, offsets = index[:n], index[n:2 * n], index[2 * n:].to(torch.int32)
    state = hidden.index_select(0, tokens).to(weights.gate_up.dtype)
    gate, up = _grouped_mm(state, weights.gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    projected = _grouped_mm(act_fn(gate) * up, weights.down.transpose(-2, -1), offs=offsets)
    out.index_copy_(0, pairs, projected * top_k_weights.reshape(-1).index_select(0, pairs).unsqueeze(-1))


def pair_buffer(hidden: torch.Tensor, top_k_weights: torch.Tensor, weights: SlotWeights) -> torch.Tensor:
    """Zeroed ``[T * K, H]`` rows in the dtype of the weighted expert output."""
    dtype = torch.promote_types(weights.down.dtype, top_k_weights.dtype)
    return torch.zeros((top_k_weights.numel(), hidden.shape[-1]), dtype=dtype, device=hidden.device)


def sum_pairs(out: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-token sum over top-k positions, as transformers' ``grouped_mm`` experts reduce them."""
    return out.view(num_tokens, -1, out.shape[-1]).sum(dim=1).to(dtype)


def _stacked(memory: torch.Tensor, spec: TensorSpec, block_bytes: int) -> torch.Tensor:
    """``[G, rows, cols]`` view of tensor ``spec`` in every slot row of ``memory``."""
    itemsize = spec.dtype.itemsize
    flat = memory.view(spec.dtype)  # [G, block_bytes / itemsize]
    rows, cols = spec.shape
    return torch.as_strided(flat, (memory.shape[0], rows, cols), (block_bytes // itemsize, cols, 1),
                            flat.storage_offset() + spec.offset_bytes // itemsize)
