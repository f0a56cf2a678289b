"""The device pager inside ``tiermem.offload``: bit-identical logits, honest counters, clear refusals.

CPU tests run the pager's tensor operations and the copier's CPU path; the GPU tests run the Triton
copy kernel and the CUDA-graph replays, against transformers' ``grouped_mm`` experts all-resident.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiermem.errors import ConfigError
from tiermem.experts import offload
from tiermem.experts.device_layer import DevicePagedLayers
from tiermem.experts.runtime import ExpertCompute, OffloadConfig, Pager
from tiermem.manager import ManagerConfig, TierManager
from tiermem.residency.device_pager import DevicePager
from tiermem.residency.slots import SlotLayout
from tiermem.transfer.uva_copy import BlockCopier

from .test_experts_moe import FirstExperts, _offloaded_logits, _qwen3_on_gpu, _tiny_transformers_models


def _tiny_qwen3(seed: int) -> tuple[torch.nn.Module, int]:
    models, common = _tiny_transformers_models()  # 8 experts, top-2, 2 layers
    config_cls, model_cls, extra = models["qwen3_moe"]
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**{**common, **extra}), experts_implementation="grouped_mm").eval()
    return model, common["vocab_size"]


def _check_bit_identical(model: torch.nn.Module, prompts: list[torch.Tensor], config: dict, predictor=None,
                         inspect=lambda handle: None) -> dict:
    """Assert that the offloaded model's logits equal the resident model's on ``prompts``; returns its stats."""
    expected, got, stats = _offloaded_logits(model, prompts, config, predictor, inspect)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    return stats


@pytest.mark.parametrize("config", [
    {"resident_fraction": 0.5, "pager": "device"},
    {"resident_fraction": 0.5, "pager": "device", "policy": "lfu"},
    {"resident_fraction": 0.25, "pager": "device", "slot_layout": "shared"},
])
def test_device_paged_logits_are_bit_identical_to_the_resident_model(config):
    model, vocab = _tiny_qwen3(seed=5)
    prompts = [torch.randint(0, vocab, (batch, 1)) for batch in (1, 2, 1, 1, 2, 1, 2, 2, 1)]
    stats = _check_bit_identical(model, prompts, config)
    pairs = 2 * sum(ids.shape[0] for ids in prompts) * 2  # top-2, 2 layers
    assert stats["pager"] == "device" and stats["demands"] <= pairs
    assert stats["misses"] > 0 and 0.0 < stats["hit_rate"] < 1.0 and stats["hits"] + stats["misses"] == stats["demands"]
    assert stats["bytes_by_tier"]["dram"] == stats["demand_bytes"] == stats["misses"] * stats["expert_bytes"]
    assert stats["stall_s"] is None and stats["prefetch_loads"] == 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_every_supported_architecture_decodes_bit_identically_on_the_device_pager(arch):
    models, common = _tiny_transformers_models()  # shared experts (Qwen2-MoE, DeepSeek), a dense first layer
    config_cls, model_cls, extra = models[arch]
    torch.manual_seed(11)
    model = model_cls._from_config(config_cls(**{**common, **extra}), experts_implementation="grouped_mm").eval()
    prompts = [torch.randint(0, common["vocab_size"], shape) for shape in ((2, 4), (1, 1), (2, 1), (1, 1), (1, 1))]
    stats = _check_bit_identical(model, prompts, {"resident_fraction": 0.5, "pager": "device"})
    assert stats["pager"] == "device" and stats["misses"] > 0


@pytest.mark.parametrize("config", [
    {"resident_fraction": 0.5, "pager": "device"},
    {"resident_fraction": 0.25, "pager": "device", "slot_layout": "shared", "policy": "lfu"},
])
def test_layers_with_more_pairs_than_slots_run_in_waves_and_stay_bit_identical(config):
    vocab = _tiny_qwen3(seed=6)[1]
    prompts = [torch.randint(0, vocab, shape) for shape in ((3, 5), (1, 1), (2, 1), (4, 3), (1, 1), (4, 1))]
    # waves decided on the device (layers of up to 64 tokens; unpipelined) and after reading the routing back (0):
    # the same waves, so the same paging, and both bit-identical to the resident model (a fresh copy of it each time)
    config = {**config, "device_pipelined_waves": False}
    on_device = _check_bit_identical(_tiny_qwen3(seed=6)[0], prompts, config)
    read_back = _check_bit_identical(_tiny_qwen3(seed=6)[0], prompts, {**config, "device_waves_max_tokens": 0})
    for stats in (on_device, read_back):
        assert stats["misses"] > 0 and stats["hits"] > 0 and stats["hits"] + stats["misses"] == stats["demands"]
    counted = ("demands", "hits", "misses")
    assert [on_device[k] for k in counted] == [read_back[k] for k in counted]


@pytest.mark.parametrize("config", [
    {"resident_fraction": 0.5, "pager": "device"},
    {"resident_fraction": 0.5, "pager": "device", "policy": "lfu"},
    {"resident_fraction": 0.25, "pager": "device", "slot_layout": "shared"},
])
def test_pipelined_waves_stay_bit_identical_and_count_every_expert_once(config):
    vocab = _tiny_qwen3(seed=8)[1]  # 2 layers x 8 experts, top-2: 4 slots per layer at 0.5, batches of 3+ in waves
    prompts = [torch.randint(0, vocab, shape) for shape in ((3, 5), (1, 1), (2, 1), (4, 3), (1, 1), (4, 1), (3, 1))]
    pipelined = _check_bit_identical(_tiny_qwen3(seed=8)[0], prompts, config)  # the default
    plain = _check_bit_identical(_tiny_qwen3(seed=8)[0], prompts, {**config, "device_pipelined_waves": False})
    assert pipelined["misses"] > 0 and pipelined["hits"] > 0
    assert pipelined["hits"] + pipelined["misses"] == pipelined["demands"]
    # the waves differ (smaller, and a wave keeps the one before it), the experts each layer needed do not
    assert pipelined["demands"] == plain["demands"]


class StepTable(FirstExperts):
    """A predictor with a step table: after expert i comes expert (i + 1) % 8, at every layer."""

    def __init__(self) -> None:
        self.step = np.roll(np.eye(8, dtype=np.float32), 1, axis=1)[None].repeat(2, axis=0)


def test_predicted_eviction_on_the_device_reads_the_predictors_step_table():
    model, vocab = _tiny_qwen3(seed=10)
    predictor = StepTable()
    tables = []
    stats = _check_bit_identical(model, [torch.randint(0, vocab, (1, 1)) for _ in range(12)],
                                 {"resident_fraction": 0.5, "pager": "device"}, predictor,
                                 inspect=lambda handle: tables.append(handle.runtime._device.pager.scores.cpu()))
    assert stats["policy"] == "predicted" and stats["misses"] > 0
    assert torch.equal(tables[0], torch.from_numpy(predictor.step).mul(1 << 20).to(torch.int64))


@pytest.mark.parametrize("config, predictor, match", [
    ({"pager": "device", "policy": "lru"}, StepTable(), "would ignore the predictor"),
    ({"pager": "device"}, FirstExperts(), "has none; use pager='host'"),
    ({"pager": "device", "slot_layout": "shared"}, StepTable(), "use slot_layout='per_layer'"),
    ({"pager": "device", "compute": "loop"}, None, "computes grouped"),
    ({"pager": "device", "policy": "predicted"}, None, "ranks by predictions; give a predictor"),
    ({"pager": "device", "policy": "lfu", "lfu_half_life_steps": 4.0}, None, "do not decay"),
])
def test_device_pager_refuses_what_it_cannot_do(config, predictor, match):
    model, _ = _tiny_qwen3(seed=7)
    with pytest.raises(ConfigError, match=match):
        offload(model, tier="dram", config={"resident_fraction": 0.5, "prefetch": {"distance": 1}, **config},
                predictor=predictor)


def test_pipelined_waves_need_two_slots_per_group():
    pager = DevicePager(num_groups=1, slots_per_group=1, objects_per_group=4, device="cpu")  # a top-1 model's minimum
    with pytest.raises(ConfigError, match="need at least 2 slots per group .* this cache has 1"):
        DevicePagedLayers(pager, None, [], experts_per_layer=4, per_layer=True, cuda_graphs=False, pipelined=True)


def test_offload_config_built_directly_takes_enum_values_and_refuses_unknown_ones():
    config = OffloadConfig(resident_fraction=0.5, pager="device", slot_layout="shared", compute="grouped")
    assert (config.pager, config.slot_layout, config.compute) == (Pager.DEVICE, SlotLayout.SHARED, ExpertCompute.GROUPED)
    with pytest.raises(ConfigError, match=r"pager must be one of \['host', 'device'\], got 'gpu'"):
        OffloadConfig(resident_fraction=0.5, pager="gpu")
    with pytest.raises(ConfigError, match="device_waves_max_tokens must be >= 0, got -1"):
        OffloadConfig(resident_fraction=0.5, pager="device", device_waves_max_tokens=-1)


def test_device_pager_refuses_homes_whose_tier_hooks_io():
    model, _ = _tiny_qwen3(seed=8)
    manager = TierManager(ManagerConfig.from_dict({"tiers": [
        {"kind": "sim", "name": "sim", "capacity_bytes": 16 << 20, "model_time": True}]}))
    with pytest.raises(ConfigError, match=r"past the I/O hooks of tier\(s\) \['sim'\]"):
        offload(model, tier="sim", manager=manager, config={"resident_fraction": 0.5, "pager": "device"})
    manager.close()


@pytest.mark.parametrize("config", [{"pager": "device"}, {"pager": "host", "compute": "grouped"},
                                    {"pager": "host", "compute": "loop"}])
def test_a_layer_with_no_tokens_returns_no_output_and_pages_nothing(config):
    model, _ = _tiny_qwen3(seed=12)
    handle = offload(model, tier="dram", config={"resident_fraction": 0.5, **config})
    runtime = handle.runtime
    out = runtime.run_layer(runtime.store.layers[0], torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.int64),
                            torch.zeros(0, 2), torch.nn.functional.silu)
    assert out.shape == (0, 32) and runtime.stats()["demands"] == 0
    handle.close()


def test_block_copier_copies_the_listed_blocks_only_and_validates_homes():
    homes = [[torch.full((16,), i, dtype=torch.uint8) for i in range(5)]]
    slots = torch.zeros((3, 16), dtype=torch.uint8)
    copier = BlockCopier(homes, [slots])
    copier.copy(0, torch.tensor([4, 1, 3]), torch.tensor([2, 0, 1]), torch.tensor([2]))
    assert slots[:, 0].tolist() == [1, 0, 4]
    with pytest.raises(ConfigError, match="home 1 of group 0 must be one contiguous"):
        BlockCopier([[homes[0][0], torch.zeros(8, dtype=torch.uint8)]], [slots])
    with pytest.raises(ConfigError, match="multiple of 8 bytes"):
        BlockCopier([[torch.zeros(12, dtype=torch.uint8)]], [torch.zeros((1, 12), dtype=torch.uint8)])


COPY_SCRIPT = r"""
import torch
from tiermem.transfer import uva_copy
uva_copy.BLOCK_WORDS = 4  # several chunks per block, the last one partial
sizes = (72, 40)  # groups of different block sizes (one per weight tensor, as in SGLang's w13 / w2)
homes = [[torch.randint(1, 255, (size,), dtype=torch.uint8) for _ in range(5)] for size in sizes]
slots = [torch.zeros((3, size), dtype=torch.uint8) for size in sizes]
copier = uva_copy.BlockCopier(homes, slots, kernel=True)
for group in (1, 0):
    copier.copy(group, torch.tensor([4, 0, 2]), torch.tensor([2, 0, 1]), torch.tensor([2]))
    assert torch.equal(slots[group][2], homes[group][4]) and torch.equal(slots[group][0], homes[group][0]), "copied"
    assert not slots[group][1].any(), "only the counted blocks"
    assert group == 0 or not slots[0].any(), "only the group's blocks"
