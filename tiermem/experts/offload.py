"""``tiermem.offload(model, ...)``: move a transformers MoE model's experts to a host tier and run them from HBM slots.

MoE blocks are found by structure, not by class name: a module with a router child ``gate`` and a
fused experts child ``experts`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), as every
transformers >= 5 MoE architecture has (Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V2/V3, OLMoE, ...),
plus optionally ``shared_expert`` + ``shared_expert_gate`` (Qwen2-MoE) or ``shared_experts``
(DeepSeek). Each block is replaced on the model instance (``setattr`` on its parent) by an
``OffloadedMoE``; no class of transformers is patched. Any other layout raises ``ConfigError``
naming the modules found.

The returned ``OffloadHandle`` reports ``stats()`` and releases everything on ``close()``
(idempotent; the model cannot run its MoE layers afterwards). Experts are computed as the model computes
them: grouped when its `_experts_implementation` is `grouped_mm`, else the eager loop (both bit-exact).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from collections.abc import Mapping
from typing import Any, Self

import torch
from torch import nn

from tiermem.config import from_dict
from tiermem.errors import ConfigError
from tiermem.experts.moe import OffloadedExperts, OffloadedMoE, SharedExperts
from tiermem.experts.placement import Placement
from tiermem.experts.runtime import ExpertCompute, ExpertRuntime, OffloadConfig
from tiermem.experts.sources import ModuleExperts
from tiermem.experts.store import ExpertStore
from tiermem.manager import ManagerConfig, TierManager, default_config
from tiermem.predict.base import Predictor

log = logging.getLogger("tiermem.experts")

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SHARED = {
    frozenset(): SharedExperts.NONE,
    frozenset({"shared_expert", "shared_expert_gate"}): SharedExperts.GATED,
    frozenset({"shared_experts"}): SharedExperts.PLAIN,
}


class OffloadHandle:
    """What ``offload`` returns: statistics of the offloaded model and the way to release it."""

    def __init__(self, runtime: ExpertRuntime, store: ExpertStore, manager: TierManager, owns_manager: bool,
                 blocks: Mapping[str, OffloadedMoE]) -> None:
        self.runtime = runtime
        self.store = store
        self.manager = manager
        self.blocks = dict(blocks)
        self._owns_manager = owns_manager
        self._closed = False

    def stats(self) -> dict[str, Any]:
        """Hit rate, prefetch precision/recall, bytes moved per tier, stall time (s), and the cache's shape."""
        return self.runtime.stats()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.runtime.close()
        self.store.close()
        if self._owns_manager:
            self.manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def offload(
    model: nn.Module, tier: str = "cxl", hbm_budget_bytes: int | str | None = None,
    predictor: Predictor | None = None, config: OffloadConfig | Mapping[str, Any] | None = None, *,
    manager: TierManager | None = None, placement: Placement | None = None,
) -> OffloadHandle:
    """Offload every MoE block of ``model``; experts live on ``tier`` (or per ``placement``), slots in HBM.

    ``hbm_budget_bytes`` (or ``config.resident_fraction``) sizes the HBM slots. Without ``manager``,
    a ``TierManager`` with just the home tier(s), sized to the experts, is built and owned by the handle.
    """
    config = _config(config, hbm_budget_bytes)
    if config.compute is None:
        config = replace(config, compute=_model_compute(model))
    blocks = find_moe_blocks(model)
    layers = {_layer_index(name, i): block for i, (name, block) in enumerate(blocks.items())}
    source = ModuleExperts({layer: block.experts for layer, block in layers.items()})
    owns_manager = manager is None
    tiers = placement.tiers if placement is not None else (tier,)
    if manager is None:
        nbytes = len(source.layers) * source.num_experts * source.layout.block_bytes
        manager = TierManager(_manager_config(tiers, nbytes))
    try:
        store = ExpertStore.from_source(manager, source, tier=None if placement else tier, placement=placement)
    except BaseException:
        if owns_manager:
            manager.close()
        raise
    first = next(iter(blocks.values()))
    device = first.gate.weight.device
    try:
        runtime = ExpertRuntime(store, config, device=device, top_k=int(first.gate.top_k), predictor=predictor)
    except BaseException:
        store.close()
        if owns_manager:
            manager.close()
        raise
    replaced = {}
    for (name, block), layer in zip(blocks.items(), layers):
        shared_names = _shared_names(block)
        offloaded = OffloadedMoE(
            gate=block.gate, experts=OffloadedExperts(runtime, layer, block.experts.act_fn),
            shared=_SHARED[frozenset(shared_names)], shared_modules={n: getattr(block, n) for n in shared_names},
        ).train(block.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, offloaded)
        replaced[name] = offloaded
    log.info("offload: replaced %d MoE blocks; experts on %s, %s", len(replaced), list(tiers), store.layout.describe())
    return OffloadHandle(runtime, store, manager, owns_manager, replaced)


