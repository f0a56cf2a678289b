"""The TierManager allocator API, placement on NUMA nodes, and the errors users can trigger."""

from __future__ import annotations

import time

import pytest
import torch

from tiermem import numa
from tiermem.errors import CapacityError, InjectedFault, OwnershipError, RegistryError, TopologyError, TransferError
from tiermem.manager import TierManager

SIM_BANDWIDTH_GBPS = 1.0
SIM_LATENCY_US = 2000.0


def test_empty_returns_a_typed_view_of_tier_memory_without_copies(manager):
    tensor = manager.empty((3, 5), torch.float32, tier="cxl")
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float32
    tier, block = manager.block_of(tensor)
    assert tier.name == "cxl" and block.tensor.data_ptr() == tensor.data_ptr()
    tensor.fill_(1.5)
    assert torch.all(block.tensor.view(torch.float32)[:15] == 1.5)


def test_to_copies_bytes_between_tiers_and_leaves_the_source(manager):
    source = manager.empty(1000, torch.int64, tier="dram")
    source.copy_(torch.arange(1000))
    moved = manager.to(source, "cxl")
    assert manager.tier_of(moved).name == "cxl" and manager.tier_of(source).name == "dram"
    assert torch.equal(moved, torch.arange(1000))


def test_stats_account_every_tier_and_bytes_moved(manager):
    tensor = manager.empty(4096, tier="dram")
    manager.to(tensor, "sim")
    stats = manager.stats()
    used = {s.name: s.used_bytes for s in stats["tiers"]}
    assert used == {"dram": 4096, "cxl": 0, "sim": 4096}
    assert stats["transfer"]["h2h_bytes"] == 4096
    assert {s.name: s.emulated for s in stats["tiers"]} == {"dram": False, "cxl": True, "sim": False}


def test_free_releases_bytes_and_a_second_free_is_refused(manager):
    tensor = manager.empty(10_000, tier="dram")
    manager.free(tensor)
    assert manager.tier("dram").used_bytes == 0
    with pytest.raises(OwnershipError, match="double free"):
        manager.free(tensor)


def test_tensors_not_owned_by_tiermem_are_refused(manager):
    with pytest.raises(OwnershipError, match="not owned by tiermem"):
        manager.free(torch.zeros(10))


def test_unknown_tier_names_the_tiers_that_exist(manager):
    with pytest.raises(RegistryError, match=r"unknown tier 'hbm'; this manager has \['cxl', 'dram', 'sim'\]"):
        manager.empty(10, tier="hbm")


def test_capacity_error_does_not_corrupt_accounting(manager):
    kept = manager.empty(1 << 20, tier="dram")
    with pytest.raises(CapacityError, match=r"tier 'dram': cannot allocate 4\.0 MiB"):
        manager.empty(4 << 20, tier="dram")
    assert manager.tier("dram").used_bytes == 1 << 20
    manager.free(kept)


@pytest.mark.skipif(not numa.available(), reason="libnuma not available")
def test_dram_pages_are_placed_on_the_requested_node():
    with TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": "8MiB", "numa_node": 0}]}) as tm:
        tensor = tm.empty(8 << 20, tier="dram")
        assert set(numa.page_nodes(tensor.data_ptr(), tensor.numel())) == {0}


def test_a_numa_node_that_does_not_exist_fails_at_start_up():
    missing = 1 + max(numa.nodes()) if numa.available() else 1
    with pytest.raises(TopologyError, match=f"node {missing} does not exist"):
        TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": 4096, "numa_node": missing}]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_asked_for_but_absent_fails_at_start_up():
    with pytest.raises(TopologyError, match="CUDA is not available"):
        TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": 4096, "register_cuda": "always"}]})
    with pytest.raises(TopologyError, match="hbm tier needs CUDA"):
        TierManager.from_config({"tiers": [{"kind": "hbm", "capacity_bytes": 4096}]})


def test_a_failing_tier_closes_the_tiers_built_before_it():
    with pytest.raises(TopologyError):
        TierManager.from_config({"tiers": [
            {"kind": "sim", "capacity_bytes": 4096},
            {"kind": "dram", "capacity_bytes": 4096, "numa_node": 4096},
        ]})


def test_sim_tier_transfers_take_the_modelled_time():
    config = {"tiers": [
        {"kind": "dram", "capacity_bytes": "1MiB"},
        {"kind": "sim", "capacity_bytes": "1MiB", "bandwidth_gbps": SIM_BANDWIDTH_GBPS, "latency_us": SIM_LATENCY_US},
    ]}
    with TierManager.from_config(config) as tm:
        source = tm.empty(1 << 20, tier="dram")
        start = time.perf_counter()
        tm.to(source, "sim")
        elapsed_s = time.perf_counter() - start
    modelled_s = SIM_LATENCY_US * 1e-6 + (1 << 20) / (SIM_BANDWIDTH_GBPS * 1e9)
    assert elapsed_s >= modelled_s


def test_faulty_tier_injects_io_and_allocation_failures():
    config = {"tiers": [
        {"kind": "dram", "capacity_bytes": "1MiB"},
        {"kind": "faulty", "name": "flaky", "io_failure_probability": 1.0, "fail_allocations_after": 2,
         "inner": {"kind": "sim", "capacity_bytes": "1MiB", "model_time": False}},
    ]}
    with TierManager.from_config(config) as tm:
        source = tm.empty(4096, tier="dram")
        destination = tm.empty(4096, tier="flaky")
        with pytest.raises(InjectedFault, match="injected I/O failure"):
            tm.copy([(source, destination)]).wait()
        with pytest.raises(InjectedFault):
            tm.to(source, "flaky")  # the second allocation succeeds, the copy fails and is undone
        assert tm.tier("flaky").used_bytes == 4096
        with pytest.raises(CapacityError, match="injected allocation failure after 2"):
            tm.empty(4096, tier="flaky")


def test_a_transfer_that_outlives_its_timeout_raises():
    config = {"tiers": [
        {"kind": "dram", "capacity_bytes": "1MiB"},
        {"kind": "faulty", "name": "slow", "io_delay_us": 300_000.0,
         "inner": {"kind": "sim", "capacity_bytes": "1MiB", "model_time": False}},
    ]}
    with TierManager.from_config(config) as tm:
        handle = tm.copy([(tm.empty(4096, tier="dram"), tm.empty(4096, tier="slow"))])
        with pytest.raises(TransferError, match="did not complete within 0.01 s"):
            handle.wait(timeout_s=0.01)
        handle.wait()
        assert handle.done()


def test_closed_manager_refuses_work_and_close_is_idempotent(manager):
    manager.close()
    manager.close()
    with pytest.raises(OwnershipError, match="closed"):
        manager.empty(10, tier="dram")
