"""Kill one EP rank's process and time how fast the survivor restores full coverage from its host copies.

Two rank processes (one GPU each on a 2-GPU host, or both on GPU 0) hold DeepSeek-V3-sized experts
(fp8, 44,040,192 bytes each) in HBM slots: ``--experts`` home experts per layer per rank plus as many
spare slots. Rank 0's host tiers hold a copy of every expert of rank 1, half in the ``dram`` tier and
half in the ``cxl`` tier (emulated by DRAM unless this host has CXL memory: then every figure says
``emulated``). Rank 0 first measures the raw link: a plain pinned ``copy_`` of exactly those bytes into
its spare slots, on one stream (median of ``--trials``). Then the script SIGKILLs rank 1; rank 0
detects it by heartbeat, agrees on the new membership, plans the repair and runs it with the
``RepairExecutor`` over the ``TierManager``'s transfer engine. Time to full coverage runs from the
agreed failure to the last expert landed (membership, routing, planning and copies included); it
must be within 1.2x of bytes / measured bandwidth. Every restored slot is checked byte for byte.

Run on the GPU machine (either kind; < 2 minutes):
    python bench/repair_gpu.py --out bench/results/<device>/repair
Logic check on a CPU (tiny sizes, host copies; the ratio means nothing there):
    python bench/repair_gpu.py --out /tmp/repair-smoke --device cpu --layers 2 --expert-bytes 1MiB
Run from the repository root with ``PYTHONPATH=.`` unless tiermem is installed. Writes
``<out>/repair_gpu.jsonl``: an ``env`` record, a ``raw_copy`` record and a ``repair`` record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiermem.config import parse_bytes
from tiermem.manager import TierManager
from tiermem.repair import (
    BackupMap,
    BackupTier,
    EpPlacement,
    FabricConfig,
    FailureDetector,
    Heartbeat,
    HostCopy,
    Membership,
    RepairExecutor,
    RoutingTable,
    Sources,
    TensorSlots,
    TieredReader,
    agree_on_failures,
    plan_repair,
)
from tiermem.types import LinkProfile

FP8_EXPERT_BYTES = 3 * 7168 * 2048
RATIO_LIMIT = 1.2
HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S = 0.02, 0.5
WAIT_S = 240.0
SURVIVOR, DOOMED = 0, 1


def pattern(layer: int, expert: int, experts_per_layer: int) -> int:
    """The byte every position of one expert holds: distinct per expert, never 0 (0 is the poison)."""
    return (layer * experts_per_layer + expert) % 251 + 1


class Deployment:
    """What both ranks agree on: the placement and which host tier holds each of rank 1's experts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.layers, self.home = args.layers, args.experts
        self.experts = 2 * self.home  # per layer, over 2 ranks
        self.expert_bytes = args.expert_bytes
        self.placement = EpPlacement.contiguous(num_layers=self.layers, num_logical_experts=self.experts, num_ranks=2,
                                                slots_per_rank=2 * self.home)
        lost = [(layer, e) for layer in range(self.layers) for e in range(self.home, self.experts)]
        self.tier_of = {key: ("dram" if i % 2 == 0 else "cxl") for i, key in enumerate(lost)}
        copies = [[() for _ in range(self.experts)] for _ in range(self.layers)]
        for (layer, expert), tier in self.tier_of.items():
            copies[layer][expert] = (HostCopy(BackupTier.DRAM if tier == "dram" else BackupTier.CXL, 0),)
        self.backups = BackupMap(tuple(tuple(row) for row in copies), checkpoint_on_disk=False)


