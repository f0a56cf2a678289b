"""Shapes of real MoE models and declared hardware profiles, for the cost model and capacity planning.

Model shapes come from the models' published configs (hidden size, routed-expert intermediate size,
routed experts per layer, top-k, layer counts) and total parameter counts. One routed expert is
gate + up + down = ``3 * hidden * intermediate`` weights; everything else (attention, embeddings,
shared experts, dense layers) is the remainder of the published total. Weights are bf16.

Hardware figures are labelled: ``measured`` where FACTS.md records a measurement on the lent H100,
declared otherwise (published device figures). Nothing here is emulated.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiermem.errors import ConfigError
from tiermem.simulate.cost import HostCost
from tiermem.types import LinkProfile

BF16_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    """The parts of a model's config that decide expert traffic."""

    name: str
    hidden_size: int
    expert_intermediate_size: int  # of one routed expert
    num_experts: int  # routed experts per MoE layer
    top_k: int
    num_layers: int
    num_moe_layers: int
    total_params: float  # published total, all weights
    hf_id: str

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size * BF16_BYTES

    @property
    def routed_expert_bytes(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_bytes

    @property
    def dense_bytes(self) -> int:
        """Every weight that is not a routed expert (stays in HBM)."""
        return int(self.total_params * BF16_BYTES) - self.routed_expert_bytes


MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, 24, 24, 14.3e9, "Qwen/Qwen1.5-MoE-A2.7B"),
    ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8, 48, 48, 30.5e9, "Qwen/Qwen3-30B-A3B"),
    ModelShape("mixtral-8x7b", 4096, 14336, 8, 2, 32, 32, 46.7e9, "mistralai/Mixtral-8x7B-v0.1"),
    ModelShape("deepseek-v2-lite", 2048, 1408, 64, 6, 27, 26, 15.7e9, "deepseek-ai/DeepSeek-V2-Lite"),
    ModelShape("deepseek-v3", 7168, 2048, 256, 8, 61, 58, 671e9, "deepseek-ai/DeepSeek-V3"),
)}


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ConfigError(f"simulate: unknown model {name!r}; known models: {sorted(MODELS)}") from None


def model_for_trace(num_experts: int, top_k: int) -> ModelShape | None:
    """The one known model with this routing shape, or None when there is none or several."""
    found = [m for m in MODELS.values() if (m.num_experts, m.top_k) == (num_experts, top_k)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class GpuProfile:
    """What bounds decode compute: HBM size and bandwidth (decode at small batch is memory-bound)."""

    name: str
    hbm_bytes: int
    hbm_bandwidth_gbps: float
    note: str

    def read_us(self, nbytes: float) -> float:
        """Microseconds to stream ``nbytes`` of weights from HBM once."""
        return nbytes / (self.hbm_bandwidth_gbps * 1e9) * 1e6


GPUS: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", 80 * 2**30, 3000.0,
                       "lent H100: 3.0 TB/s device-to-device measured (FACTS.md), 80 GiB"),
    "h200": GpuProfile("h200", 141 * 10**9, 4800.0, "declared: spec sheet, 141 GB HBM3e at 4.8 TB/s"),
}

# Host tier -> GPU paths. dram: pinned H2D on the lent H100 (PCIe Gen5 x16), 88 MB expert copies
# 54.7 GB/s, ~10-20 us per copy (FACTS.md). cxl: GPU DMA from a CXL expander, 26 GB/s in a
# published study, plus ~250 ns device latency (declared; no CXL hardware was available).
HOST_LINKS: dict[str, LinkProfile] = {
    "dram": LinkProfile(bandwidth_gbps=54.7, latency_us=10.0, measured=True),
    "cxl": LinkProfile(bandwidth_gbps=26.0, latency_us=10.25),
}


@dataclass(frozen=True)
class PagerProfile:
    """What paging costs per traced layer besides the copies' link time: the pager's host time, the GPU time it
    spends deciding, and the share of the link's bandwidth its copies reach; and whether it can prefetch."""

    host: HostCost = HostCost()
    gpu_page_us: float = 0.0  # GPU time per layer spent deciding residency, before the layer's copies
    copy_efficiency: float = 1.0  # its copies' bandwidth / the link's (copy engines: 1)
    prefetches: bool = True


# ideal: a host that keeps ahead of the GPU (the link and compute clocks alone). python-h100: tiermem's
# Python pager as measured on the lent H100's host at batch 1 (bench/results/h100/host-diet/
# phases-fine.jsonl, Qwen3 shape on the Qwen trace, 50% resident, at commit bc00840): LRU spends 351 us per
# layer off the GPU wait, 115 of them on its 1.88 misses; tiermem's prediction and plan take 161 us per layer
# and each prefetched object ~45 us. The host's speed varied up to 1.6x between calls; this was a fast call.
# device-h100: tiermem's device pager (OffloadConfig(pager="device")), measured on the lent H100
# (bench/results/h100/sglang-device/kernels/): no host time in the loop; a layer's paging kernel takes
# 18.9 us of GPU time and its copy kernel moves 50.2 GB/s where the copy engines move 52.9 (0.95); it
# never prefetches.
PAGERS: dict[str, PagerProfile] = {
    "ideal": PagerProfile(),
    "python-h100": PagerProfile(HostCost(layer_us=236.0, miss_us=61.0, prefetch_layer_us=161.0,
                                         prefetch_object_us=45.0)),
    "device-h100": PagerProfile(gpu_page_us=18.9, copy_efficiency=0.95, prefetches=False),
}


def gpu_profile(name: str) -> GpuProfile:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"simulate: unknown GPU {name!r}; known: {sorted(GPUS)}") from None


def host_link(name: str) -> LinkProfile:
    try:
        return HOST_LINKS[name.lower()]
    except KeyError:
        raise ConfigError(f"simulate: unknown host tier {name!r}; known: {sorted(HOST_LINKS)}") from None


def pager_profile(name: str) -> PagerProfile:
    try:
        return PAGERS[name.lower()]
    except KeyError:
        raise ConfigError(f"simulate: unknown pager profile {name!r}; known: {sorted(PAGERS)}") from None
