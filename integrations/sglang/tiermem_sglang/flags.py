"""The ``--expert-tier*`` server flags: added to SGLang's parser, read into an ``ExpertTierConfig``, checked.

``add_flags`` runs AFTER ``ServerArgs.add_cli_args``; ``read_flags`` runs AROUND
``ServerArgs.from_cli_args``: it builds SGLang's record as usual, then the frozen config from the same
namespace, refuses combinations tiermem cannot serve (``incompatibilities``), and publishes the config
for the scheduler processes (``tiermem_sglang.config``). Without any tiermem flag nothing is published
and SGLang runs unchanged.

The same incompatibilities are checked again in each worker against SGLang's resolved config (see
``method.check_worker``), which also covers servers built through ``sglang.Engine`` without a CLI.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tiermem.errors import ConfigError

from tiermem_sglang.config import ExpertPager, ExpertTier, ExpertTierConfig, TableTier, publish

log = logging.getLogger("tiermem.sglang")

# Namespace attribute -> ExpertTierConfig field.
_FIELDS = {
    "expert_tier": "expert_tier",
    "expert_tier_slots": "slots",
    "expert_tier_hbm_fraction": "hbm_fraction",
    "expert_tier_pager": "pager",
    "expert_tier_device_waves_max_tokens": "device_waves_max_tokens",
    "expert_tier_predictor": "predictor_path",
    "expert_tier_config": "tiermem_config_path",
    "engram_table_tier": "engram_table_tier",
}


def add_flags(result: Any, parser: argparse.ArgumentParser) -> None:
    """AFTER hook of ``ServerArgs.add_cli_args(parser)``: add tiermem's flags in their own group."""
    group = parser.add_argument_group("tiermem (tiered expert and Engram memory)")
    group.add_argument(
        "--expert-tier", choices=[t.value for t in ExpertTier], default=None,
        help="Home of the routed experts: hbm (unchanged SGLang), dram, cxl (a CXL NUMA node or devdax, or "
             "emulated where none exists) or rdma. Off-GPU experts are paged into K HBM slots per layer.")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--expert-tier-slots", type=int, default=None, metavar="N",
        help="HBM expert slots per MoE layer (at least the router's top-k).")
    budget.add_argument(
        "--expert-tier-hbm-fraction", type=float, default=None, metavar="F",
        help="Fraction of each MoE layer's experts that get an HBM slot, in (0, 1).")
    group.add_argument(
        "--expert-tier-pager", choices=[p.value for p in ExpertPager], default=None,
        help="Who pages experts into the slots: device (decides and copies on the GPU without a host sync, so "
             "decode runs in full CUDA graphs; LRU, or with --expert-tier-predictor "
             "TRACE.npz eviction by the trace's step table) or host (plans on the host and prefetches with "
             "--expert-tier-predictor; decode graphs breakable or disabled). Default: device, or host when "
             "--expert-tier-predictor is given.")
    group.add_argument(
        "--expert-tier-device-waves-max-tokens", type=int, default=None, metavar="T",
        help="Device pager: steps of at most T tokens page in waves decided on the GPU, inside CUDA graphs (full "
             "decode graphs are captured up to T requests); larger steps read their routing back. Default 256.")
    group.add_argument(
        "--expert-tier-predictor", default=None, metavar="PATH",
        help="Route predictor: a tiermem routing trace (.npz, e.g. from `python -m tiermem_sglang.collect`) to fit "
             "a co-occurrence predictor from, or a learned predictor (.pt). The host pager prefetches with it; the "
             "device pager evicts by the trace's step table.")
    group.add_argument(
        "--expert-tier-config", default=None, metavar="PATH",
        help="tiermem TOML naming the tiers ([[tiers]]) and transfer settings; default: this host's layout.")
    group.add_argument(
        "--engram-table-tier", choices=[t.value for t in TableTier], default=None,
        help="Home tier of Engram embedding tables, read by models that build tiermem's EngramModule.")


def config_from_namespace(args: argparse.Namespace) -> ExpertTierConfig | None:
    """The config the flags in ``args`` ask for, or None when no tiermem flag was given."""
    given = {field: getattr(args, attr) for attr, field in _FIELDS.items() if getattr(args, attr, None) is not None}
    if not given:
        return None
    waves = "device_waves_max_tokens" in given
    config = ExpertTierConfig(
        expert_tier=ExpertTier(given.pop("expert_tier", ExpertTier.HBM.value)),
        engram_table_tier=TableTier(given.pop("engram_table_tier")) if "engram_table_tier" in given else None,
        pager=ExpertPager(given.pop("pager", ExpertPager.HOST if "predictor_path" in given else ExpertPager.DEVICE)),
        **given,
    )
    if waves and not (config.offloads and config.pager is ExpertPager.DEVICE):
        raise ConfigError(f"tiermem-sglang: --expert-tier-device-waves-max-tokens sets the device pager's waves; this "
                          f"server pages {'no experts' if not config.offloads else 'on the host'}: drop it, or add "
                          f"{'--expert-tier dram|cxl|rdma' if not config.offloads else '--expert-tier-pager device'}")
    return config


def incompatibilities(config: ExpertTierConfig, settings: Any) -> list[str]:
    """What in SGLang's ``settings`` (raw ``ServerArgs`` or a resolved view) tiermem offloading cannot serve.

    Each entry names the flag and the fix. Empty when ``config`` does not offload experts.
    """
    if not config.offloads:
        return []
    problems = []
    for name in ("tp_size", "ep_size", "pp_size", "dp_size"):
        value = getattr(settings, name, None)
        if value is not None and value > 1:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} {value}: tiered experts serve one GPU; use {flag} 1")
    checks = (
        ("enable_paged_experts",
         "--enable-paged-experts is SGLang's own expert paging; use it or --expert-tier, not both"),
        ("enable_eplb",
         ("--enable-eplb rebalances physical experts across GPUs, but this GPU holds K slots, not the experts; "
          "drop --enable-eplb")),
        ("speculative_algorithm",
         "speculative decoding (--speculative-algorithm) builds a draft MoE that is not tiered; drop it"),
        ("kt_weight_path",
         "--kt-weight-path (KTransformers CPU experts) also wraps the MoE method; use one of them"),
        ("enable_elastic_expert_backup",
         "--enable-elastic-expert-backup keeps its own host copy of the experts; drop it"),
    )
    for name, message in checks:
        if getattr(settings, name, None):
            problems.append(message)
    if getattr(settings, "load_format", None) == "dummy":
        problems.append("--load-format dummy: the host tier needs real weights; save a checkpoint "
                        "(random weights are fine) and load it")
    if config.expert_tier is ExpertTier.RDMA:
        problems.append("--expert-tier rdma: experts are copied to HBM by DMA from host memory, and tiermem has "
                        "no RDMA-peer expert home yet; use --expert-tier dram or cxl")
    return problems


def refuse(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, or return when there is none."""
    if problems:
        raise ConfigError("tiermem-sglang: cannot start with these settings:\n  - " + "\n  - ".join(problems))


def read_flags(original: Any, cls: type, args: argparse.Namespace) -> Any:
    """AROUND hook of ``ServerArgs.from_cli_args``: SGLang's record, plus tiermem's config published."""
    server_args = original(cls, args)
    config = config_from_namespace(args)
    if config is None:
        return server_args
    refuse(incompatibilities(config, server_args))
    publish(config)
    log.info("tiermem-sglang: %s", config)
    return server_args
