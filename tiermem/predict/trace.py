"""Routing traces: which experts each token was routed to at each MoE layer, in one on-disk format.

Invariants:
- ``experts`` is int16 ``[T, L, K]``; -1 marks a missing entry (a layer without data, or a token the
  source failed to record). Present ids lie in ``[0, num_experts)`` and are distinct within a
  (token, layer).
- Axis 1 is a *slot*; ``layer_ids[slot]`` is the model's real layer index, strictly ascending. Files in
  ``../shared/data/traces`` use one slot per real layer (``layer_ids = arange(L)``); a trace restricted
  to its layers with data keeps the real indices in ``layer_ids``.
- Rows are sorted by (``seq_id``, ``pos``) and positions strictly increase within a sequence.
- A trace is immutable (its arrays are read-only views); every helper returns a new trace. Derived
  traces (subsets, restrictions) drop ``extras``, whose per-row meaning this module cannot know.
- Files are plain ``.npz`` readable with ``np.load(path)`` and no pickle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from tiermem.errors import TraceError

logger = logging.getLogger("tiermem.predict")

PREFILL = 0
DECODE = 1
_SCALARS = ("num_experts", "top_k", "model", "source")
_ARRAYS = ("experts", "seq_id", "pos", "phase", "weights", "token_ids", "hidden", "layer_ids")
_RESERVED = frozenset(_SCALARS + _ARRAYS + ("layers",))


def _frozen(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class RouteTrace:
    """Expert ids per token per MoE layer, with sequence ids, positions and phases."""

    experts: np.ndarray  # int16 [T, L, K]; -1 = missing
    seq_id: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T] position of the token within its sequence
    phase: np.ndarray  # uint8 [T]; PREFILL (0) or DECODE (1)
    num_experts: int
    model: str = ""
    weights: np.ndarray | None = None  # float16 [T, L, K] router weights of the chosen experts; NaN = missing
    token_ids: np.ndarray | None = None  # int64 [T]
    hidden: np.ndarray | None = None  # float16 [T, L, H] hidden state entering each layer's router
    layer_ids: np.ndarray | None = None  # int64 [L] real layer index of each slot; None means arange(L)
    source: str = ""
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "experts", _frozen(_as(self.experts, np.int16, 3, "experts")))
        num_tokens, num_layers, _ = self.experts.shape
        for name, dtype in (("seq_id", np.int32), ("pos", np.int32), ("phase", np.uint8)):
            set_(self, name, _frozen(_as(getattr(self, name), dtype, 1, name, num_tokens)))
        if self.weights is not None:
            set_(self, "weights", _frozen(_as(self.weights, np.float16, 3, "weights")))
            _same_shape(self.weights, self.experts, "weights")
        if self.token_ids is not None:
            set_(self, "token_ids", _frozen(_as(self.token_ids, np.int64, 1, "token_ids", num_tokens)))
        if self.hidden is not None:
            set_(self, "hidden", _frozen(_as(self.hidden, np.float16, 3, "hidden")))
            _same_shape(self.hidden[:, :, :0], self.experts[:, :, :0], "hidden")
        layer_ids = np.arange(num_layers) if self.layer_ids is None else self.layer_ids
        set_(self, "layer_ids", _frozen(_as(layer_ids, np.int64, 1, "layer_ids", num_layers)))
        set_(self, "num_experts", int(self.num_experts))
        set_(self, "extras", MappingProxyType({k: _frozen(np.asarray(v)) for k, v in self.extras.items()}))
        self._validate()

    # ----------------------------------------------------------------------------------- shape
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def layers(self) -> np.ndarray:
        """Real layer indices of the slots that hold data for at least one token."""
        return self.layer_ids[(self.experts >= 0).any(axis=(0, 2))]

    @property
    def sequence_ids(self) -> np.ndarray:
        return np.unique(self.seq_id)

    # --------------------------------------------------------------------------------- helpers
    def select_rows(self, rows: np.ndarray) -> RouteTrace:
        """The trace of the given rows (kept in trace order); extras are dropped."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        pick = (lambda a: None if a is None else a[rows])
        return replace(
            self, experts=self.experts[rows], seq_id=self.seq_id[rows], pos=self.pos[rows],
            phase=self.phase[rows], weights=pick(self.weights), token_ids=pick(self.token_ids),
            hidden=pick(self.hidden), extras={},
        )

    def select_sequences(self, seq_ids: np.ndarray | list[int]) -> RouteTrace:
        """The trace of whole sequences ``seq_ids``; a sequence is never split."""
        wanted = np.asarray(seq_ids)
        unknown = np.setdiff1d(wanted, self.sequence_ids)
        if unknown.size:
            raise TraceError(
                f"trace: sequence ids {unknown.tolist()[:10]} are not in this trace; it holds "
                f"{self.sequence_ids.size} sequences ({self.sequence_ids.tolist()[:10]}...)"
            )
        return self.select_rows(np.flatnonzero(np.isin(self.seq_id, wanted)))

    def select_slots(self, slots: np.ndarray | list[int]) -> RouteTrace:
        """The trace restricted to the given layer slots (ascending); extras are dropped."""
        slots = np.asarray(slots, dtype=np.int64)
        pick = (lambda a: None if a is None else a[:, slots])
        return replace(
            self, experts=self.experts[:, slots], weights=pick(self.weights), hidden=pick(self.hidden),
            layer_ids=self.layer_ids[slots], extras={},
        )

    def restrict_to_layers_with_data(self) -> RouteTrace:
        """Keep only slots with data; their real indices stay in ``layer_ids`` (e.g. 0, 8, 12, 18, 23)."""
        return self.select_slots(np.flatnonzero((self.experts >= 0).any(axis=(0, 2))))

    def mask_unaligned_layers(self) -> RouteTrace:
        """Blank decode rows of (sequence, layer) pairs that the source marks misaligned (``layer_ok``).

        Some sources dropped records and re-indexed the rest, so the decode rows of such a pair are
        shifted against the other layers; cross-layer work must not use them. A trace without a
        ``layer_ok`` extra is returned unchanged.
        """
        layer_ok = self.extras.get("layer_ok")
        if layer_ok is None:
            return self
        seqs = self.sequence_ids
        if layer_ok.shape != (int(seqs.max()) + 1, self.num_layers):
            raise TraceError(
                f"trace: layer_ok has shape {layer_ok.shape}, expected (max seq_id + 1, num_layers) = "
                f"({int(seqs.max()) + 1}, {self.num_layers})"
            )
        bad = ~layer_ok[self.seq_id] & (self.phase == DECODE)[:, None]  # [T, L]
        experts = np.where(bad[:, :, None], np.int16(-1), self.experts)
        weights = None if self.weights is None else np.where(bad[:, :, None], np.float16(np.nan), self.weights)
        logger.info("trace: blanked %d misaligned decode (token, layer) entries (layer_ok)", int(bad.sum()))
        return replace(self, experts=experts, weights=weights)

    def previous_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """For each row, the row of the same sequence at ``pos - 1``, and whether that row exists."""
        rows = np.arange(self.num_tokens) - 1
        has = np.zeros(self.num_tokens, dtype=bool)
        has[1:] = (self.seq_id[1:] == self.seq_id[:-1]) & (self.pos[1:] == self.pos[:-1] + 1)
        return np.where(has, rows, 0), has

    def sequence_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(seq_id, rows)`` per sequence, rows in position order."""
        starts = np.flatnonzero(np.r_[True, self.seq_id[1:] != self.seq_id[:-1]])
        ends = np.r_[starts[1:], self.num_tokens]
        for start, end in zip(starts, ends):
            yield int(self.seq_id[start]), np.arange(start, end)

    def decode_steps(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(seq_id, rows)`` per sequence with only its decode rows, one per step, in order."""
        for seq, rows in self.sequence_rows():
            yield seq, rows[self.phase[rows] == DECODE]

    # ------------------------------------------------------------------------------ validation
    def _validate(self) -> None:
        experts = self.experts
        if self.num_experts <= 0 or self.num_experts > np.iinfo(np.int16).max:
            raise TraceError(f"trace: num_experts={self.num_experts} must be in 1..32767")
        bad = (experts < -1) | (experts >= self.num_experts)
        if bad.any():
            token, layer, _ = np.argwhere(bad)[0]
            raise TraceError(
                f"trace: expert id {int(experts[token, layer].max())} at token {token}, slot {layer} is "
                f"outside [0, {self.num_experts}) (and is not -1 = missing); check num_experts or the "
                f"physical-to-logical expert map of the source"
            )
        ordered = np.sort(experts, axis=2)
        duplicate = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)
        if duplicate.any():
            token, layer, _ = np.argwhere(duplicate)[0]
            raise TraceError(
                f"trace: token {token}, slot {layer} routes to expert ids {experts[token, layer].tolist()} "
                f"with a repeat; a top-k set has distinct ids (use -1 for missing entries)"
            )
        if np.any(~np.isin(self.phase, (PREFILL, DECODE))):
            raise TraceError(f"trace: phase holds {np.unique(self.phase).tolist()}; use 0 (prefill) or 1 (decode)")
        same = self.seq_id[1:] == self.seq_id[:-1]
        disorder = (self.seq_id[1:] < self.seq_id[:-1]) | (same & (self.pos[1:] <= self.pos[:-1]))
        if disorder.any():
            row = int(np.flatnonzero(disorder)[0]) + 1
            raise TraceError(
                f"trace: rows must be sorted by (seq_id, pos) with strictly increasing positions; row {row} "
                f"(seq {self.seq_id[row]}, pos {self.pos[row]}) follows (seq {self.seq_id[row - 1]}, pos "
                f"{self.pos[row - 1]}); sort with np.lexsort((pos, seq_id)) and drop duplicate positions"
            )
        if self.num_layers > 1 and np.any(np.diff(self.layer_ids) <= 0):
            raise TraceError(f"trace: layer_ids {self.layer_ids.tolist()} must be strictly ascending")
        clash = _RESERVED & set(self.extras)
        if clash:
            raise TraceError(f"trace: extras may not reuse the reserved names {sorted(clash)}")


