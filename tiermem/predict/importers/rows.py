"""Row assembly shared by the importers: collect per-token rows, blank unrouted layers, build a trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tiermem.errors import TraceError
from tiermem.predict.trace import RouteTrace

logger = logging.getLogger("tiermem.predict")


def blank_unrouted(experts: np.ndarray, moe_layers: Sequence[int] | None = None) -> np.ndarray:
    """int16 copy of ``experts`` ``[T, L, K]`` with unrouted entries set to -1.

    Engines zero-fill the capture buffer of layers without experts (dense layers), which reads as a
    top-k set with repeated ids: such (token, layer) entries are blanked, as are all layers outside
    ``moe_layers`` when it is given.
    """
    experts = np.asarray(experts).astype(np.int64)
    ordered = np.sort(experts, axis=2)
    repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)  # [T, L]
    if moe_layers is not None:
        outside = ~np.isin(np.arange(experts.shape[1]), np.asarray(moe_layers))
        repeated |= outside[None, :]
    if repeated.any():
        logger.debug("importer: blanked %d unrouted (token, layer) entries", int(repeated.sum()))
    return np.where(repeated[:, :, None], -1, experts).astype(np.int16)


class RowBuilder:
    """Collects rows (any order) and builds a ``RouteTrace`` sorted by (seq_id, pos)."""

    def __init__(self, *, num_layers: int, top_k: int) -> None:
        self.num_layers, self.top_k = num_layers, top_k
        self._columns: dict[str, list[np.ndarray | None]] = {
            k: [] for k in ("seq", "pos", "experts", "phase", "token_ids", "weights", "hidden")
        }

    def add(self, *, seq: np.ndarray, pos: np.ndarray, experts: np.ndarray, phase: np.ndarray,
            token_ids: np.ndarray | None = None, weights: np.ndarray | None = None,
            hidden: np.ndarray | None = None) -> None:
        experts = np.asarray(experts)
        if experts.ndim != 3 or experts.shape[1:] != (self.num_layers, self.top_k):
            raise TraceError(
                f"importer: rows of shape {experts.shape}, expected [tokens, {self.num_layers} layers, top-{self.top_k}]"
            )
        for name, value in (("seq", seq), ("pos", pos), ("experts", experts), ("phase", phase),
                            ("token_ids", token_ids), ("weights", weights), ("hidden", hidden)):
            self._columns[name].append(None if value is None else np.asarray(value))

    def build(self, *, num_experts: int, model: str = "", source: str = "",
              layer_ids: np.ndarray | None = None) -> RouteTrace:
        if not self._columns["seq"]:
            raise TraceError("importer: no rows to build a trace from (no requests or records were given)")
        joined = {name: self._join(name) for name in self._columns}
        order = np.lexsort((joined["pos"], joined["seq"]))
        pick = (lambda a: None if a is None else a[order])
        return RouteTrace(
            experts=joined["experts"][order], seq_id=joined["seq"][order], pos=joined["pos"][order],
            phase=joined["phase"][order], num_experts=num_experts, model=model, weights=pick(joined["weights"]),
            token_ids=pick(joined["token_ids"]), hidden=pick(joined["hidden"]), layer_ids=layer_ids, source=source,
        )

    def _join(self, name: str) -> np.ndarray | None:
        parts = self._columns[name]
        if any(p is None for p in parts):
            if any(p is not None for p in parts):
                logger.warning("importer: %s known for only some rows; dropped for the whole trace", name)
            return None
        return np.concatenate(parts)
