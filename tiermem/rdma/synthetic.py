"""Synthetic pool objects with known bytes, for benches and tests (``tiermem pool serve --synthetic``).

Byte ``j`` of synthetic object ``i`` is ``(j + 131 * i) % 251``: cheap to write at memcpy speed, and a
read from the wrong object or the wrong offset shows (251 is prime, so no power-of-two offset aliases).
"""

from __future__ import annotations

import torch

from tiermem.types import ObjectKey

PERIOD = 251


def synthetic_key(index: int) -> ObjectKey:
    return ObjectKey("synthetic", "pool", 0, index)


def fill_synthetic(dst: torch.Tensor, index: int) -> None:
    """Write synthetic object ``index``'s bytes into the contiguous tensor ``dst`` (one broadcast copy)."""
    flat = dst.reshape(-1).view(torch.uint8)
    period = synthetic_bytes(index, 0, PERIOD)
    whole = flat.numel() // PERIOD
    flat.narrow(0, 0, whole * PERIOD).view(whole, PERIOD).copy_(period.expand(whole, PERIOD))
    tail = flat.numel() - whole * PERIOD
    flat.narrow(0, whole * PERIOD, tail).copy_(period.narrow(0, 0, tail))


def synthetic_bytes(index: int, offset_bytes: int, nbytes: int) -> torch.Tensor:
    """Bytes ``[offset, offset + nbytes)`` of synthetic object ``index`` (the reference for checks)."""
    positions = torch.arange(offset_bytes, offset_bytes + nbytes, dtype=torch.int64)
    return ((positions + 131 * index) % PERIOD).to(torch.uint8)
