"""Packing one expert into one block, placement across host tiers, and the store's homes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tiermem.errors import CapacityError, ConfigError
from tiermem.experts.layout import BLOCK_ALIGNMENT_BYTES, TENSOR_ALIGNMENT_BYTES, ExpertLayout, Projections
from tiermem.experts.placement import place_experts
from tiermem.experts.sources import ModuleExperts, expert_tensors
from tiermem.experts.store import ExpertStore

from .conftest import HIDDEN, INTERMEDIATE, NUM_EXPERTS, Mlp


def test_packed_block_round_trips_to_equal_tensors():
    tensors = {"gate_up": torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=torch.bfloat16),
               "down": torch.randn(HIDDEN, INTERMEDIATE, dtype=torch.bfloat16),
               "down_scale": torch.rand(3, dtype=torch.float32)}
    layout = ExpertLayout.of(tensors)
    block = torch.zeros(layout.block_bytes, dtype=torch.uint8)
    layout.pack_into(tensors, block)
    views = layout.views(block)
    assert all(torch.equal(views[name], tensors[name]) for name in tensors)
    assert views["down"].data_ptr() == block.data_ptr() + layout.spec("down").offset_bytes
    assert layout.block_bytes % BLOCK_ALIGNMENT_BYTES == 0
    assert all(t.offset_bytes % TENSOR_ALIGNMENT_BYTES == 0 for t in layout.tensors)
    assert layout.projections is Projections.FUSED and layout.quantized


def test_packing_a_tensor_of_another_shape_names_it():
    layout = ExpertLayout.build([("gate", (4, 4), torch.float32), ("up", (4, 4), torch.float32),
                                 ("down", (4, 4), torch.float32)])
    block = torch.zeros(layout.block_bytes, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="'up' is \\(4, 5\\)"):
        layout.pack_into({"gate": torch.ones(4, 4), "up": torch.ones(4, 5), "down": torch.ones(4, 4)}, block)


def test_placement_puts_the_hottest_experts_on_the_faster_tier():
    popularity = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.05]])
    placement = place_experts([("dram", 3 * 100), ("cxl", 10 * 100)], num_layers=2, num_experts=3,
                              block_bytes=100, popularity=popularity)
    assert placement.experts_on("dram") == 3 and placement.experts_on("cxl") == 3
    on_dram = {(layer, e) for layer in range(2) for e in range(3) if placement.tier_of(layer, e) == "dram"}
    assert on_dram == {(0, 1), (1, 0), (0, 2)}


def test_placement_that_does_not_fit_says_how_many_bytes_are_needed():
    with pytest.raises(CapacityError, match="need .*600 bytes"):
        place_experts([("dram", 200), ("cxl", 200)], num_layers=2, num_experts=3, block_bytes=100)


def test_store_from_fused_and_listed_modules_reads_back_every_expert(manager, fused_experts):
    torch.manual_seed(1)
    listed = nn.ModuleList([Mlp(("w1", "w3", "w2")) for _ in range(NUM_EXPERTS)])
    for module, layout in ((fused_experts, Projections.FUSED), (listed, Projections.SEPARATE)):
        source = ModuleExperts({3: module, 7: module})
        store = ExpertStore.from_source(manager, source, tier="sim")
        assert store.layout.projections is layout and store.layers == (3, 7)
        _, expected = expert_tensors(module)
        for layer in (3, 7):
            for expert in range(NUM_EXPERTS):
                got = store.read(layer, expert)
                assert all(torch.equal(got[name], expected[expert][name]) for name in got)
                assert manager.tier_of(store.home(store.key(layer, expert))).name == "sim"
        store.close()
        store.close()  # idempotent


def test_store_placement_uses_both_tiers(manager, fused_experts):
    source = ModuleExperts({0: fused_experts})
    block = source.layout.block_bytes
    placement = place_experts([("dram", 2 * block), ("cxl", 8 * block)], num_layers=1, num_experts=NUM_EXPERTS,
                              block_bytes=block, popularity=np.arange(NUM_EXPERTS)[None, :])
    store = ExpertStore.from_source(manager, source, placement=placement)
    assert [store.tier_of(store.key(0, e)) for e in range(NUM_EXPERTS)] == ["cxl"] * 4 + ["dram"] * 2
    assert torch.equal(store.read(0, 5)["down"], fused_experts.down_proj.data[5])
    store.close()


def test_unknown_experts_module_names_what_it_holds():
    with pytest.raises(ConfigError, match="cannot read experts from Linear"):
        expert_tensors(nn.Linear(2, 2))
