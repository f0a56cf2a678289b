"""The decode step of ``tiermem bench engram``: shapes, a real-shaped backbone, and how steps are timed.

The backbone is attention-free: ``num_layers`` dense SwiGLU blocks whose width matches the activated
parameters per layer, a tied embedding / LM head, and an Engram block at each Engram layer. Without
attention the layers before an Engram layer compute *less* than in the real model, so hiding the
lookup here is harder than there. Weights are random, generated on the device.

Invariant: a step submits every Engram layer's lookup before layer 0 (as soon as its tokens are
known), and an Engram layer waits only for its own rows.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from tiermem.engram import EngramHashConfig, EngramLookup, EngramModule, EngramModuleConfig, RowFormat

VOCAB = 129_280  # DeepSeek-V3 tokenizer


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked model: its Engram hashing, row format and backbone dimensions."""

    name: str
    hash: EngramHashConfig
    row_dim: int
    row_format: RowFormat
    hidden_size: int
    intermediate_size: int  # SwiGLU width ~ activated parameters of one layer
    num_layers: int = 30


SHAPES = {
    # Engram-27B: 30 blocks of hidden 2560, ~3.8B activated parameters; Engram at layers 2 and 15.
    "engram27b": Shape("engram27b", EngramHashConfig(vocab_size=VOCAB, layer_ids=(2, 15),
                                                     rows_per_head=(2_262_400, 2_262_400)),
                       row_dim=80, row_format=RowFormat.BF16, hidden_size=2560, intermediate_size=13_312),
    # DeepSeek-V4.1-like: 24 lookups per token per layer (orders 2-4 x 8 heads), 264-byte fp8 rows; 8 GB
    # per layer (the real ~200 GB would not fit in HBM for the resident comparison).
    "v4like": Shape("v4like", EngramHashConfig(vocab_size=VOCAB, layer_ids=(2, 15), rows_per_head=(1_262_000,) * 3,
                                               max_ngram_order=4),
                    row_dim=256, row_format=RowFormat.FP8_E4M3, hidden_size=7168, intermediate_size=18_432),
}


def scaled(shape: Shape, table_fraction: float, model_divisor: int) -> Shape:
    """The shape with ``table_fraction`` of its table rows and its backbone narrowed by ``model_divisor``."""
    rows = tuple(max(101, int(r * table_fraction)) for r in shape.hash.rows_per_head)
    return dataclasses.replace(shape, hash=dataclasses.replace(shape.hash, rows_per_head=rows),
                               hidden_size=shape.hidden_size // model_divisor,
                               intermediate_size=shape.intermediate_size // model_divisor,
                               num_layers=shape.num_layers if model_divisor == 1 else 16)


class Backbone(nn.Module):
    """Tied embedding, ``num_layers`` SwiGLU blocks, Engram blocks at the Engram layers, LM head."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inner = shape.hidden_size, shape.intermediate_size

        def weight(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, cols, device=device, dtype=dtype) / cols ** 0.5, requires_grad=False)
        self.embedding = weight(VOCAB, hidden)
        self.gate_up = nn.ParameterList(weight(2 * inner, hidden) for _ in range(shape.num_layers))
        self.down = nn.ParameterList(weight(hidden, inner) for _ in range(shape.num_layers))
        config = EngramModuleConfig(hidden_size=hidden, num_heads=shape.hash.heads_per_layer, row_dim=shape.row_dim,
                                    conv_dilation=shape.hash.max_ngram_order)
        self.engrams = nn.ModuleDict({str(layer): EngramModule(config).to(device, dtype).requires_grad_(False)
                                      for layer in shape.hash.layer_ids})

    def step(self, ids: torch.Tensor, lookup: EngramLookup | None, lookup_ids: torch.Tensor, states: dict,
             probes: list | None = None) -> torch.Tensor:
        """One decode step for ``ids`` [B, W] (device); rows come from ``lookup`` (None: no Engram)."""
        handles = None if lookup is None else lookup.submit(lookup_ids)  # before layer 0: most compute to hide behind
        h = F.embedding(ids[:, -1:], self.embedding)
        for layer in range(len(self.gate_up)):
            if handles is not None and str(layer) in self.engrams:
                before = _record(probes)
                rows = handles[layer].wait()
                _record(probes, before)
                h = self.engrams[str(layer)](h, rows, states[layer])
            gate, up = F.linear(F.rms_norm(h, h.shape[-1:]), self.gate_up[layer]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, self.down[layer])
        return F.linear(F.rms_norm(h, h.shape[-1:]), self.embedding)


def lookup_alone(lookup: EngramLookup, token_seq: list, device: torch.device, warmup: int) -> list[float]:
    """Seconds from tokens known to every layer's rows ready, alone on the GPU (eager: launches included)."""
    times = []
    for i, ids in enumerate(token_seq):
        start = time.perf_counter()
        for handle in lookup.submit(ids).values():
            handle.wait()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def eager_steps(model: Backbone, lookup: EngramLookup | None, device_seq: list, lookup_seq: list, states: dict,
                warmup: int) -> tuple[list[float], list[list[float]]]:
    """Seconds per eager decode step (synced each step) and microseconds each Engram layer stalled."""
    times, stalls = [], []
    probing = device_seq[0].is_cuda and lookup is not None
    for i, (ids, lookup_ids) in enumerate(zip(device_seq, lookup_seq)):
        probes = [] if probing else None
        start = time.perf_counter()
        model.step(ids, lookup, lookup_ids, states, probes)
        sync(ids.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            stalls.append([before.elapsed_time(after) * 1e3 for before, after in probes or ()])
    return times, stalls


class Captured:
    """A CUDA graph of ``work(ids)``; fresh tokens are copied into its input before every replay."""

    def __init__(self, work, first_ids: torch.Tensor) -> None:
        self.ids = first_ids.clone()
        for _ in range(2):  # compile kernels, move constants, create cuBLAS handles before capture
            work(self.ids)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            work(self.ids)

    @classmethod
    def step(cls, model: Backbone, lookup: EngramLookup | None, first_ids: torch.Tensor, states: dict) -> Captured:
        return cls(lambda ids: model.step(ids, lookup, ids, states), first_ids)

    @classmethod
    def lookup(cls, lookup: EngramLookup, first_ids: torch.Tensor) -> Captured:
        return cls(lambda ids: [handle.wait() for handle in lookup.submit(ids).values()], first_ids)

    def replay_us(self, device_seq: list, warmup: int) -> float:
        """Mean GPU time of back-to-back replays (fresh tokens: rows cannot come from L2 of a replay before)."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i, ids in enumerate(device_seq):
            if i == warmup:
                begin.record()
            self.ids.copy_(ids)
            self.graph.replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e3 / (len(device_seq) - warmup)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _record(probes: list | None, before: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
    if probes is None:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    if before is not None:
        probes.append((before, event))
    return event
