"""EngramModule: identical output from a host-tier or a resident table, causal conv, decode state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiermem.engram import (
    EngramHashConfig,
    EngramLookup,
    EngramLookupConfig,
    EngramModule,
    EngramModuleConfig,
    EngramTable,
    GatherMethod,
    NgramHasher,
    RowFormat,
    TableLayout,
)
from tiermem.errors import ConfigError

HIDDEN = 32
ROW_DIM = 8
HASH = EngramHashConfig(vocab_size=200, layer_ids=(1,), rows_per_head=(53, 59), heads_per_order=4)
MODULE = EngramModuleConfig(hidden_size=HIDDEN, num_heads=HASH.heads_per_layer, row_dim=ROW_DIM)
BATCH = 3
STEPS = 12


def make_module(config: EngramModuleConfig = MODULE) -> EngramModule:
    torch.manual_seed(0)
    module = EngramModule(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5)
    return module.eval()


@pytest.mark.parametrize("row_format", list(RowFormat))
def test_module_output_is_identical_with_host_tier_and_resident_tables(manager, row_format):
    hasher = NgramHasher(HASH)
    layout = TableLayout(hasher.rows_for_layer(1), ROW_DIM if row_format is RowFormat.BF16 else 4 * ROW_DIM,
                         row_format)
    module = make_module(EngramModuleConfig(hidden_size=HIDDEN, num_heads=HASH.heads_per_layer,
                                            row_dim=layout.row_dim))
    resident = EngramTable.filled(layout, seed=9)
    hosted = resident.copy_to(manager.empty((layout.num_rows, layout.row_bytes), tier="cxl"))
    ids = torch.randint(0, HASH.vocab_size, (BATCH, STEPS))
    hidden = torch.randn(BATCH, STEPS, HIDDEN)
    staged = EngramLookupConfig(method=GatherMethod.STAGED)
    with EngramLookup(hasher, {1: resident}, out_dtype=torch.float32) as near, \
            EngramLookup(hasher, {1: hosted}, staged, out_dtype=torch.float32) as far, torch.no_grad():
        near_rows, far_rows = near.submit(ids, STEPS)[1].wait(), far.submit(ids, STEPS)[1].wait()
        expected, got = module(hidden, near_rows), module(hidden, far_rows)
    assert torch.equal(got, expected)
    assert not torch.equal(got, hidden)  # the block did add something


def test_decoding_with_conv_state_matches_the_prefill_output():
    module = make_module()
    hidden = torch.randn(BATCH, STEPS, HIDDEN)
    rows = torch.randn(BATCH, STEPS, HASH.heads_per_layer, ROW_DIM)
    with torch.no_grad():
        prefill = module(hidden, rows)
        state = module.new_conv_state(BATCH)
        steps = [module(hidden[:, t:t + 1], rows[:, t:t + 1], state) for t in range(STEPS)]
    torch.testing.assert_close(torch.cat(steps, dim=1), prefill, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_with_conv_state_matches_one_prefill():
    module = make_module()
    hidden = torch.randn(BATCH, STEPS, HIDDEN)
    rows = torch.randn(BATCH, STEPS, HASH.heads_per_layer, ROW_DIM)
    with torch.no_grad():
        whole = module(hidden, rows)
        state = module.new_conv_state(BATCH)
        chunks = [module(hidden[:, s:s + 5], rows[:, s:s + 5], state) for s in range(0, STEPS, 5)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_output_never_depends_on_later_tokens():
    module = make_module()
    hidden = torch.randn(1, STEPS, HIDDEN)
    rows = torch.randn(1, STEPS, HASH.heads_per_layer, ROW_DIM)
    changed = rows.clone()
    changed[:, STEPS // 2:] += 1.0
    with torch.no_grad():
        before, after = module(hidden, rows), module(hidden, changed)
    assert torch.equal(before[:, :STEPS // 2], after[:, :STEPS // 2])
    assert not torch.equal(before[:, STEPS // 2:], after[:, STEPS // 2:])


def test_short_conv_equals_the_demos_symmetric_padding_then_truncation():
    module = make_module(EngramModuleConfig(hidden_size=HIDDEN, num_heads=4, row_dim=ROW_DIM, hc_mult=2))
    conv = module.short_conv
    x = torch.randn(BATCH, STEPS, 2, HIDDEN)
    demo = nn.Conv1d(2 * HIDDEN, 2 * HIDDEN, 4, groups=2 * HIDDEN, bias=False, padding=9, dilation=3)
    demo.weight = conv.conv.weight
    with torch.no_grad():
        normed = torch.cat([conv.norms[g](x[:, :, g]) for g in range(2)], dim=-1)
        expected = torch.nn.functional.silu(demo(normed.transpose(1, 2))[..., :STEPS]).transpose(1, 2)
        got = conv(x).reshape(BATCH, STEPS, -1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_hyper_connection_groups_keep_their_shape():
    module = make_module(EngramModuleConfig(hidden_size=HIDDEN, num_heads=4, row_dim=ROW_DIM, hc_mult=4))
    hidden = torch.randn(BATCH, 2, 4, HIDDEN)
    with torch.no_grad():
        assert module(hidden, torch.randn(BATCH, 2, 4, ROW_DIM)).shape == hidden.shape


def test_mismatched_shapes_and_bad_config_raise():
    module = make_module()
    with pytest.raises(ConfigError, match="do not match"):
        module(torch.randn(1, 2, HIDDEN), torch.randn(1, 2, 3, ROW_DIM))
    with pytest.raises(ConfigError):
        EngramModuleConfig(hidden_size=0, num_heads=1, row_dim=1)
