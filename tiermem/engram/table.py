"""One Engram layer's flat row table, stored as raw row bytes in a tensor on any tier.

Row formats (``RowFormat``):
- ``bf16``: ``row_dim`` bfloat16 values, ``2 * row_dim`` bytes;
- ``fp8_e4m3``: a float32 scale, then ``row_dim`` float8_e4m3fn values, padded to a multiple of
  8 bytes (``row_dim=256`` -> 264 bytes). A row is one contiguous read, scale included.

Invariants: ``storage`` is a ``[num_rows, row_bytes]`` uint8 view of the caller's tensor (host
memory of a tier, or HBM); a table is written only by its constructors (``from_values``,
``filled``, ``from_safetensors``, ``copy_to``) and is read-only afterwards, which is what lets
lookups run on a side stream without locks. Big tables are never filled with CPU random numbers:
``filled`` hashes row and column ids, chunk by chunk, on any device.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch

from tiermem.config import format_bytes, option, require
from tiermem.errors import ConfigError, TransferError

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError:  # only table file I/O needs it; lookups and the bench run without it
    safe_open = save_file = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4
ROW_ALIGN_BYTES = 8
_CHUNK_ELEMENTS = 1 << 24  # elements per chunk when filling or loading
_MASK32 = 0xFFFFFFFF


class RowFormat(str, enum.Enum):
    """How one row's values are stored."""

    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"


@dataclass(frozen=True)
class TableLayout:
    """Shape and format of one layer's flat table."""

    num_rows: int = option(help="rows of the layer's flat table (sum of its heads' primes)")
    row_dim: int = option(help="values per row (the demo's n_embed_per_ngram // n_head_per_ngram)")
    row_format: RowFormat = option(RowFormat.BF16, help="bf16, or fp8_e4m3 with a float32 scale per row")

    def __post_init__(self) -> None:
        require(self.num_rows >= 1, self, f"num_rows must be >= 1, got {self.num_rows}")
        require(self.row_dim >= 1, self, f"row_dim must be >= 1, got {self.row_dim}")

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row, scale and padding included."""
        if self.row_format is RowFormat.BF16:
            return 2 * self.row_dim
        unpadded = SCALE_BYTES + self.row_dim
        return -(-unpadded // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes


def encode_rows(values: torch.Tensor, layout: TableLayout) -> torch.Tensor:
    """Float ``[n, row_dim]`` -> stored bytes ``[n, row_bytes]`` (fp8: per-row scale = amax / 448)."""
    if layout.row_format is RowFormat.BF16:
        return values.to(torch.bfloat16).contiguous().view(torch.uint8)
    values = values.float()
    scale = (values.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    quantised = (values / scale[:, None]).to(torch.float8_e4m3fn)
    return pack_fp8(quantised, scale, layout)


def pack_fp8(data: torch.Tensor, scale: torch.Tensor, layout: TableLayout) -> torch.Tensor:
    """float8_e4m3fn ``[n, row_dim]`` and float32 ``[n]`` scales -> stored bytes ``[n, row_bytes]``."""
    rows = torch.zeros(data.shape[0], layout.row_bytes, dtype=torch.uint8, device=data.device)
    rows[:, :SCALE_BYTES] = scale.to(torch.float32).contiguous().view(torch.uint8).view(-1, SCALE_BYTES)
    rows[:, SCALE_BYTES:SCALE_BYTES + layout.row_dim] = data.contiguous().view(torch.uint8)
    return rows


def unpack_fp8(rows: torch.Tensor, layout: TableLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored bytes ``[n, row_bytes]`` -> (float8 ``[n, row_dim]`` view, float32 ``[n, 1]`` view)."""
    data = rows[:, SCALE_BYTES:SCALE_BYTES + layout.row_dim].view(torch.float8_e4m3fn)
    return data, rows[:, :SCALE_BYTES].view(torch.float32)