def _as(value: object, dtype: type, ndim: int, name: str, length: int | None = None) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise TraceError(f"trace: {name} must have {ndim} dimensions, got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise TraceError(f"trace: {name} has {array.shape[0]} entries, expected one per token ({length})")
    if np.issubdtype(array.dtype, np.floating) and not np.issubdtype(np.dtype(dtype), np.floating):
        raise TraceError(f"trace: {name} must hold integers, got {array.dtype}")
    if array.dtype != dtype:
        converted = array.astype(dtype)
        if not np.issubdtype(np.dtype(dtype), np.floating) and not np.array_equal(converted, array):
            raise TraceError(f"trace: {name} does not fit {np.dtype(dtype).name} without loss")
        array = converted
    return array


def _same_shape(array: np.ndarray, experts: np.ndarray, name: str) -> None:
    if array.shape != experts.shape:
        raise TraceError(f"trace: {name} has shape {array.shape[:2]}..., expected {experts.shape[:2]}... as experts")


# -------------------------------------------------------------------------------------- files
def save_trace(trace: RouteTrace, path: str | Path) -> None:
    """Write ``trace`` as a compressed ``.npz`` that ``load_trace`` and plain ``np.load`` read back."""
    arrays: dict[str, np.ndarray] = {
        "experts": trace.experts, "seq_id": trace.seq_id, "pos": trace.pos, "phase": trace.phase,
        "num_experts": np.int64(trace.num_experts), "top_k": np.int64(trace.top_k),
        "model": np.str_(trace.model), "source": np.str_(trace.source),
        "layer_ids": trace.layer_ids, "layers": trace.layers,
    }
    for name in ("weights", "token_ids", "hidden"):
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)
    arrays.update(trace.extras)
    np.savez_compressed(Path(path), **arrays)


