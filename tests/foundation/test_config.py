"""Config parsing: sizes, unknown keys, enums, validation, TOML files."""

from __future__ import annotations

import pytest

from tiermem.config import parse_bytes
from tiermem.errors import ConfigError, RegistryError
from tiermem.manager import ManagerConfig, TierManager
from tiermem.tiers.cxl import CxlBacking


@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4KiB", 4096), ("1.5GB", 1_500_000_000), ("2 MiB", 2 << 20), ("7", 7), ("1gib", 1 << 30),
])
def test_sizes_parse_to_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "1.5 bytes", "-1", -5, "0.5B", True])
def test_unparsable_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_bytes(bad)


def test_tier_tables_parse_into_typed_frozen_configs():
    config = ManagerConfig.from_dict({"tiers": [
        {"kind": "cxl", "backing": "emulated", "capacity_bytes": "64MiB", "bandwidth_gbps": 30},
    ]})
    spec = config.tiers[0]
    assert spec.config.backing is CxlBacking.EMULATED
    assert spec.config.capacity_bytes == 64 << 20 and spec.config.bandwidth_gbps == 30.0
    with pytest.raises(AttributeError):
        spec.config.capacity_bytes = 1  # frozen


def test_unknown_keys_are_rejected_with_the_valid_ones_listed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['capacity'\]; valid keys are .*capacity_bytes"):
        ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1GiB"}]})


def test_unknown_tier_kind_lists_registered_kinds():
    with pytest.raises(RegistryError, match=r"unknown tier 'nvme'; registered: \['cxl', 'dram'"):
        ManagerConfig.from_dict({"tiers": [{"kind": "nvme", "capacity_bytes": 1}]})


def test_bad_enum_value_lists_choices():
    with pytest.raises(ConfigError, match=r"'optane' is not one of \['numa', 'devdax', 'emulated'\]"):
        ManagerConfig.from_dict({"tiers": [{"kind": "cxl", "backing": "optane", "capacity_bytes": 1}]})


def test_values_are_validated_not_corrected():
    with pytest.raises(ConfigError, match="alignment_bytes must be a power of two"):
        ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": 4096, "alignment_bytes": 100}]})
    with pytest.raises(ConfigError, match="needs numa_node"):
        ManagerConfig.from_dict({"tiers": [{"kind": "cxl", "backing": "numa", "capacity_bytes": 4096}]})
    with pytest.raises(ConfigError, match="expected int"):
        ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": 4096, "numa_node": "0"}]})


def test_duplicate_tier_names_are_rejected():
    with pytest.raises(ConfigError, match=r"repeated: \['dram'\]"):
        ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": 4096}] * 2})


def test_manager_loads_a_toml_file(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text(
        '[[tiers]]\nkind = "sim"\ncapacity_bytes = "1MiB"\nmodel_time = false\n'
        '[transfer]\nhost_threads = 1\n'
    )
    with TierManager.from_config(path) as tm:
        assert list(tm.tiers) == ["sim"] and tm.config.transfer.host_threads == 1
        assert ManagerConfig.from_dict(tm.config.to_dict()) == tm.config


def test_missing_or_malformed_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TierManager.from_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[tiers]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TierManager.from_config(bad)
