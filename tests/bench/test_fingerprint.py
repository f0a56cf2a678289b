"""Environment facts read from files: driver version, THP mode, last-level cache, PCIe peak of a GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tiermem.bench import fingerprint
from tiermem.topology import discover

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sysfs"
GEN5_X16_GBPS = 63.008


@pytest.mark.parametrize("text", [
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 22 00:00:00 UTC 2025\n",
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n",
])
def test_driver_version_is_read_from_proc_for_both_kernel_modules(tmp_path, text):
    path = tmp_path / "version"
    path.write_text(text)
    assert fingerprint.nvidia_driver_version(path) == "570.86.15"


def test_missing_facts_are_none_not_guesses(tmp_path):
    assert fingerprint.nvidia_driver_version(tmp_path / "absent") is None
    assert fingerprint.transparent_hugepages(tmp_path / "absent") is None
    assert fingerprint.llc_bytes(tmp_path) is None
    assert fingerprint.cpu_model(tmp_path / "absent") is None


def test_thp_mode_is_the_bracketed_one(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert fingerprint.transparent_hugepages(path) == "madvise"


def test_llc_is_the_largest_cache_level(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "105M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert fingerprint.llc_bytes(tmp_path) == 105 << 20


def test_the_h100_vm_gpu_is_found_by_pci_address_and_has_a_gen5_x16_peak():
    topology = discover(FIXTURES / "h100_vm" / "sys", FIXTURES / "h100_vm" / "dev")
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0, pci_device_id=6)
    gpu = fingerprint.matching_gpu(topology, props, index=0)
    assert gpu.pci_address == "0000:00:06.0"
    assert fingerprint.pcie_facts(gpu)["theoretical_gbps"] == pytest.approx(GEN5_X16_GBPS)
    env = {"gpu": {"pcie": fingerprint.pcie_facts(gpu)}}
    assert fingerprint.theoretical_pcie_gbps(env) == pytest.approx(GEN5_X16_GBPS)


def test_the_id_is_stable_while_the_host_does_not_change():
    first = fingerprint.fingerprint_id(fingerprint.collect(discover(), [], device=None, cpu_node=None))
    touched = bytearray(64 << 20)  # memory use must not change the id (VM node sizes grow when touched)
    second = fingerprint.fingerprint_id(fingerprint.collect(discover(), [], device=None, cpu_node=None))
    assert first == second and len(touched) == 64 << 20
