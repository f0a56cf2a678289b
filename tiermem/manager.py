"""``TierManager``: the facade that builds tiers from a config and allocates, moves and frees tensors.

Lifecycle: construction is one phase (every tier is ready or the constructor raises, closing what it
built); ``close()`` is idempotent, waits for running copies and releases every mapping and
registration; ``with TierManager.from_config(...) as tm:`` closes on exit.
Ownership: a tensor returned by ``empty``/``to`` is owned by tiermem until ``free``; only that exact
tensor (its first byte) can be freed, once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from tiermem import numa
from tiermem.config import from_dict, load_toml, option, to_dict
from tiermem.defaults import default_tier_specs
from tiermem.errors import ConfigError, OwnershipError, RegistryError
from tiermem.tiers import TIERS, Block, BuildContext, Tier
from tiermem.topology import discover
from tiermem.transfer import Copy, TransferConfig, TransferEngine, TransferHandle, TransferPlan, make_plan

log = logging.getLogger("tiermem.manager")


@dataclass(frozen=True)
class TierSpec:
    """One tier of a manager: its registered kind and that kind's frozen config."""

    kind: str
    config: Any


def parse_tier_spec(data: Mapping[str, Any], where: str = "tier") -> TierSpec:
    """Turn ``{"kind": "dram", "capacity_bytes": "1GiB", ...}`` into a validated TierSpec."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ConfigError(f"config {where}: every tier needs a 'kind'; registered kinds: {TIERS.names()}")
    entry = TIERS.get(data["kind"])
    body = {k: v for k, v in data.items() if k != "kind"}
    return TierSpec(entry.name, from_dict(entry.config_cls, body, where=f"{where} ({entry.name})"))


@dataclass(frozen=True)
class ManagerConfig:
    """Every tier of a TierManager and how its engine moves bytes."""

    tiers: tuple[TierSpec, ...] = option(help="The tiers, each a table with a 'kind' and that kind's keys.")
    transfer: TransferConfig = option(TransferConfig(), help="Transfer engine settings.")

    def __post_init__(self) -> None:
        names = [spec.config.name for spec in self.tiers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"config ManagerConfig: tier names must be unique; repeated: {duplicates}")
        if not self.tiers:
            raise ConfigError("config ManagerConfig: at least one tier is needed")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ManagerConfig":
        unknown = sorted(set(data) - {"tiers", "transfer"})
        if unknown:
            raise ConfigError(f"config ManagerConfig: unknown key(s) {unknown}; valid keys are ['tiers', 'transfer']")
        tiers = data.get("tiers")
        if not isinstance(tiers, (list, tuple)):
            raise ConfigError("config ManagerConfig: 'tiers' must be a list of tier tables ([[tiers]] in TOML)")
        specs = tuple(parse_tier_spec(t, where=f"tiers[{i}]") for i, t in enumerate(tiers))
        transfer = from_dict(TransferConfig, data.get("transfer", {}), where="transfer")
        return cls(tiers=specs, transfer=transfer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tiers": [{"kind": s.kind, **to_dict(s.config)} for s in self.tiers],
            "transfer": to_dict(self.transfer),
        }


def default_config() -> ManagerConfig:
    """The default layout for this host (see ``tiermem.defaults``)."""
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    specs = default_tier_specs(discover(), gpu_count=gpu_count, numa_usable=numa.available())
    return ManagerConfig.from_dict({"tiers": specs})


def build_tier(data: Mapping[str, Any] | TierSpec) -> Tier:
    """Build one tier from its spec (used for top-level tiers and for tiers wrapped by others)."""
    spec = data if isinstance(data, TierSpec) else parse_tier_spec(data)
    return TIERS.get(spec.kind).factory(spec.config, BuildContext(build=build_tier))


class TierManager:
    """Allocates tensors on tiers and moves them between tiers."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.tiers: dict[str, Tier] = {}
        try:
            for spec in config.tiers:
                self.tiers[spec.config.name] = build_tier(spec)
        except BaseException:
            for tier in self.tiers.values():
                tier.close()
            raise
        self.engine = TransferEngine(config.transfer)
        self._closed = False
        log.info("tiermem: tiers %s", ", ".join(repr(t) for t in self.tiers.values()))

    @classmethod
    def from_config(cls, config: ManagerConfig | Mapping[str, Any] | str | Path | None = None) -> "TierManager":
        """Build from a ManagerConfig, a dict, a TOML path, or (None) the default for this host."""
        if config is None:
            return cls(default_config())
        if isinstance(config, (str, Path)):
            config = load_toml(config)
        if isinstance(config, Mapping):
            config = ManagerConfig.from_dict(config)
        return cls(config)

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise RegistryError(f"TierManager: unknown tier {name!r}; this manager has {sorted(self.tiers)}") from None

    def empty(self, shape: int | Iterable[int], dtype: torch.dtype = torch.uint8, *, tier: str) -> torch.Tensor:
        """An uninitialised tensor on ``tier``: a view of tier memory, no copy."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        block = self.tier(tier).allocate(max(nbytes, 1))
        return block.tensor.narrow(0, 0, nbytes).view(dtype).view(shape)

    def block_of(self, tensor: torch.Tensor) -> tuple[Tier, Block]:
        """The tier and live block whose first byte is ``tensor``'s first byte."""
        address = tensor.data_ptr()
        for tier in self.tiers.values():
            block = tier.owner_of(address)
            if block is not None:
                return tier, block
        raise OwnershipError(
            f"TierManager: tensor at {address:#x} (shape {tuple(tensor.shape)}, {tensor.device}) is not owned "
            "by tiermem; only tensors returned by empty()/to() can be freed or looked up"
        )

    def tier_of(self, tensor: torch.Tensor) -> Tier | None:
        """The tier whose memory holds ``tensor`` (views included), or None."""
        address = tensor.data_ptr()
        return next((t for t in self.tiers.values() if t.contains(address)), None)

    def free(self, tensor: torch.Tensor) -> None:
        tier, block = self.block_of(tensor)
        tier.free(block)

    def plan(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> TransferPlan:
        """A validated plan copying each ``(src, dst)``, carrying the I/O hooks of the tiers involved."""
        copies = []
        for src, dst in pairs:
            hooks = tuple(t.on_io for t in (self.tier_of(src), self.tier_of(dst)) if t is not None and t.io_hooked)
            copies.append(Copy(src, dst, hooks))
        return make_plan(copies)

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, background: bool = False) -> TransferHandle:
        """Start copying each ``(src, dst)`` (``background``: on the engine's background streams)."""
        return self.engine.submit(self.plan(pairs), background=background)

    def to(self, tensor: torch.Tensor, tier: str) -> torch.Tensor:
        """A copy of ``tensor`` on ``tier`` (blocking); the source is left as it is."""
        out = self.empty(tensor.shape, tensor.dtype, tier=tier)
        try:
            self.copy([(tensor.contiguous(), out)]).wait()
        except BaseException:
            self.free(out)
            raise
        return out

    def stats(self) -> dict[str, Any]:
        """Per-tier accounting and bytes moved per direction."""
        return {"tiers": [t.stats() for t in self.tiers.values()], "transfer": self.engine.stats()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        for tier in self.tiers.values():
            tier.close()

    def __enter__(self) -> "TierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