def load_trace(path: str | Path) -> RouteTrace:
    """Read a trace written by ``save_trace`` or shipped in ``../shared/data/traces`` (no pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise TraceError(f"trace: file {str(path)!r} does not exist") from None
    except (ValueError, OSError) as exc:
        raise TraceError(f"trace: {str(path)!r} is not a readable .npz trace without pickle: {exc}") from None
    missing = [k for k in ("experts", "seq_id", "pos", "phase", "num_experts", "top_k") if k not in arrays]
    if missing:
        raise TraceError(f"trace: {str(path)!r} lacks the required array(s) {missing}")
    top_k = int(arrays.pop("top_k"))
    if arrays["experts"].ndim != 3 or arrays["experts"].shape[2] != top_k:
        raise TraceError(
            f"trace: {str(path)!r} says top_k={top_k} but experts has shape {arrays['experts'].shape}"
        )
    declared = arrays.pop("layers", None)
    trace = RouteTrace(
        experts=arrays.pop("experts"), seq_id=arrays.pop("seq_id"), pos=arrays.pop("pos"),
        phase=arrays.pop("phase"), num_experts=int(arrays.pop("num_experts")),
        model=str(arrays.pop("model", "")), source=str(arrays.pop("source", "")),
        weights=arrays.pop("weights", None), token_ids=arrays.pop("token_ids", None),
        hidden=arrays.pop("hidden", None), layer_ids=arrays.pop("layer_ids", None), extras=arrays,
    )
    if declared is not None and not np.array_equal(np.asarray(declared), trace.layers):
        logger.warning(
            "trace %s: declared layers %s differ from the layers holding data %s; using the data",
            path, np.asarray(declared).tolist(), trace.layers.tolist(),
        )
    return trace


# ------------------------------------------------------------------------------------- splits
def sequence_folds(trace: RouteTrace, num_folds: int = 2) -> list[tuple[RouteTrace, RouteTrace]]:
    """``(train, test)`` per fold, fold ``i`` testing the sequences with ``seq_id % num_folds == i``.

    With ``num_folds=2`` this is the split by seq_id parity. Sequences are never split.
    """
    seqs = trace.sequence_ids
    folds = [seqs[seqs % num_folds == i] for i in range(num_folds)]
    if num_folds < 2 or any(fold.size == 0 for fold in folds):
        raise TraceError(
            f"trace: cannot make {num_folds} folds by seq_id % {num_folds} from sequences "
            f"{seqs.tolist()[:10]} ({seqs.size} in all); each fold needs at least one sequence"
        )
    return [(trace.select_sequences(np.setdiff1d(seqs, test)), trace.select_sequences(test)) for test in folds]


def split_by_sequence(trace: RouteTrace, test_fraction: float, *, seed: int = 0) -> tuple[RouteTrace, RouteTrace]:
    """A seeded random ``(train, test)`` split of whole sequences; both sides get at least one."""
    seqs = trace.sequence_ids
    if not 0.0 < test_fraction < 1.0 or seqs.size < 2:
        raise TraceError(
            f"trace: a split needs 0 < test_fraction < 1 and >= 2 sequences; got {test_fraction} and {seqs.size}"
        )
    count = min(max(1, round(test_fraction * seqs.size)), seqs.size - 1)
    test = np.random.default_rng(seed).choice(seqs, size=count, replace=False)
    return trace.select_sequences(np.setdiff1d(seqs, test)), trace.select_sequences(np.sort(test))
