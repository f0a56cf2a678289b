"""ExpertTierConfig: validation, slot counts, and the JSON that carries it to workers (no sglang needed)."""

from __future__ import annotations

import argparse

import pytest
from tiermem.errors import ConfigError

from tiermem_sglang.config import ENV_VAR, ExpertPager, ExpertTier, ExpertTierConfig, TableTier, publish, published
from tiermem_sglang.flags import add_flags, config_from_namespace, incompatibilities

NUM_EXPERTS = 64
TOP_K = 8


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(None, parser)
    return parser.parse_args(list(argv))


def test_flags_parse_into_a_frozen_config():
    config = config_from_namespace(parse("--expert-tier", "cxl", "--expert-tier-slots", "16",
                                         "--expert-tier-predictor", "/t.npz", "--expert-tier-config", "/c.toml"))
    assert config == ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=16, predictor_path="/t.npz",
                                      tiermem_config_path="/c.toml", pager=ExpertPager.HOST)
    with pytest.raises(AttributeError):
        config.slots = 4


def test_the_device_pager_is_the_default_unless_a_predictor_asks_for_prefetch():
    offload = ("--expert-tier", "cxl", "--expert-tier-slots", "16")
    assert config_from_namespace(parse(*offload)).pager is ExpertPager.DEVICE
    assert config_from_namespace(parse(*offload, "--expert-tier-predictor", "/t.npz")).pager is ExpertPager.HOST
    assert config_from_namespace(parse(*offload, "--expert-tier-pager", "host")).pager is ExpertPager.HOST
    with_trace = config_from_namespace(parse(*offload, "--expert-tier-pager", "device", "--expert-tier-predictor",
                                             "/t.npz"))
    assert with_trace.pager is ExpertPager.DEVICE  # it evicts by the trace's step table
    with pytest.raises(ConfigError, match="a learned predictor .* add --expert-tier-pager host"):
        config_from_namespace(parse(*offload, "--expert-tier-pager", "device", "--expert-tier-predictor", "/p.pt"))
    with pytest.raises(SystemExit):
        parse("--expert-tier-pager", "gpu")


def test_no_flag_means_no_config():
    assert config_from_namespace(parse()) is None


def test_the_config_survives_its_json_payload_unchanged(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert published() is None
    config = ExpertTierConfig(expert_tier=ExpertTier.DRAM, hbm_fraction=0.25, engram_table_tier=TableTier.CXL,
                              pager=ExpertPager.DEVICE)
    publish(config)
    assert published() == config and published().pager is ExpertPager.DEVICE


def test_a_malformed_payload_raises_instead_of_guessing(monkeypatch):
    monkeypatch.setenv(ENV_VAR, '{"expert_tier": "cxl", "slots": 4, "colour": "red"}')
    with pytest.raises(ConfigError, match="unknown key"):
        published()


@pytest.mark.parametrize("kwargs, message", [
    ({"expert_tier": ExpertTier.CXL}, "needs exactly one HBM budget"),
    ({"expert_tier": ExpertTier.CXL, "slots": 4, "hbm_fraction": 0.5}, "needs exactly one HBM budget"),
    ({"expert_tier": ExpertTier.HBM, "slots": 4}, "only apply when experts are offloaded"),
    ({"expert_tier": ExpertTier.CXL, "slots": 0}, "must be >= 1"),
    ({"expert_tier": ExpertTier.CXL, "hbm_fraction": 1.0}, "which is --expert-tier hbm"),
    ({"expert_tier": ExpertTier.CXL, "slots": 4, "device_waves_max_tokens": 0},
     "--expert-tier-device-waves-max-tokens must be >= 1, got 0"),
])
def test_invalid_settings_raise_naming_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExpertTierConfig(**kwargs)


def test_the_device_pager_runs_without_a_host_sync_up_to_its_wave_limit_or_one_full_wave():
    offload = ("--expert-tier", "cxl", "--expert-tier-slots", "32")
    config = config_from_namespace(parse(*offload))
    assert config.device_waves_max_tokens == 256 and config.unsynced_max_tokens(NUM_EXPERTS, TOP_K) == 256
    config = config_from_namespace(parse(*offload, "--expert-tier-device-waves-max-tokens", "2"))
    assert config.unsynced_max_tokens(NUM_EXPERTS, TOP_K) == 4  # 32 slots hold 4 tokens' experts in one wave
    with pytest.raises(ConfigError, match="this server pages on the host: drop it, or add --expert-tier-pager device"):
        config_from_namespace(parse(*offload, "--expert-tier-pager", "host", "--expert-tier-device-waves-max-tokens",
                                    "8"))
    with pytest.raises(ConfigError, match="pages no experts: drop it, or add --expert-tier dram"):
        config_from_namespace(parse("--expert-tier-device-waves-max-tokens", "8"))


def test_hbm_fraction_rounds_down_to_whole_slots():
    assert ExpertTierConfig(expert_tier=ExpertTier.CXL, hbm_fraction=0.3).resident_slots(NUM_EXPERTS, TOP_K) == 19


def test_slots_must_hold_one_token_and_leave_something_offloaded():
    with pytest.raises(ConfigError, match="use --expert-tier-slots 8 or more"):
        ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=TOP_K - 1).resident_slots(NUM_EXPERTS, TOP_K)
    with pytest.raises(ConfigError, match="nothing is offloaded"):
        ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=NUM_EXPERTS).resident_slots(NUM_EXPERTS, TOP_K)


def test_rdma_homes_are_refused_until_tiermem_has_them():
    problems = incompatibilities(ExpertTierConfig(expert_tier=ExpertTier.RDMA, slots=8), argparse.Namespace())
    assert problems == [("--expert-tier rdma: experts are copied to HBM by DMA from host memory, and tiermem has no "
                         "RDMA-peer expert home yet; use --expert-tier dram or cxl")]


def test_all_hbm_accepts_any_parallelism():
    assert incompatibilities(ExpertTierConfig(), argparse.Namespace(tp_size=8, enable_eplb=True)) == []