def _model_compute(model: nn.Module) -> ExpertCompute:
    """Compute the way the model's own experts do: grouped for transformers' ``grouped_mm``, else the loop."""
    implementation = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return ExpertCompute.GROUPED if implementation == "grouped_mm" else ExpertCompute.LOOP


def find_moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> block of every MoE block in ``model`` (see the module docstring for what counts)."""
    found, unknown = {}, []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        fused = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and \
            isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        gate = getattr(module, "gate", None)
        extra = {n for n, _ in module.named_children()} - {"gate", "experts"}
        if fused and isinstance(gate, nn.Module) and hasattr(gate, "top_k") and frozenset(extra) in _SHARED:
            found[name] = module
        else:
            unknown.append(f"{name or '<root>'} ({type(module).__name__}: children "
                           f"{[n for n, _ in module.named_children()]}, experts {type(experts).__name__})")
    if not found:
        described = "; ".join(unknown[:6]) if unknown else "no module has an 'experts' child"
        raise ConfigError(
            f"offload: no MoE block of a known layout in {type(model).__name__}. Found: {described}. A block needs "
            "a router 'gate' (with top_k) and fused 'experts' (gate_up_proj [E,2I,H], down_proj [E,H,I]) as in "
            "transformers >= 5, optionally with shared_expert(+_gate) or shared_experts; upgrade transformers or "
            "use OffloadedMoE directly"
        )
    return found


def _shared_names(block: nn.Module) -> list[str]:
    return sorted({n for n, _ in block.named_children()} - {"gate", "experts"})


def _layer_index(name: str, ordinal: int) -> int:
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else ordinal


def _config(config: OffloadConfig | Mapping[str, Any] | None, hbm_budget_bytes: int | str | None) -> OffloadConfig:
    data = {} if config is None else config
    if isinstance(data, OffloadConfig):
        if hbm_budget_bytes is not None:
            raise ConfigError("offload: give hbm_budget_bytes either as an argument or in config, not both")
        return data
    data = dict(data)
    if hbm_budget_bytes is not None:
        if "hbm_budget_bytes" in data:
            raise ConfigError("offload: give hbm_budget_bytes either as an argument or in config, not both")
        data["hbm_budget_bytes"] = hbm_budget_bytes
    return from_dict(OffloadConfig, data, where="offload config")


def _manager_config(tiers: tuple[str, ...], nbytes: int) -> ManagerConfig:
    """This host's default tier tables for ``tiers``, each sized to hold every expert (with arena slack)."""
    specs = {spec["name"] if "name" in spec else spec["kind"]: spec for spec in default_config().to_dict()["tiers"]}
    specs.setdefault("sim", {"kind": "sim", "name": "sim", "model_time": False})
    missing = [t for t in tiers if t not in specs]
    if missing:
        raise ConfigError(f"offload: unknown home tier(s) {missing}; this host offers {sorted(specs)} (or pass manager=)")
    capacity = nbytes + (64 << 20)
    return ManagerConfig.from_dict({"tiers": [{**specs[t], "capacity_bytes": capacity} for t in tiers]})
