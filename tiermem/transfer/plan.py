"""Frozen transfer plans: which bytes move from which tensor to which, validated before any I/O.

A ``Copy`` moves the raw bytes of ``src`` into ``dst`` (both contiguous, same byte count). The plan
says nothing about how: streams, chunks and threads are the engine's business. Every copy of a plan
made by ``make_plan`` holds flat ``uint8`` views of its tensors (validated and flattened once, so the
engine's hot path does neither again). ``hooks`` are tier
I/O hooks (``Tier.on_io``) the engine must call before moving the bytes (modelled time, faults).

An ``Endpoint`` is one buffer validated once for many direct host-to-GPU copies (a cache copying the
same homes into the same slots over and over): ``endpoint(tensor)`` checks it as ``make_plan`` would
(contiguous; pinned if on the host) and keeps only its address, size and device, so each later copy
costs the engine two attribute compares instead of a plan. Whoever holds an endpoint keeps its
tensor alive and in place for as long as it uses it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tiermem.errors import TransferError


class Direction(str, enum.Enum):
    """Which way bytes move relative to the GPU."""

    H2D = "h2d"
    D2H = "d2h"
    D2D = "d2d"
    H2H = "h2h"


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    if not tensor.is_contiguous():
        raise TransferError(
            f"transfer: tensor of shape {tuple(tensor.shape)} is not contiguous; transfers move whole "
            "contiguous objects (call .contiguous() into a tiermem tensor first)"
        )
    if tensor.dtype == torch.uint8:
        return tensor if tensor.dim() == 1 else tensor.reshape(-1)
    return tensor.reshape(-1).view(torch.uint8)


@dataclass(frozen=True, eq=False)
class Copy:
    """Move all bytes of ``src`` into ``dst``."""

    src: torch.Tensor
    dst: torch.Tensor
    hooks: tuple[Callable[[int], None], ...] = ()

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()

    @property
    def direction(self) -> Direction:
        src_gpu, dst_gpu = self.src.is_cuda, self.dst.is_cuda
        if src_gpu and dst_gpu:
            return Direction.D2D
        if dst_gpu:
            return Direction.H2D
        if src_gpu:
            return Direction.D2H
        return Direction.H2H


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """A batch of copies submitted together and completed by one handle."""

    copies: tuple[Copy, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.copies)


def make_plan(pairs: Iterable[tuple[torch.Tensor, torch.Tensor] | Copy]) -> TransferPlan:
    """Validate ``(src, dst)`` pairs (or Copies) into a plan; raises TransferError on a bad pair."""
    copies = []
    for item in pairs:
        copy = item if isinstance(item, Copy) else Copy(item[0], item[1])
        src_bytes = copy.src.numel() * copy.src.element_size()
        dst_bytes = copy.dst.numel() * copy.dst.element_size()
        if src_bytes != dst_bytes:
            raise TransferError(
                f"transfer: source has {src_bytes} bytes but destination has {dst_bytes}; a copy moves a "
                "whole object, so allocate the destination with the source's shape and dtype"
            )
        direction = copy.direction
        if direction is Direction.H2D:
            _require_pinned(copy.src, "source", src_bytes)
        elif direction is Direction.D2H:
            _require_pinned(copy.dst, "destination", dst_bytes)
        src, dst = as_bytes(copy.src), as_bytes(copy.dst)
        copies.append(copy if src is copy.src and dst is copy.dst else Copy(src, dst, copy.hooks))
    return TransferPlan(tuple(copies))


@dataclass(frozen=True)
class Endpoint:
    """A contiguous buffer validated once for direct copies: its address, byte count and place."""

    address: int
    nbytes: int
    device: torch.device | None  # the CUDA device holding it; None: pinned host memory


def endpoint(tensor: torch.Tensor, role: str = "buffer") -> Endpoint:
    """Validate ``tensor`` (contiguous; pinned if on the host) for ``TransferEngine.submit_direct``."""
    flat = as_bytes(tensor)
    nbytes = flat.numel()
    if flat.is_cuda:
        return Endpoint(flat.data_ptr(), nbytes, flat.device)
    _require_pinned(flat, role, nbytes)
    return Endpoint(flat.data_ptr(), nbytes, None)


def split_chunks(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, size) pieces of at most ``chunk_bytes`` covering ``[0, nbytes)`` in order."""
    assert chunk_bytes > 0
    return [(offset, min(chunk_bytes, nbytes - offset)) for offset in range(0, nbytes, chunk_bytes)]


def _require_pinned(tensor: torch.Tensor, role: str, nbytes: int) -> None:
    if not tensor.is_pinned():
        raise TransferError(
            f"transfer: refusing a GPU copy whose host {role} ({nbytes} bytes at {tensor.data_ptr():#x}) is "
            "pageable: pageable copies run at 7.5-11.7 GB/s vs 55 GB/s pinned on an H100. Allocate it "
            "with TierManager.empty(..., tier='dram') (or another host tier), or pin it with .pin_memory()"
        )
