"""Topology discovery on fixture trees (tests/fixtures/sysfs/<host>/{sys,dev}) and on the real host."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tiermem.cli import main
from tiermem.errors import TopologyError
from tiermem.topology import (
    CxlDevice,
    DaxDevice,
    Gpu,
    GpuVendor,
    MemoryTier,
    NumaNode,
    PcieLink,
    RdmaDevice,
    RdmaPort,
    discover,
    parse_id_list,
)
from tiermem.topology_render import format_id_list

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"
HOSTS = ("h100_vm", "two_socket", "two_socket_cxl", "devdax")
GIB = 2**30
GEN4_X16 = PcieLink(speed_gts=16.0, width=16)
GEN5_X16 = PcieLink(speed_gts=32.0, width=16)


def fixture(name: str):
    return discover(FIXTURES / name / "sys", FIXTURES / name / "dev")


def test_h100_vm_has_one_node_one_gen5_gpu_of_unknown_numa_node_and_no_memory_devices():
    topology = fixture("h100_vm")
    assert topology.nodes == (NumaNode(0, tuple(range(16)), 128 * GIB, 120 * GIB, {0: 10}),)
    assert topology.memory_tiers == (MemoryTier(4, (0,)),)
    assert topology.gpus == (Gpu("0000:00:06.0", GpuVendor.NVIDIA, "0x2331", None, GEN5_X16, GEN5_X16),)
    assert topology.gpu_numa_node(0) is None
    assert (topology.cxl_devices, topology.dax_devices, topology.rdma_devices) == ((), (), ())
    assert topology.cxl_candidate_nodes() == ()
    assert topology.vm.is_vm and "kvm-clock" in topology.vm.evidence


def test_two_socket_places_each_gpu_on_its_socket_and_skips_non_gpu_functions():
    topology = fixture("two_socket")
    assert [(n.node_id, n.cpus, dict(n.distances)) for n in topology.nodes] == [
        (0, (*range(8), *range(16, 24)), {0: 10, 1: 21}),
        (1, (*range(8, 16), *range(24, 32)), {0: 21, 1: 10}),
    ]
    assert topology.memory_tiers == (MemoryTier(4, (0, 1)),)
    # 0000:17:00.1 is the NVIDIA audio function (class 0x0403): not a GPU.
    assert topology.gpus == (
        Gpu("0000:17:00.0", GpuVendor.NVIDIA, "0x20b5", 0, GEN4_X16, GEN4_X16),
        Gpu("0000:ca:00.0", GpuVendor.AMD, "0x740c", 1, PcieLink(2.5, 8), GEN4_X16),
    )
    assert [topology.gpu_numa_node(i) for i in range(2)] == [0, 1]
    assert topology.rdma_devices == (RdmaDevice("mlx5_0", 1, (RdmaPort(1, "ACTIVE", 200.0, "InfiniBand"),)),)
    assert not topology.vm.is_vm


def test_cpu_less_node_with_memory_is_the_only_cxl_candidate_and_sits_in_a_slower_tier():
    topology = fixture("two_socket_cxl")
    cxl_node = topology.node(2)
    assert cxl_node == NumaNode(2, (), 64 * GIB, 64 * GIB, {0: 24, 1: 24, 2: 10})
    assert not cxl_node.has_cpus and cxl_node.is_cxl_candidate
    assert topology.cxl_candidate_nodes() == (cxl_node,)
    assert topology.memory_tiers == (MemoryTier(4, (0, 1)), MemoryTier(22, (2,)))
    assert topology.cxl_devices == (
        CxlDevice("decoder0.0", None, None, None),
        CxlDevice("mem0", ram_size_bytes=64 * GIB, pmem_size_bytes=0, numa_node=0),
        CxlDevice("region0", None, None, None),
        CxlDevice("root0", None, None, None),
    )


def test_devdax_device_reports_size_target_node_and_its_character_device():
    topology = fixture("devdax")
    assert topology.nodes == (NumaNode(0, (0, 1, 2, 3), 32 * GIB, 30 * GIB, {0: 10}),)
    assert topology.dax_devices == (DaxDevice("dax0.0", 16 * GIB, 1, 0, char_device_present=True),)
    without_dev = discover(FIXTURES / "devdax" / "sys", FIXTURES / "devdax" / "no-such-dev")
    assert not without_dev.dax_devices[0].char_device_present


@pytest.mark.parametrize("text, ids", [("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)), ("2\n", (2,)), ("\n", ())])
def test_id_lists_parse_and_format_back_to_kernel_form(text, ids):
    assert parse_id_list(text) == ids
    assert format_id_list(ids) == text.strip()


@pytest.mark.parametrize("bad", ["3-1", "a", "0-", "-1"])
def test_malformed_id_list_raises_value_error(bad):
    with pytest.raises(ValueError):
        parse_id_list(bad)


@pytest.mark.parametrize("speed_gts, width, generation, bandwidth_gbps", [
    (2.5, 1, 1, 0.25), (5.0, 4, 2, 2.0), (8.0, 16, 3, 15.76), (16.0, 16, 4, 31.504),
    (32.0, 16, 5, 63.008), (64.0, 16, 6, 121.008), (20.0, 16, None, None),
])
def test_pcie_generation_and_bandwidth_follow_per_lane_rates(speed_gts, width, generation, bandwidth_gbps):
    link = PcieLink(speed_gts, width)
    assert (link.generation, link.bandwidth_gbps) == (generation, bandwidth_gbps)


def test_missing_node_error_names_it_and_lists_existing_nodes():
    with pytest.raises(TopologyError, match=r"NUMA node 7 does not exist.*existing nodes: 0, 1"):
        fixture("two_socket").node(7)


def test_gpu_index_past_the_last_gpu_raises():
    with pytest.raises(TopologyError, match=r"GPU index 1 requested but 1 GPU\(s\) found"):
        fixture("h100_vm").gpu_numa_node(1)


def test_missing_sysfs_root_raises_topology_error(tmp_path):
    with pytest.raises(TopologyError, match="does not exist"):
        discover(tmp_path / "absent")


def test_malformed_items_are_skipped_with_a_warning_and_the_rest_is_kept(tmp_path, caplog):
    sysfs = shutil.copytree(FIXTURES / "two_socket" / "sys", tmp_path / "sys")
    (sysfs / "devices/system/node/node1/cpulist").write_text("8-x\n")
    (sysfs / "bus/pci/devices/0000:ca:00.0/current_link_speed").write_text("fast\n")
    with caplog.at_level(logging.WARNING, logger="tiermem.topology"):
        topology = discover(sysfs, tmp_path / "dev")
    assert [n.node_id for n in topology.nodes] == [0]
    assert [g.pci_address for g in topology.gpus] == ["0000:17:00.0"]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert "NUMA node" in skipped[0] and "node1" in skipped[0]
    assert "0000:ca:00.0" in skipped[1] and "fast" in skipped[1]


@pytest.mark.parametrize("sys_vendor, product_name, is_vm", [
    ("QEMU", "Standard PC (Q35 + ICH9, 2009)", True),
    ("Amazon EC2", "p5.48xlarge", True),
    ("Amazon EC2", "m7i.metal-48xl", False),
    ("Dell Inc.", "PowerEdge XE9680", False),
])
def test_dmi_strings_decide_the_vm_guess(tmp_path, sys_vendor, product_name, is_vm):
    (tmp_path / "class/dmi/id").mkdir(parents=True)
    (tmp_path / "class/dmi/id/sys_vendor").write_text(sys_vendor + "\n")
    (tmp_path / "class/dmi/id/product_name").write_text(product_name + "\n")
    assert discover(tmp_path).vm.is_vm is is_vm


@pytest.mark.parametrize("host", HOSTS)
def test_to_dict_survives_a_json_round_trip_with_derived_fields(host):
    as_dict = fixture(host).to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert {"has_cpus", "is_cxl_candidate", "distances"} <= as_dict["nodes"][0].keys()


def test_to_dict_carries_link_generation_bandwidth_and_unknown_numa_as_null():
    gpu = fixture("h100_vm").to_dict()["gpus"][0]
    assert gpu["numa_node"] is None and gpu["vendor"] == "0x10de"
    assert gpu["max_link"] == {"speed_gts": 32.0, "width": 16, "generation": 5, "bandwidth_gbps": 63.008}


def test_real_host_discovery_finds_at_least_one_node_with_memory():
    topology = discover()
    assert topology.nodes and all(node.memory_total_bytes > 0 for node in topology.nodes)
    json.dumps(topology.to_dict())


def topo(host: str, *flags: str) -> int:
    root = FIXTURES / host
    return main(["topo", "--sysfs-root", str(root / "sys"), "--dev-root", str(root / "dev"), *flags])


def test_topo_cli_json_output_is_the_topology_dict(capsys):
    assert topo("two_socket_cxl", "--json") == 0
    assert json.loads(capsys.readouterr().out) == fixture("two_socket_cxl").to_dict()


def test_topo_cli_tables_show_every_section(capsys):
    assert topo("two_socket_cxl") == 0
    out = capsys.readouterr().out
    for expected in ("NUMA nodes", "candidate", "Memory tiers", "0000:ca:00.0", "Gen1 x8", "Gen4 x16",
                     "mem0", "64.0 GiB", "devdax devices: none found", "mlx5_0", "200 Gb/s"):
        assert expected in out


def test_topo_cli_reports_a_missing_root_without_a_traceback(capsys):
    assert topo("no_such_host") == 2
    captured = capsys.readouterr()
    assert "sysfs root" in captured.err and "Traceback" not in captured.err + captured.out


@pytest.mark.gpu
def test_real_host_lists_every_visible_cuda_device_as_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert len(discover().gpus) >= torch.cuda.device_count()
