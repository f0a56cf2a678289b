"""What tiermem keeps per SGLang worker process: the TierManager, the experts' homes, the pagers, prefetching.

One ``TierRuntime`` serves every tiered MoE layer of the process (SGLang builds the layers one by one,
so the runtime is created with the first and found again by the others through ``runtime_for``).
It owns the ``TierManager`` (from ``--expert-tier-config``, or this host's default layout with the
chosen tier sized for the model's experts), one ``ExpertStore`` and one ``LayerPager`` per layer, and,
with ``--expert-tier-predictor``, a ``RoutePrefetcher`` that turns each layer's routing into copies
for the next layer (host pager) or each layer's step table for predicted eviction (device pager).

Invariants: one runtime per process and config; a layer registers once; ``close()`` drains every
copy, frees every home and closes the manager, once.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from tiermem.config import format_bytes, load_toml
from tiermem.errors import ConfigError, RegistryError
from tiermem.experts.layout import ExpertLayout
from tiermem.experts.placement import single_tier
from tiermem.experts.store import ExpertStore
from tiermem.manager import ManagerConfig, TierManager, TierSpec, default_config
from tiermem.predict.base import Predictor, RouteContext
from tiermem.predict.cooccurrence import CoOccurrencePredictor
from tiermem.predict.learned import LearnedPredictor
from tiermem.predict.trace import load_trace

from tiermem_sglang.config import ExpertTierConfig
from tiermem_sglang.device import DeviceLayerPager
from tiermem_sglang.pager import LayerPager

log = logging.getLogger("tiermem.sglang")

# Prefetch only small steps (decode): a step with more tokens touches most experts anyway.
PREFETCH_MAX_TOKENS = 64


def manager_config(config: ExpertTierConfig, *, host_capacity_bytes: int) -> ManagerConfig:
    """The tiers: the user's TOML as written, or this host's default with the expert tier sized to fit."""
    if config.tiermem_config_path is not None:
        return ManagerConfig.from_dict(load_toml(config.tiermem_config_path))
    default = default_config()
    tiers = tuple(
        TierSpec(spec.kind, dataclasses.replace(spec.config, capacity_bytes=host_capacity_bytes))
        if spec.kind == config.expert_tier.value else spec
        for spec in default.tiers
    )
    return ManagerConfig(tiers=tiers, transfer=default.transfer)


def load_predictor(path: str | Path) -> Predictor:
    """A trace (``.npz``) fits a co-occurrence predictor; a ``.pt`` file is a saved learned predictor."""
    path = Path(path)
    if path.suffix == ".npz":
        return CoOccurrencePredictor.fit(load_trace(path).restrict_to_layers_with_data())
    if path.suffix == ".pt":
        return LearnedPredictor.load(path)
    raise ConfigError(
        f"tiermem-sglang: --expert-tier-predictor {str(path)!r} is neither a routing trace (.npz) nor a learned "
        "predictor (.pt); collect a trace with `python -m tiermem_sglang.collect`"
    )


class RoutePrefetcher:
    """After a layer is routed, asks the predictor for the next layer and starts copying its likely experts."""

    def __init__(self, predictor: Predictor, *, num_experts: int, top_k: int) -> None:
        self.predictor = predictor
        self.num_experts = num_experts
        self.top_k = top_k
        self._current: np.ndarray | None = None  # int16 [tokens, layers, top_k] of the running step

    def after_routing(self, position: int, topk_ids: torch.Tensor, pagers: list[LayerPager]) -> int:
        """Record ``position``'s routing and prefetch for the next MoE layer; returns copies started."""
        tokens = int(topk_ids.shape[0])
        if tokens == 0 or tokens > PREFETCH_MAX_TOKENS:
            self._current = None
            return 0
        if position == 0 or self._current is None or self._current.shape[0] != tokens:
            self._current = np.full((tokens, len(pagers), self.top_k), -1, dtype=np.int16)
        self._current[:, position] = topk_ids.to("cpu", torch.int16).numpy()
        context = RouteContext(num_experts=self.num_experts, layer=position, current=self._current)
        scores = self.predictor.predict(context, 1)[0].max(axis=0)  # [E]: best score over the batch's tokens
        target = pagers[(position + 1) % len(pagers)]
        wanted = min(target.num_slots - self.top_k, tokens * self.top_k)
        return target.prefetch(dict(enumerate(scores.tolist())), wanted)