def device_for(rank: int, kind: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_home_slots(deployment: Deployment, slots: TensorSlots, rank: int) -> None:
    for layer in range(deployment.layers):
        for local, expert in enumerate(deployment.placement.experts_on(layer, rank)):
            if expert is not None:
                slots.slot(layer, deployment.placement.physical(rank, local)).fill_(
                    pattern(layer, expert, deployment.experts))


def raw_copy_gbps(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Plain ``copy_`` of every pair on one side stream, timed from the first enqueue to the stream's end."""
    nbytes = sum(src.numel() for src, _ in pairs)
    synchronize(device)
    started = time.perf_counter()
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
        stream.synchronize()
    else:
        for src, dst in pairs:
            dst.copy_(src)
    return nbytes / (time.perf_counter() - started) / 1e9


def survivor(args: argparse.Namespace, store: dist.Store, device: torch.device) -> dict:
    deployment = Deployment(args)
    half = sum(t == "dram" for t in deployment.tier_of.values()) * deployment.expert_bytes
    tier_bytes = half + (64 << 20)
    manager = TierManager.from_config({"tiers": [
        {"kind": "dram", "capacity_bytes": tier_bytes},
        {"kind": "cxl", "backing": "emulated", "capacity_bytes": tier_bytes},
    ]})
    emulated = manager.tier("cxl").emulated
    host = {}
    for (layer, expert), tier in deployment.tier_of.items():
        copy = manager.empty(deployment.expert_bytes, tier=tier)
        copy.fill_(pattern(layer, expert, deployment.experts))
        host[(layer, expert)] = copy
    table = torch.zeros(deployment.layers, 2 * deployment.home, deployment.expert_bytes, dtype=torch.uint8,
                        device=device)
    slots = TensorSlots(table, rank=SURVIVOR, slots_per_rank=2 * deployment.home)
    fill_home_slots(deployment, slots, SURVIVOR)
    spare = [slots.slot(layer, deployment.placement.physical(SURVIVOR, deployment.home + i))
             for layer, i in ((layer, i) for layer in range(deployment.layers) for i in range(deployment.home))]
    sources = [host[key] for key in sorted(host)]
    raw_copy_gbps(list(zip(sources, spare)), device)  # warm-up: first touch, lazy CUDA and allocator setup
    manager.copy([(sources[0], spare[0])]).wait()  # the engine's streams exist, as in a serving process
    raw = [raw_copy_gbps(list(zip(sources, spare)), device) for _ in range(args.trials)]
    per_tier = {tier: raw_copy_gbps([(host[k], spare[i]) for i, k in enumerate(sorted(host))
                                     if deployment.tier_of[k] == tier], device) for tier in ("dram", "cxl")}
    for slot in spare:
        slot.zero_()  # poison: only the repair can put the patterns back
    synchronize(device)
    measured_gbps = statistics.median(raw)

    membership = Membership(2)
    routing = RoutingTable(deployment.placement, range(2), membership.epoch)  # the serving table of epoch 0
    heartbeat = Heartbeat(store, SURVIVOR, interval_s=HEARTBEAT_INTERVAL_S)
    detector = FailureDetector(store, (SURVIVOR, DOOMED), timeout_s=HEARTBEAT_TIMEOUT_S)
    store.set("ready/0", "1")
    store.wait(["killed"], datetime.timedelta(seconds=WAIT_S))
    killed_at = float(store.get("killed"))
    suspected = frozenset()
    while not suspected:
        time.sleep(HEARTBEAT_INTERVAL_S / 2)
        suspected = detector.poll()
    detected_at = time.time()
    failed = agree_on_failures(store, membership.epoch, suspected)

    started = time.perf_counter()
    epoch = membership.mark_failed_many(failed, expected_epoch=0)
    view = membership.view()
    routing.rebuild(deployment.placement, view.live_ranks, epoch)
    # The survivor's own PCIe link, as just measured: the planner's model of this run.
    fabric = FabricConfig(gpus_per_node=2, pcie=LinkProfile(measured_gbps, 10.0), cxl=LinkProfile(per_tier["cxl"], 0.0))
    plan = plan_repair(deployment.placement, view, fabric, Sources(deployment.backups),
                       expert_bytes=deployment.expert_bytes)
    planned = time.perf_counter()
    reader = TieredReader(host=host)
    report = RepairExecutor(manager, SURVIVOR, slots, reader, routing).run(plan, timeout_s=120.0)
    synchronize(device)
    coverage_s = time.perf_counter() - started
    heartbeat.close()

    wrong = [(m.layer, m.expert) for m in plan.moves
             if not bool((slots.slot(m.layer, m.dst_physical) == pattern(m.layer, m.expert, deployment.experts)).all())]
    gaps_left = sum(len(routing.snapshot().gaps(layer)) for layer in range(deployment.layers))
    ideal_s = plan.nbytes / (measured_gbps * 1e9)
    manager.close()
    return {
        "record": "repair", "device": str(device), "emulated_cxl": emulated, "layers": deployment.layers,
        "lost_experts": len(plan.moves), "expert_bytes": deployment.expert_bytes, "bytes": plan.nbytes,
        "bytes_by_route": {r.value: n for r, n in plan.bytes_by_route().items()}, "unfilled": len(plan.unfilled),
        "raw_gbps_trials": raw, "raw_gbps": measured_gbps, "raw_gbps_by_tier": per_tier,
        "detect_s": detected_at - killed_at, "plan_s": planned - started, "transfer_s": report.elapsed_s,
        "coverage_s": coverage_s, "ideal_s": ideal_s, "ratio": coverage_s / ideal_s,
        "transfer_ratio": report.elapsed_s / ideal_s, "modelled_s": plan.makespan_s,
        "achieved_gbps": plan.nbytes / coverage_s / 1e9, "verified": not wrong and gaps_left == 0,
        "wrong_slots": wrong[:8], "gaps_left": gaps_left, "limit": RATIO_LIMIT,
        "passed": not wrong and gaps_left == 0 and coverage_s / ideal_s <= RATIO_LIMIT,
    }


def doomed(args: argparse.Namespace, store: dist.Store, device: torch.device) -> None:
    deployment = Deployment(args)
    table = torch.zeros(deployment.layers, 2 * deployment.home, deployment.expert_bytes, dtype=torch.uint8,
                        device=device)
    fill_home_slots(deployment, TensorSlots(table, rank=DOOMED, slots_per_rank=2 * deployment.home), DOOMED)
    synchronize(device)
    heartbeat = Heartbeat(store, DOOMED, interval_s=HEARTBEAT_INTERVAL_S)
    store.set("ready/1", "1")
    time.sleep(WAIT_S)  # killed here by the parent
    heartbeat.close()
    raise TimeoutError("rank 1 was never killed")


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=WAIT_S))
    try:
        device = device_for(rank, args.device)
        if rank == SURVIVOR:
            store.set("result/0", json.dumps(survivor(args, store, device)))
        else:
            doomed(args, store, device)
    except Exception:
        store.set(f"error/{rank}", traceback.format_exc())
        raise


