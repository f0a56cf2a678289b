"""Three EP ranks as processes over gloo: one is SIGKILLed, the survivors restore coverage and keep answering.

The worker (``ep_worker``) checks every step's output bit for bit against a reference; this test
checks what the survivors report: they detected the failure by heartbeat, agreed on epoch 1, served
degraded steps, repaired over a local copy, an RDMA-style peer read and the checkpoint, and ended
with no gap. The store lives in this process, so it outlives every rank; every wait is bounded.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time

import ep_worker
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from repair_helpers import write_checkpoint

WAIT_S = 50.0


@pytest.mark.timeout(90)
def test_survivors_of_a_killed_rank_restore_every_expert_and_keep_answering(tmp_path):
    checkpoint = tmp_path / "experts.safetensors"
    write_checkpoint(checkpoint, num_layers=ep_worker.NUM_LAYERS, num_experts=ep_worker.NUM_EXPERTS,
                     hidden=ep_worker.HIDDEN, intermediate=ep_worker.INTERMEDIATE, seed=11)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=WAIT_S))
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "tiermem.repair", "ep_worker"])
    processes = [context.Process(target=ep_worker.rank_main, args=(rank, store.port, str(checkpoint)), daemon=True)
                 for rank in range(ep_worker.WORLD_SIZE)]
    for process in processes:
        process.start()
    try:
        doomed = ep_worker.DOOMED
        survivors = [r for r in range(ep_worker.WORLD_SIZE) if r != doomed]
        wait_for_keys(store, [f"parked/{doomed}"], processes)
        os.kill(processes[doomed].pid, signal.SIGKILL)
        wait_for_keys(store, [f"result/{r}" for r in survivors], processes)
        reports = [json.loads(store.get(f"result/{r}")) for r in survivors]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert processes[doomed].exitcode == -signal.SIGKILL
    assert [p.exitcode for r, p in enumerate(processes) if r != doomed] == [0] * len(survivors)
    plan = reports[0]["plan"]
    assert all(report["plan"] == plan for report in reports), "every survivor must compute the same plan"
    for report in reports:
        assert report["failed"] == [doomed] and report["epoch"] == 1
        assert report["full_steps"] == ep_worker.STEPS_BEFORE_KILL + ep_worker.FULL_STEPS_AFTER_REPAIR
        assert report["degraded_steps"] >= 1 and report["gaps_left"] == 0
        assert report["detect_s"] < 5 * ep_worker.HEARTBEAT_TIMEOUT_S
    lost = {(layer, e) for layer in range(ep_worker.NUM_LAYERS) for e in (2, 3)}  # rank 1's home experts
    assert {(layer, e) for layer, e, *_ in plan} == lost and len(plan) == len(lost)
    assert {route for *_, route, _ in plan} == {"local_dram", "rdma_dram", "disk"}
    assert sum(r["landed_here"] for r in reports) == len(plan) and sum(r["sent_here"] for r in reports) == 1


def wait_for_keys(store: dist.TCPStore, keys: list[str], processes) -> None:
    """Wait for ``keys``; fail at once with the worker's traceback if a rank reports an error or dies."""
    deadline = time.monotonic() + WAIT_S
    while not store.check(keys):
        errors = [key for key in (f"error/{r}" for r in range(len(processes))) if store.check([key])]
        if errors:
            pytest.fail(store.get(errors[0]).decode())
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {keys}; exit codes {[p.exitcode for p in processes]}")
        time.sleep(0.05)