class TierRuntime:
    """The manager, homes and pagers of every tiered MoE layer of this process."""

    def __init__(self, config: ExpertTierConfig, *, host_capacity_bytes: int) -> None:
        self.config = config
        self.manager = TierManager(manager_config(config, host_capacity_bytes=host_capacity_bytes))
        kinds = {name: tier.kind.value for name, tier in self.manager.tiers.items()}
        homes = [name for name, kind in kinds.items() if kind == config.expert_tier.value]
        if not homes:
            self.manager.close()
            raise ConfigError(
                f"tiermem-sglang: --expert-tier {config.expert_tier.value} names no tier of this manager; it has "
                f"{kinds}; add a [[tiers]] table of kind {config.expert_tier.value!r} to --expert-tier-config"
            )
        self.home_tier = homes[0]
        self.predictor = load_predictor(config.predictor_path) if config.predictor_path else None
        self.stores: dict[int, ExpertStore] = {}
        self.pagers: dict[int, LayerPager] = {}
        self.prefetcher: RoutePrefetcher | None = None
        self._closed = False
        log.info("tiermem-sglang: expert homes on tier %r of %s", self.home_tier, kinds)

    def store_for(self, layer: int, layout: ExpertLayout, num_experts: int) -> ExpertStore:
        """A new store holding every expert of ``layer`` on the home tier."""
        if layer in self.stores:
            raise RegistryError(f"tiermem-sglang: MoE layer {layer} was already given an expert store")
        store = ExpertStore(self.manager, layout=layout, layers=[layer], num_experts=num_experts,
                            placement=single_tier(self.home_tier, 1, num_experts), table=f"layer{layer}")
        self.stores[layer] = store
        return store

    def add_pager(self, pager: LayerPager | DeviceLayerPager, *, top_k: int) -> None:
        """Register a layer's pager (layers register in model order). With a predictor, a host pager's layer gets
        prefetches from the previous layer's routing, and a device pager's layer its step table for eviction."""
        position = len(self.pagers)
        self.pagers[pager.layer] = pager
        if self.predictor is None:
            return
        if isinstance(pager, DeviceLayerPager):
            steps = getattr(self.predictor, "step", None)
            if steps is None or position >= len(steps):
                raise ConfigError(
                    f"tiermem-sglang: tiered MoE layer {position} (layer id {pager.layer}) has no step table in "
                    f"--expert-tier-predictor {self.config.predictor_path!r} "
                    f"({'none' if steps is None else f'{len(steps)} MoE layers'}); use a trace of this model"
                )
            pager.set_step_table(steps[position])
        elif self.prefetcher is None:
            self.prefetcher = RoutePrefetcher(self.predictor, num_experts=pager.store.num_experts, top_k=top_k)

    def after_routing(self, layer: int, topk_ids: torch.Tensor) -> int:
        """Hook of every tiered layer once its experts have run: prefetch for the next layer."""
        if self.prefetcher is None:
            return 0
        ordered = [self.pagers[key] for key in sorted(self.pagers)]
        return self.prefetcher.after_routing(sorted(self.pagers).index(layer), topk_ids, ordered)

    def stats(self) -> dict[str, object]:
        per_layer = {layer: dataclasses.asdict(p.stats) for layer, p in sorted(self.pagers.items())}
        homes = sum(store.nbytes for store in self.stores.values())
        return {"home_tier": self.home_tier, "home_bytes": homes, "home": format_bytes(homes), "layers": per_layer,
                "manager": self.manager.stats()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pager in self.pagers.values():
            pager.drain()
        for store in self.stores.values():
            store.close()
        self.manager.close()


_RUNTIMES: dict[str, TierRuntime] = {}


def runtime_for(config: ExpertTierConfig, *, host_capacity_bytes: int) -> TierRuntime:
    """This process's runtime for ``config``, created by the first tiered layer."""
    key = config.to_json()
    if key not in _RUNTIMES:
        _RUNTIMES[key] = TierRuntime(config, host_capacity_bytes=host_capacity_bytes)
        atexit.register(_RUNTIMES[key].close)
    return _RUNTIMES[key]


def close_runtimes() -> None:
    """Close every runtime of this process (idempotent); the next tiered layer builds a new one."""
    for runtime in _RUNTIMES.values():
        runtime.close()
    _RUNTIMES.clear()