def wait(store: dist.Store, key: str, processes: dict[int, mp.Process]) -> None:
    """Wait for ``key``; fail at once if one of ``processes`` (rank -> process) reported an error or died."""
    deadline = time.monotonic() + WAIT_S
    while not store.check([key]):
        for rank, process in processes.items():
            if store.check([f"error/{rank}"]):
                raise RuntimeError(f"rank {rank} failed:\n{store.get(f'error/{rank}').decode()}")
            if not process.is_alive():
                raise RuntimeError(f"rank {rank} exited with code {process.exitcode} before {key!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {key!r} after {WAIT_S} s")
        time.sleep(0.01)


def env_record(args: argparse.Namespace) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device == "cuda" else []
    return {"record": "env", "command": " ".join(sys.argv), "host": platform.node(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": gpus, "ranks_share_a_gpu": args.device == "cuda" and len(gpus) < 2,
            "time": datetime.datetime.now(datetime.UTC).isoformat()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for repair_gpu.jsonl")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    parser.add_argument("--experts", type=int, default=4, help="home experts per rank and layer")
    parser.add_argument("--expert-bytes", type=lambda v: parse_bytes(v, what="--expert-bytes"),
                        default=FP8_EXPERT_BYTES, help="bytes per expert (default: DeepSeek-V3 fp8, 44,040,192)")
    parser.add_argument("--trials", type=int, default=3, help="raw-copy measurements (median)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu for a logic check")
    args.out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=WAIT_S))
    context = mp.get_context("spawn")
    processes = [context.Process(target=rank_main, args=(rank, args, store.port), daemon=True) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        ranks = dict(enumerate(processes))
        wait(store, "ready/0", ranks)
        wait(store, "ready/1", ranks)
        store.set("killed", repr(time.time()))
        os.kill(processes[DOOMED].pid, signal.SIGKILL)
        wait(store, "result/0", {SURVIVOR: processes[SURVIVOR]})
        result = json.loads(store.get("result/0"))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    path = args.out / "repair_gpu.jsonl"
    with path.open("w") as out:
        for record in (env_record(args), {"record": "raw_copy", "gbps_trials": result["raw_gbps_trials"],
                                          "gbps": result["raw_gbps"], "gbps_by_tier": result["raw_gbps_by_tier"],
                                          "emulated_cxl": result["emulated_cxl"]}, result):
            out.write(json.dumps(record) + "\n")
    print(f"{result['lost_experts']} experts ({result['bytes'] / 1e9:.2f} GB) restored in "
          f"{result['coverage_s'] * 1e3:.1f} ms "
          f"(plan {result['plan_s'] * 1e3:.1f} ms + copies {result['transfer_s'] * 1e3:.1f} ms); bytes / raw "
          f"{result['raw_gbps']:.1f} GB/s = {result['ideal_s'] * 1e3:.1f} ms; ratio {result['ratio']:.3f} "
          f"(limit {RATIO_LIMIT}); detection {result['detect_s'] * 1e3:.0f} ms; verified {result['verified']}; "
          f"{'PASS' if result['passed'] else 'FAIL'} -> {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