def decode_rows(rows: torch.Tensor, layout: TableLayout, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Stored bytes ``[n, row_bytes]`` -> values ``[n, row_dim]`` in ``dtype`` (bf16 rows: a view)."""
    if layout.row_format is RowFormat.BF16:
        return rows.view(torch.bfloat16).to(dtype)
    data, scale = unpack_fp8(rows, layout)
    return (data.to(torch.float32) * scale).to(dtype)


def pattern_values(first_row: int, num_rows: int, row_dim: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Deterministic float32 values in [-1, 1) for rows ``first_row ..``: a hash of (seed, row, column)."""
    rows = torch.arange(first_row, first_row + num_rows, device=device, dtype=torch.int64)
    cols = torch.arange(row_dim, device=device, dtype=torch.int64)
    row_hash = _hash32((rows ^ (seed * 0x9E3779B9)) & _MASK32)
    mixed = _hash32((row_hash[:, None] + cols[None, :] * 0x632BE5AB) & _MASK32)
    return ((mixed & 0xFFFF).to(torch.float32) - 32768.0) / 32768.0


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors whose products never overflow int64."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


class EngramTable:
    """The rows of one Engram layer in a caller-provided tensor (host memory of a tier, or HBM)."""

    def __init__(self, storage: torch.Tensor, layout: TableLayout, *, name: str = "engram") -> None:
        self.layout = layout
        self.name = name
        self.storage = self._as_row_bytes(storage, layout, name)

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def is_pinned(self) -> bool:
        """True when the rows are host memory registered for GPU DMA (page-locked)."""
        return self.device.type == "cpu" and torch.cuda.is_available() and self.storage.is_pinned()

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise TransferError if a (host) index is outside ``[0, num_rows)``; device indices are trusted."""
        if indices.device.type != "cpu" or indices.numel() == 0:
            return
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.layout.num_rows:
            raise TransferError(f"engram table {self.name!r}: row index out of range: got [{low}, {high}], the "
                                f"table has {self.layout.num_rows} rows; indices must come from the hasher "
                                f"whose layer this table belongs to")

    def read_rows(self, indices: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Decoded rows ``[*indices.shape, row_dim]`` (plain index_select; the reference for lookups)."""
        self.check_indices(indices)
        flat = indices.reshape(-1).to(self.device)
        rows = decode_rows(self.storage.index_select(0, flat), self.layout, dtype)
        return rows.view(*indices.shape, self.layout.row_dim)

    def copy_to(self, storage: torch.Tensor, *, name: str | None = None) -> EngramTable:
        """A copy of this table in another tensor (e.g. resident in HBM), one bulk copy."""
        target = EngramTable(storage, self.layout, name=name or self.name)
        target.storage.copy_(self.storage)
        return target

    @classmethod
    def from_values(cls, values: torch.Tensor, row_format: RowFormat, *, storage: torch.Tensor | None = None,
                    name: str = "engram") -> EngramTable:
        """Encode float ``[num_rows, row_dim]`` values into ``storage`` (default: new host memory)."""
        layout = TableLayout(values.shape[0], values.shape[1], row_format)
        table = cls(_storage_or_new(storage, layout), layout, name=name)
        for first, last in _chunks(layout):
            table.storage[first:last].copy_(encode_rows(values[first:last], layout))
        return table

    @classmethod
    def filled(cls, layout: TableLayout, *, storage: torch.Tensor | None = None, seed: int = 0,
               work_device: torch.device | str = "cpu", name: str = "engram") -> EngramTable:
        """A table of deterministic pattern rows (no random numbers), generated on ``work_device``."""
        table = cls(_storage_or_new(storage, layout), layout, name=name)
        for first, last in _chunks(layout):
            values = pattern_values(first, last - first, layout.row_dim, seed, work_device)
            table.storage[first:last].copy_(encode_rows(values, layout))
        return table

    @classmethod
    def from_safetensors(cls, path: str | Path, *, weight_key: str = "weight", scale_key: str = "scale",
                         row_format: RowFormat | None = None, storage: torch.Tensor | None = None,
                         name: str = "engram") -> EngramTable:
        """Load ``weight_key`` ``[num_rows, row_dim]`` (bf16/f16/f32, or fp8 with ``scale_key`` ``[num_rows]``).

        The file is streamed chunk by chunk into ``storage``; ``row_format=None`` keeps the file's
        format (fp8 bytes are copied exactly), otherwise values are re-encoded.
        """
        _require_safetensors()
        with safe_open(str(path), framework="pt") as file:
            keys = set(file.keys())
            if weight_key not in keys:
                raise ConfigError(f"engram table: {str(path)!r} has no tensor {weight_key!r}; it has "
                                  f"{sorted(keys)[:8]}; pass weight_key=")
            weight = file.get_slice(weight_key)
            shape, file_dtype = weight.get_shape(), weight.get_dtype()
            is_fp8 = file_dtype == "F8_E4M3"
            if len(shape) != 2 or (is_fp8 and scale_key not in keys) or file_dtype not in ("BF16", "F16", "F32", "F8_E4M3"):
                raise ConfigError(f"engram table: {weight_key!r} in {str(path)!r} must be a 2-D bf16/f16/f32 "
                                  f"tensor, or F8_E4M3 with a {scale_key!r} tensor; got {file_dtype} {shape}")
            source = TableLayout(shape[0], shape[1], RowFormat.FP8_E4M3 if is_fp8 else RowFormat.BF16)
            layout = TableLayout(shape[0], shape[1], row_format or source.row_format)
            table = cls(_storage_or_new(storage, layout), layout, name=name)
            scales = file.get_slice(scale_key) if is_fp8 else None
            for first, last in _chunks(layout):
                if scales is None:
                    rows = encode_rows(weight[first:last], layout)
                elif layout.row_format is RowFormat.FP8_E4M3:
                    rows = pack_fp8(weight[first:last], scales[first:last].reshape(-1), layout)
                else:
                    packed = pack_fp8(weight[first:last], scales[first:last].reshape(-1), source)
                    rows = encode_rows(decode_rows(packed, source, torch.float32), layout)
                table.storage[first:last].copy_(rows)
        return table

    def save_safetensors(self, path: str | Path, *, weight_key: str = "weight", scale_key: str = "scale") -> None:
        """Write the table as ``weight_key`` (bf16 or fp8) plus, for fp8, ``scale_key`` float32 ``[num_rows]``."""
        _require_safetensors()
        rows = self.storage.cpu()
        if self.layout.row_format is RowFormat.BF16:
            tensors = {weight_key: rows.view(torch.bfloat16).contiguous()}
        else:
            data, scale = unpack_fp8(rows, self.layout)
            tensors = {weight_key: data.contiguous(), scale_key: scale.reshape(-1).contiguous()}
        save_file(tensors, str(path), metadata={"row_format": self.layout.row_format.value})

    @staticmethod
    def _as_row_bytes(storage: torch.Tensor, layout: TableLayout, name: str) -> torch.Tensor:
        expected = (layout.num_rows, layout.row_bytes)
        fits = (storage.dim() == 2 and storage.shape[0] == layout.num_rows and storage.is_contiguous()
                and storage.numel() * storage.element_size() == layout.nbytes)
        if not fits:
            raise ConfigError(f"engram table {name!r}: storage must be a contiguous 2-D tensor of "
                              f"{layout.num_rows} rows x {layout.row_bytes} bytes ({format_bytes(layout.nbytes)}, "
                              f"{layout.row_format.value} rows of {layout.row_dim}); got {storage.dtype} "
                              f"{tuple(storage.shape)}; allocate uint8 {expected} from the tier")
        return storage.view(torch.uint8).view(expected)


def _require_safetensors() -> None:
    if safe_open is None:
        raise ConfigError("engram table: reading or writing table files needs the 'safetensors' package; "
                          "pip install safetensors")


def _storage_or_new(storage: torch.Tensor | None, layout: TableLayout) -> torch.Tensor:
    if storage is not None:
        return storage
    return torch.empty(layout.num_rows, layout.row_bytes, dtype=torch.uint8)


def _chunks(layout: TableLayout) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // layout.row_dim)
    return [(first, min(first + step, layout.num_rows)) for first in range(0, layout.num_rows, step)]
