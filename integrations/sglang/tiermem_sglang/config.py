"""The frozen tiermem settings of one SGLang server, and how they travel from the CLI to every worker.

The CLI process parses the ``--expert-tier*`` flags into an ``ExpertTierConfig`` and publishes it as
JSON in the environment variable ``TIERMEM_SGLANG_CONFIG``; SGLang starts its scheduler processes
from that process, so each one inherits the variable and reads the same frozen config with
``published()``. Programs that build ``sglang.Engine(...)`` directly (no CLI) call ``publish(config)``
before constructing the engine.

Invariants: a published config is valid (it was built through ``__post_init__``); ``published()``
returns None when nothing was published, and raises ``ConfigError`` for a malformed payload rather
than guessing.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass

from tiermem.config import from_dict, option, require, to_dict
from tiermem.errors import ConfigError
from tiermem.residency import slots_for_fraction

ENV_VAR = "TIERMEM_SGLANG_CONFIG"


class ExpertTier(str, enum.Enum):
    """Where the routed experts of every MoE layer live; ``hbm`` leaves SGLang as it is."""

    HBM = "hbm"
    DRAM = "dram"
    CXL = "cxl"
    RDMA = "rdma"


class ExpertPager(str, enum.Enum):
    """Who decides which experts sit in the HBM slots at each step."""

    DEVICE = "device"  # tiermem's device pager on the GPU (no host sync; full decode CUDA graphs; LRU or step table)
    HOST = "host"  # tiermem's planner on the host (reads the routing back; prefetch; breakable or no graphs)


class TableTier(str, enum.Enum):
    """Where Engram embedding tables live."""

    HBM = "hbm"
    DRAM = "dram"
    CXL = "cxl"


@dataclass(frozen=True)
class ExpertTierConfig:
    """What ``--expert-tier*`` and ``--engram-table-tier`` asked for."""

    expert_tier: ExpertTier = option(ExpertTier.HBM, help="Home tier of the routed experts (--expert-tier).")
    slots: int | None = option(None, help="HBM expert slots per MoE layer, K (--expert-tier-slots).")
    hbm_fraction: float | None = option(
        None, help="Fraction of each layer's experts that get an HBM slot (--expert-tier-hbm-fraction).")
    pager: ExpertPager = option(
        ExpertPager.DEVICE, help="Who pages the experts (--expert-tier-pager): device (decides and copies on the "
                                 "GPU, capturable in a full decode CUDA graph; evicts by a trace's step table "
                                 "with --expert-tier-predictor) or host (plans on the host; prefetches from "
                                 "--expert-tier-predictor).")
    device_waves_max_tokens: int = option(
        256, help="With the device pager, a step of at most this many tokens pages its experts in waves decided on "
                  "the GPU (no host sync: captured in full decode CUDA graphs at every batch size up to it, which "
                  "are capped there); a larger step (a prefill) reads its routing back once and copies on the copy "
                  "engines (--expert-tier-device-waves-max-tokens). SGLang's default largest decode graph on an "
                  "H100 is 256.")
    predictor_path: str | None = option(
        None, help="Routing trace (.npz) to fit a co-occurrence predictor from, or a learned predictor (.pt).")
    tiermem_config_path: str | None = option(
        None, help="tiermem TOML with the tiers ([[tiers]]) and transfer settings (--expert-tier-config).")
    engram_table_tier: TableTier | None = option(None, help="Home tier of Engram tables (--engram-table-tier).")

    def __post_init__(self) -> None:
        budgets = [name for name, value in (("--expert-tier-slots", self.slots),
                                            ("--expert-tier-hbm-fraction", self.hbm_fraction)) if value is not None]
        if self.offloads:
            require(len(budgets) == 1, self,
                    f"--expert-tier {self.expert_tier.value} needs exactly one HBM budget, "
                    f"--expert-tier-slots N or --expert-tier-hbm-fraction F; got {budgets or 'neither'}")
        else:
            require(not budgets and self.predictor_path is None, self,
                    f"{budgets + (['--expert-tier-predictor'] if self.predictor_path else [])} only apply when "
                    "experts are offloaded; add --expert-tier dram|cxl|rdma or drop them")
        require(not (self.pager is ExpertPager.DEVICE and self.predictor_path is not None
                     and not self.predictor_path.endswith(".npz")), self,
                f"--expert-tier-pager device ranks slots by a routing trace's step table (.npz); "
                f"{self.predictor_path!r} is not a trace, and a learned predictor (.pt) prefetches through the host "
                "pager: add --expert-tier-pager host, or give a trace")
        require(self.device_waves_max_tokens >= 1, self,
                f"--expert-tier-device-waves-max-tokens must be >= 1, got {self.device_waves_max_tokens}")
        if self.slots is not None:
            require(self.slots >= 1, self, f"--expert-tier-slots must be >= 1, got {self.slots}")
        if self.hbm_fraction is not None:
            require(0.0 < self.hbm_fraction < 1.0, self,
                    f"--expert-tier-hbm-fraction must be in (0, 1), got {self.hbm_fraction}; "
                    "1.0 means every expert in HBM, which is --expert-tier hbm")

    @property
    def offloads(self) -> bool:
        """True when routed experts live off the GPU and are paged into HBM slots."""
        return self.expert_tier is not ExpertTier.HBM

    def resident_slots(self, num_experts: int, top_k: int) -> int:
        """K, the HBM slots of a layer with ``num_experts`` experts; raises unless ``top_k <= K < num_experts``."""
        slots = self.slots if self.slots is not None else slots_for_fraction(self.hbm_fraction, num_experts)
        if slots < top_k:
            raise ConfigError(
                f"tiermem-sglang: {slots} HBM slot(s) per layer cannot hold one token's {top_k} routed experts; "
                f"use --expert-tier-slots {top_k} or more (or a larger --expert-tier-hbm-fraction)"
            )
        if slots >= num_experts:
            raise ConfigError(
                f"tiermem-sglang: {slots} HBM slots per layer hold all {num_experts} experts, so nothing is "
                f"offloaded; use --expert-tier hbm, or fewer than {num_experts} slots"
            )
        return slots

    def unsynced_max_tokens(self, num_experts: int, top_k: int) -> int:
        """The largest step the device pager pages with no host sync, so the largest decode CUDA graph: one wave
        while the routed entries fit the K slots, waves decided on the GPU up to ``device_waves_max_tokens``."""
        return max(self.resident_slots(num_experts, top_k) // top_k, self.device_waves_max_tokens)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, payload: str) -> ExpertTierConfig:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"tiermem-sglang: {ENV_VAR} is not valid JSON ({exc}): {payload[:200]!r}") from None
        return from_dict(cls, data, where=ENV_VAR)


def publish(config: ExpertTierConfig) -> None:
    """Make ``config`` the one this process and every process it starts from now on will read."""
    os.environ[ENV_VAR] = config.to_json()


def published() -> ExpertTierConfig | None:
    """The config published by this process or an ancestor, or None."""
    payload = os.environ.get(ENV_VAR)
    return None if payload is None else ExpertTierConfig.from_json(payload)
