"""How the weights of one expert are packed into one contiguous block, and read back as tensor views.

One expert (gate+up+down, or fused gate_up+down, plus scales when quantized) is ONE block of
``block_bytes`` bytes, so one copy moves it between tiers and one slot holds it in HBM.

Invariants:
- every tensor starts at a multiple of ``TENSOR_ALIGNMENT_BYTES`` inside its block, and
  ``block_bytes`` is a multiple of ``BLOCK_ALIGNMENT_BYTES``, so blocks laid end to end keep every
  view aligned (GEMM kernels, and CPU kernels whose results can depend on alignment, see the same
  addresses modulo 256 as for a fresh allocation);
- ``views(block)`` returns views (no copy) in the layout's order; ``pack_into`` checks names,
  shapes and dtypes and writes every byte of every tensor (padding is left as it was);
- projection names are canonical: ``gate_up`` [2I, H] (fused, gate rows first) or ``gate`` and
  ``up`` [I, H], and ``down`` [H, I]; a quantization scale of ``x`` is named ``x_scale``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tiermem.errors import ConfigError

TENSOR_ALIGNMENT_BYTES = 256
BLOCK_ALIGNMENT_BYTES = 4096


class Projections(str, enum.Enum):
    """Whether gate and up are one fused matrix (transformers >= 5, SGLang w13) or two."""

    FUSED = "fused"  # gate_up [2I, H], down [H, I]
    SEPARATE = "separate"  # gate [I, H], up [I, H], down [H, I]


PROJECTION_NAMES = {
    Projections.FUSED: ("gate_up", "down"),
    Projections.SEPARATE: ("gate", "up", "down"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor inside a packed block."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset_bytes: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    """The byte layout shared by every expert of a store (all experts of a model have one shape)."""

    tensors: tuple[TensorSpec, ...]
    block_bytes: int

    @classmethod
    def build(cls, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> ExpertLayout:
        """Lay out ``(name, shape, dtype)`` tensors in order, each aligned, the block padded."""
        tensors, offset = [], 0
        for name, shape, dtype in specs:
            offset = _align(offset, TENSOR_ALIGNMENT_BYTES)
            spec = TensorSpec(name, tuple(int(s) for s in shape), dtype, offset)
            tensors.append(spec)
            offset += spec.nbytes
        names = [t.name for t in tensors]
        if not tensors or len(set(names)) != len(names):
            raise ConfigError(f"expert layout: needs at least one tensor and unique names, got {names}")
        return cls(tuple(tensors), _align(offset, BLOCK_ALIGNMENT_BYTES))

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> ExpertLayout:
        """The layout that packs these tensors (in mapping order)."""
        return cls.build((name, tuple(t.shape), t.dtype) for name, t in tensors.items())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights per expert, without alignment padding."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def projections(self) -> Projections:
        """Which projection set this layout holds; raises ConfigError when it is neither."""
        weights = {n for n in self.names if not n.endswith("_scale")}
        for kind, names in PROJECTION_NAMES.items():
            if weights == set(names):
                return kind
        raise ConfigError(
            f"expert layout: weight tensors {sorted(weights)} are neither {list(PROJECTION_NAMES[Projections.FUSED])} "
            f"nor {list(PROJECTION_NAMES[Projections.SEPARATE])}"
        )

    @property
    def quantized(self) -> bool:
        return any(n.endswith("_scale") for n in self.names)

    def spec(self, name: str) -> TensorSpec:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise ConfigError(f"expert layout: no tensor {name!r}; this layout has {list(self.names)}")

    def views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensor views into one packed ``block`` (uint8, ``block_bytes`` long), no copy."""
        self._check_block(block)
        return {
            t.name: block.narrow(0, t.offset_bytes, t.nbytes).view(t.dtype).view(t.shape) for t in self.tensors
        }

    def pack_into(self, tensors: Mapping[str, torch.Tensor], block: torch.Tensor) -> None:
        """Copy ``tensors`` (any device) into ``block``; names, shapes and dtypes must match exactly."""
        missing = sorted(set(self.names) - set(tensors))
        extra = sorted(set(tensors) - set(self.names))
        if missing or extra:
            raise ConfigError(
                f"expert layout: cannot pack tensors {sorted(tensors)}: missing {missing}, unexpected {extra}; "
                f"this layout holds {list(self.names)}"
            )
        views = self.views(block)
        for spec in self.tensors:
            source = tensors[spec.name]
            if tuple(source.shape) != spec.shape or source.dtype != spec.dtype:
                raise ConfigError(
                    f"expert layout: tensor {spec.name!r} is {tuple(source.shape)} {source.dtype}, but this layout "
                    f"packs {spec.shape} {spec.dtype}; every expert of a store must have the same shapes and dtypes"
                )
            views[spec.name].copy_(source)

    def describe(self) -> str:
        parts = ", ".join(f"{t.name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in self.tensors)
        return f"{parts} ({self.block_bytes} bytes per expert)"

    def _check_block(self, block: torch.Tensor) -> None:
        if block.dtype != torch.uint8 or block.dim() != 1 or block.numel() != self.block_bytes:
            raise ConfigError(
                f"expert layout: a block must be a 1-D uint8 tensor of {self.block_bytes} bytes, got "
                f"{tuple(block.shape)} {block.dtype}"
            )


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
