"""Capacity planning: what a model's experts on a host tier give at a given HBM size, without a GPU.

HBM holds the dense weights, a reserve (KV cache, activations) and, in what is left, a per-layer
pool of expert slots; the rest of the experts live on the host tier behind its link profile. Routing
is flat and independent (``synthetic_trace``), as the real shared traces nearly are, unless a trace
with the model's routing shape is given. Decode compute is modelled as memory-bound: each layer reads
its dense share and every distinct expert it uses once from HBM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tiermem.config import format_bytes
from tiermem.errors import CapacityError, ConfigError
from tiermem.residency.slots import slots_for_budget
from tiermem.simulate.config import CacheLifetime, SimConfig
from tiermem.simulate.cost import CostModel
from tiermem.simulate.engine import simulate
from tiermem.simulate.models import GpuProfile, ModelShape, PagerProfile
from tiermem.simulate.result import SimResult
from tiermem.simulate.trace import SimTrace, synthetic_trace
from tiermem.types import LinkProfile

TARGET_DEMANDS = 20_000  # (step, layer, expert) demands to simulate: enough for a hit rate within ~1 point
MIN_DECODE_STEPS, MAX_DECODE_STEPS = 8, 64


def decode_cost(model: ModelShape, gpu: GpuProfile, link: LinkProfile,
                pager: PagerProfile | None = None) -> CostModel:
    """Memory-bound decode cost per MoE layer: its share of the dense weights, plus each expert it uses; ``pager``
    what paging adds (``PAGERS``; default a host that keeps ahead of the GPU and copies at the link's speed): its
    host time, its GPU time per layer (counted with the layer's fixed compute: a device pager's layer pages, copies
    and computes in sequence on one stream, so only the sum matters), and its copies' share of the link's
    bandwidth."""
    pager = pager or PagerProfile()
    return CostModel(
        link=dataclasses.replace(link, bandwidth_gbps=link.bandwidth_gbps * pager.copy_efficiency)
        if pager.copy_efficiency != 1.0 else link,
        expert_bytes=model.expert_bytes,
        compute_fixed_us=gpu.read_us(model.dense_bytes / model.num_moe_layers) + pager.gpu_page_us,
        compute_per_expert_us=gpu.read_us(model.expert_bytes),
        host=pager.host,
    )


@dataclass(frozen=True)
class CapacityPlan:
    """How HBM is split and what each policy yields."""

    model: ModelShape
    gpu: GpuProfile
    host_tier: str
    link: LinkProfile
    hbm_bytes: int
    reserve_bytes: int
    expert_budget_bytes: int
    slots_per_layer: int
    batch_size: int
    results: tuple[SimResult, ...]

    @property
    def resident_fraction(self) -> float:
        return self.slots_per_layer / self.model.num_experts

    @property
    def host_bytes(self) -> int:
        """Host-tier bytes that hold every routed expert (the HBM slots are copies)."""
        return self.model.routed_expert_bytes

    @property
    def all_resident_tokens_per_s(self) -> float:
        """The bound with every expert in HBM: compute only (the same for every policy)."""
        timing = self.results[0].timing
        assert timing is not None
        return timing.tokens / timing.compute_s if timing.compute_s > 0 else 0.0


def expert_budget(model: ModelShape, hbm_bytes: int, reserve_bytes: int) -> int:
    """HBM bytes left for expert slots; raises ``CapacityError`` naming what one step needs."""
    per_step = model.top_k * model.num_moe_layers * model.expert_bytes
    needed = model.dense_bytes + reserve_bytes + per_step
    budget = hbm_bytes - model.dense_bytes - reserve_bytes
    if budget < per_step:
        raise CapacityError(
            f"simulate: {model.name} on {format_bytes(hbm_bytes)} of HBM: the dense weights "
            f"({format_bytes(model.dense_bytes)}) and the reserve ({format_bytes(reserve_bytes)}) leave "
            f"{format_bytes(max(budget, 0))}, but with per-layer slot groups one decode step needs its top-{model.top_k} "
            f"experts resident in each of {model.num_moe_layers} layers = {format_bytes(per_step)}; at least {needed} bytes "
            f"({format_bytes(needed)}) of HBM are needed, or lower the reserve"
        )
    return budget


def plan_capacity(
    model: ModelShape, *, gpu: GpuProfile, host_tier: str, link: LinkProfile, hbm_bytes: int, reserve_bytes: int,
    batch_size: int, policies: Sequence[str], decode_steps: int | None = None, seed: int = 0,
    trace: SimTrace | None = None, pager: PagerProfile | None = None,
) -> CapacityPlan:
    """Size the expert pool for ``hbm_bytes`` and simulate each policy at ``batch_size``.

    Without a trace, one batch of flat-routed sequences is generated: enough prompt tokens to fill
    the cache twice (fed uncounted, so results are steady-state), then ``decode_steps`` decode steps
    (by default, enough for about ``TARGET_DEMANDS`` expert demands).
    """
    budget = expert_budget(model, hbm_bytes, reserve_bytes)
    total_slots = slots_for_budget(budget, model.expert_bytes, working_set_objects=model.top_k * model.num_moe_layers)
    slots = min(model.num_experts, total_slots // model.num_moe_layers)
    if trace is None:
        distinct = model.num_experts * (1 - (1 - model.top_k / model.num_experts) ** batch_size)
        if decode_steps is None:
            decode_steps = math.ceil(TARGET_DEMANDS / (model.num_moe_layers * distinct))
            decode_steps = min(max(decode_steps, MIN_DECODE_STEPS), MAX_DECODE_STEPS)
        trace = synthetic_trace(
            num_layers=model.num_moe_layers, num_experts=model.num_experts, top_k=model.top_k,
            num_sequences=batch_size, decode_steps=decode_steps,
            prefill_tokens=math.ceil(2 * slots / distinct), seed=seed,
        )
    elif (trace.num_experts, trace.top_k) != (model.num_experts, model.top_k):
        raise ConfigError(
            f"simulate: trace {trace.model!r} routes top-{trace.top_k} of {trace.num_experts} experts, but "
            f"{model.name} routes top-{model.top_k} of {model.num_experts}; use a trace of this model"
        )
    cost = decode_cost(model, gpu, link, pager)
    results = tuple(
        simulate(trace, SimConfig(
            policy=policy, resident_fraction=slots / model.num_experts, batch_size=batch_size,
            warm_with_prefill=True, lifetime=CacheLifetime.WHOLE_TRACE,
        ), cost=cost)
        for policy in policies
    )
    return CapacityPlan(
        model=model, gpu=gpu, host_tier=host_tier, link=link, hbm_bytes=hbm_bytes, reserve_bytes=reserve_bytes,
        expert_budget_bytes=budget, slots_per_layer=slots, batch_size=batch_size, results=results,
    )
