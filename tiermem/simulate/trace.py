"""Routing traces as the simulator reads them: the shared ``.npz`` format, synthetic traces, batch schedules.

The on-disk format is the one of ``../shared/data/traces/`` (see its README): ``experts`` int16
``[tokens, layers, top_k]`` with ``-1`` where a layer or token has no data, ``seq_id``, ``pos``,
``phase`` (0 prefill, 1 decode), ``num_experts``, ``top_k``, ``layers`` (the layer indices that hold
data) and, for traces with damaged records, ``layer_ok [sequences, layers]``.

Invariants: rows are sorted by (sequence, position); a ``SimTrace`` is never modified in place
(masking returns a new trace); ``-1`` never reaches a cache (it means "nothing routed here").
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tiermem.errors import ConfigError, TraceError

REQUIRED_KEYS = ("experts", "seq_id", "pos", "phase", "num_experts", "top_k", "layers")


class Phase(enum.IntEnum):
    PREFILL = 0
    DECODE = 1


@dataclass(frozen=True, eq=False)
class SimTrace:
    """Expert ids per token and layer, with sequence ids and phases."""

    experts: np.ndarray  # int16 [T, L, K]; -1 = no data
    seq_id: np.ndarray  # int32 [T]
    phase: np.ndarray  # uint8 [T]
    num_experts: int
    top_k: int
    layers: tuple[int, ...]  # layer indices that hold data, ascending
    model: str = "unknown"
    layer_ok: np.ndarray | None = None  # bool [num sequences, L]: False where records are missing

    def __post_init__(self) -> None:
        tokens = self.experts.shape[0]
        if self.experts.ndim != 3 or self.experts.shape[2] != self.top_k:
            raise TraceError(
                f"simulate trace: experts must be [tokens, layers, top_k={self.top_k}], got {self.experts.shape}"
            )
        if self.seq_id.shape != (tokens,) or self.phase.shape != (tokens,):
            raise TraceError(
                f"simulate trace: seq_id {self.seq_id.shape} and phase {self.phase.shape} must both be ({tokens},)"
            )
        if tokens and np.any(np.diff(self.seq_id) < 0):
            raise TraceError("simulate trace: rows must be grouped by sequence and in position order (sort by seq_id, pos)")
        if self.experts.max(initial=-1) >= self.num_experts or self.experts.min(initial=-1) < -1:
            raise TraceError(
                f"simulate trace: expert ids must lie in -1..{self.num_experts - 1}, found "
                f"{self.experts.min()}..{self.experts.max()}"
            )
        if not self.layers or max(self.layers) >= self.num_layers or list(self.layers) != sorted(set(self.layers)):
            raise TraceError(
                f"simulate trace: layers must be ascending indices below {self.num_layers}, got {self.layers}"
            )

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    def sequences(self) -> list[int]:
        return sorted(int(s) for s in np.unique(self.seq_id))

    def rows(self, seq: int, phase: Phase) -> np.ndarray:
        """Row indices of sequence ``seq`` in ``phase``, in position order."""
        return np.flatnonzero((self.seq_id == seq) & (self.phase == phase))


def load_trace(path: str | Path) -> SimTrace:
    """Read a trace ``.npz`` (no pickle) into a ``SimTrace``; names any missing key."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"simulate: trace file {str(path)!r} does not exist") from None
    missing = [key for key in REQUIRED_KEYS if key not in data.files]
    if missing:
        raise TraceError(
            f"simulate: trace {str(path)!r} lacks key(s) {missing}; a trace needs {list(REQUIRED_KEYS)} "
            f"(format: ../shared/data/traces/README.md)"
        )
    return SimTrace(
        experts=data["experts"].astype(np.int16),
        seq_id=data["seq_id"].astype(np.int32),
        phase=data["phase"].astype(np.uint8),
        num_experts=int(data["num_experts"]),
        top_k=int(data["top_k"]),
        layers=tuple(int(x) for x in data["layers"]),
        model=str(data["model"]) if "model" in data.files else path.stem,
        layer_ok=data["layer_ok"].astype(bool) if "layer_ok" in data.files else None,
    )


def select_sequences(trace: SimTrace, seqs: Sequence[int]) -> SimTrace:
    """The rows of the given sequences (whole sequences, for held-out evaluation), ids unchanged."""
    rows = np.isin(trace.seq_id, np.asarray(seqs))
    if not rows.any():
        raise TraceError(f"simulate: none of the sequences {list(seqs)[:10]} is in trace {trace.model!r}")
    return replace(trace, experts=trace.experts[rows], seq_id=trace.seq_id[rows], phase=trace.phase[rows])


def mask_incomplete_layers(trace: SimTrace) -> SimTrace:
    """Blank (sequence, layer) pairs that ``layer_ok`` marks as missing records; no-op without ``layer_ok``."""
    if trace.layer_ok is None:
        return trace
    experts = trace.experts.copy()
    for seq in trace.sequences():
        bad_layers = np.flatnonzero(~trace.layer_ok[seq])
        experts[np.ix_(trace.seq_id == seq, bad_layers)] = -1
    return replace(trace, experts=experts)


def synthetic_trace(
    *, num_layers: int, num_experts: int, top_k: int, num_sequences: int, decode_steps: int,
    prefill_tokens: int = 0, seed: int = 0,
) -> SimTrace:
    """Uniform, independent routing: every token picks ``top_k`` distinct experts per layer at random.

    The real shared traces are within 1% of uniform per-layer entropy, so this is the flat-routing
    model capacity planning uses where no trace of the model exists.
    """
    if top_k > num_experts:
        raise ConfigError(f"simulate: top_k={top_k} exceeds num_experts={num_experts}")
    rng = np.random.default_rng(seed)
    per_seq = prefill_tokens + decode_steps
    tokens = num_sequences * per_seq
    keys = rng.random((tokens, num_layers, num_experts))
    experts = np.argpartition(keys, top_k - 1, axis=2)[:, :, :top_k].astype(np.int16)
    phase = np.tile(np.r_[np.zeros(prefill_tokens), np.ones(decode_steps)].astype(np.uint8), num_sequences)
    return SimTrace(
        experts=experts,
        seq_id=np.repeat(np.arange(num_sequences, dtype=np.int32), per_seq),
        phase=phase,
        num_experts=num_experts,
        top_k=top_k,
        layers=tuple(range(num_layers)),
        model=f"synthetic-uniform(E={num_experts},K={top_k},L={num_layers})",
    )


def batch_groups(trace: SimTrace, batch_size: int) -> list[tuple[int, ...]]:
    """Static decode batches: consecutive groups of ``batch_size`` sequences, run step-aligned together."""
    if batch_size < 1:
        raise ConfigError(f"simulate: batch_size must be >= 1, got {batch_size}")
    seqs = trace.sequences()
    return [tuple(seqs[i : i + batch_size]) for i in range(0, len(seqs), batch_size)]