print("ok")
"""


def test_the_copy_kernel_moves_the_counted_blocks_in_the_triton_interpreter(run_script):
    run_script(COPY_SCRIPT, interpret=True, timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("pipelined", [False, True])
def test_device_pager_on_the_gpu_is_bit_identical_with_graphs_and_without(pipelined):
    generator = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, shape, generator=generator).cuda() for shape in  # a prefill of 4 x top-4 > 8
               ((1, 4), (1, 1), (2, 1), (1, 1), (3, 1), (2, 1), (1, 1), (3, 1), (2, 1))]  # slots, and batches of 3,
    # run in waves decided on the device: captured with the layer, the second batch of 3 replays them
    counters = []
    for graphs in (True, False):
        model = _qwen3_on_gpu(seed=9)  # 32 experts, top-4: 8 slots per layer at 25%
        stats = _check_bit_identical(model, prompts, {"resident_fraction": 0.25, "pager": "device",
                                                      "cuda_graphs": graphs, "device_pipelined_waves": pipelined})
        assert stats["misses"] > 0 and stats["hits"] > 0
        assert (stats["graph_replays"] > stats["graphs_captured"] > 0) == graphs
        counters.append({k: stats[k] for k in ("demands", "hits", "misses", "demand_bytes")})
    assert counters[0] == counters[1]  # a captured layer's warm-ups count once: the same paging as eager


@pytest.mark.gpu
def test_the_copy_kernel_moves_exactly_the_counted_blocks_from_pinned_homes():
    block = 3 * 65536 + 8  # several chunks, the last one partial
    homes = [[torch.randint(0, 255, (block,), dtype=torch.uint8).pin_memory() for _ in range(6)]]
    slots = torch.zeros((4, block), dtype=torch.uint8, device="cuda")
    copier = BlockCopier(homes, [slots])
    objects, targets = torch.tensor([5, 0, 2, 3], device="cuda"), torch.tensor([1, 3, 0, 2], device="cuda")
    copier.copy(0, objects, targets, torch.tensor([3], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(slots[1].cpu(), homes[0][5]) and torch.equal(slots[3].cpu(), homes[0][0])
    assert torch.equal(slots[0].cpu(), homes[0][2]) and not slots[2].any()
