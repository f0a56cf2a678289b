"""EngramTable: row formats, safetensors round trips, fp8 scales, pattern fill and refusals."""

from __future__ import annotations

import pytest
import torch

from tiermem.engram.table import EngramTable, RowFormat, TableLayout, decode_rows, encode_rows
from tiermem.errors import ConfigError, TransferError

save_file = pytest.importorskip("safetensors.torch").save_file

ROWS = 257
DIM = 80
FP8_DIM = 256
FP8_RELATIVE_ERROR = 2 ** -3  # e4m3 keeps 3 mantissa bits: rounding error <= 1/16 of the row's amax, doubled


def random_values(rows: int = ROWS, dim: int = DIM) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))


def test_row_sizes_match_engram_27b_and_v4_like_rows():
    assert TableLayout(10, DIM, RowFormat.BF16).row_bytes == 160
    assert TableLayout(10, FP8_DIM, RowFormat.FP8_E4M3).row_bytes == 264
    assert TableLayout(10, 5, RowFormat.FP8_E4M3).row_bytes == 16


@pytest.mark.parametrize("row_format", list(RowFormat))
def test_safetensors_round_trip_is_exact(tmp_path, row_format):
    table = EngramTable.from_values(random_values(), row_format)
    table.save_safetensors(tmp_path / "t.safetensors")
    loaded = EngramTable.from_safetensors(tmp_path / "t.safetensors")
    assert loaded.layout == table.layout
    assert torch.equal(loaded.storage, table.storage)


def test_safetensors_loads_into_caller_storage_with_custom_keys(tmp_path):
    values = random_values()
    save_file({"layers.2.engram.weight": values.to(torch.bfloat16)}, str(tmp_path / "ckpt.safetensors"))
    storage = torch.empty(ROWS, DIM, dtype=torch.bfloat16)
    table = EngramTable.from_safetensors(tmp_path / "ckpt.safetensors", weight_key="layers.2.engram.weight",
                                         storage=storage)
    assert table.storage.data_ptr() == storage.data_ptr()
    assert torch.equal(storage, values.to(torch.bfloat16))


def test_fp8_rows_keep_their_scales_through_quantisation_and_files(tmp_path):
    values = random_values(dim=FP8_DIM) * torch.logspace(-3, 3, ROWS)[:, None]  # rows of very different size
    table = EngramTable.from_values(values, RowFormat.FP8_E4M3)
    table.save_safetensors(tmp_path / "q.safetensors", scale_key="weight_scale")
    loaded = EngramTable.from_safetensors(tmp_path / "q.safetensors", scale_key="weight_scale")
    restored = loaded.read_rows(torch.arange(ROWS), torch.float32)
    amax = values.abs().amax(dim=1, keepdim=True)
    assert bool(((restored - values).abs() <= FP8_RELATIVE_ERROR * amax).all())
    assert torch.equal(loaded.storage, table.storage)


def test_bf16_file_can_be_loaded_as_fp8_rows(tmp_path):
    EngramTable.from_values(random_values(dim=FP8_DIM), RowFormat.BF16).save_safetensors(tmp_path / "b.safetensors")
    table = EngramTable.from_safetensors(tmp_path / "b.safetensors", row_format=RowFormat.FP8_E4M3)
    assert table.layout.row_format is RowFormat.FP8_E4M3 and table.layout.row_bytes == 264


def test_pattern_fill_is_deterministic_distinct_and_device_independent():
    layout = TableLayout(ROWS, DIM, RowFormat.BF16)
    first = EngramTable.filled(layout, seed=1)
    again = EngramTable.filled(layout, seed=1)
    other = EngramTable.filled(layout, seed=2)
    assert torch.equal(first.storage, again.storage) and not torch.equal(first.storage, other.storage)
    assert torch.unique(first.storage, dim=0).shape[0] == ROWS  # no two rows alike: wrong-row gathers show
    values = first.read_rows(torch.arange(ROWS), torch.float32)
    assert float(values.abs().max()) <= 1.0 and float(values.std()) > 0.3


def test_encode_then_decode_bf16_is_the_bf16_cast():
    values = random_values()
    layout = TableLayout(ROWS, DIM, RowFormat.BF16)
    assert torch.equal(decode_rows(encode_rows(values, layout), layout), values.to(torch.bfloat16))


def test_copy_to_another_tensor_keeps_every_byte():
    table = EngramTable.filled(TableLayout(ROWS, FP8_DIM, RowFormat.FP8_E4M3), seed=3)
    copy = table.copy_to(torch.empty(ROWS, 264, dtype=torch.uint8))
    assert torch.equal(copy.storage, table.storage)


def test_storage_of_the_wrong_size_is_refused():
    with pytest.raises(ConfigError, match="257 rows x 160 bytes"):
        EngramTable(torch.empty(ROWS, DIM, dtype=torch.float32), TableLayout(ROWS, DIM))
    with pytest.raises(ConfigError, match="contiguous"):
        EngramTable(torch.empty(DIM, ROWS, dtype=torch.bfloat16).t(), TableLayout(ROWS, DIM))


def test_out_of_range_rows_are_refused():
    table = EngramTable.filled(TableLayout(ROWS, DIM))
    with pytest.raises(TransferError, match=r"got \[0, 257\]"):
        table.read_rows(torch.tensor([0, ROWS]))
    with pytest.raises(TransferError, match="out of range"):
        table.read_rows(torch.tensor([-1]))


def test_missing_tensor_in_file_names_what_the_file_has(tmp_path):
    save_file({"other": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match="other"):
        EngramTable.from_safetensors(tmp_path / "x.safetensors")
