"""One EP rank of the multi-process repair test (imported by the spawned processes, not collected).

Each rank holds its home experts in slots (a CPU tensor standing in for HBM), a ring backup of the
next rank's hottest experts in a tiermem DRAM tier, and reads the checkpoint for the rest. Every
step, all ranks draw the same tokens and routing, each computes the experts it owns, and an
all-reduce of per-(token, top-k) outputs (exactly one non-zero contributor each, so the sum is exact)
gives every rank the layer output, compared bit for bit with a reference computed from the
checkpoint under the same routing snapshot. Rank ``DOOMED`` parks after ``STEPS_BEFORE_KILL`` steps
and is killed by the test; the survivors detect it by heartbeat, agree on the new membership through
the store, re-form gloo groups, serve degraded steps, plan and run the repair in a background thread,
learn each other's landings by all-reduce before every step, and serve until coverage is full.
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tiermem.experts.checkpoint import CheckpointExperts
from tiermem.manager import TierManager
from tiermem.repair import (
    BackupPolicyConfig,
    BackupScope,
    EpPlacement,
    FabricConfig,
    FailureDetector,
    GroupTransport,
    Heartbeat,
    Membership,
    RepairExecutor,
    RoutingTable,
    Sources,
    TensorSlots,
    TieredReader,
    agree_on_failures,
    plan_backup,
    plan_repair,
)
from tiermem.types import LinkProfile

WORLD_SIZE = 3
DOOMED = 1
NUM_LAYERS, NUM_EXPERTS, SLOTS_PER_RANK = 2, 6, 4  # 2 home experts per rank, 2 spare slots
HIDDEN, INTERMEDIATE, TOKENS, TOP_K = 16, 8, 12, 2
STEPS_BEFORE_KILL = 3
FULL_STEPS_AFTER_REPAIR = 2
GROUP_TIMEOUT_S = 5.0
HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S = 0.05, 1.0
DEADLINE_S = 45.0
# One rank per node. Layer 0 is hotter, so the ring backup in DRAM holds layer 0's experts and layer
# 1's come from the checkpoint. Profiles make the best plan split layer 0 between a local PCIe copy and
# an RDMA read from the backup holder, so the run exercises the peer transport too.
FABRIC = FabricConfig(gpus_per_node=1, pcie=LinkProfile(1.0, 0.0), nic=LinkProfile(1.0, 0.0),
                      host_nic=LinkProfile(1.0, 0.0), disk=LinkProfile(0.5, 0.0))
LOAD = [[10.0] * NUM_EXPERTS, [1.0] * NUM_EXPERTS]


def expert_forward(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ tensors["gate"].T) * (x @ tensors["up"].T)) @ tensors["down"].T


def step_inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    probs = torch.softmax(torch.randn(TOKENS, NUM_EXPERTS, generator=generator), dim=-1)
    weights, ids = torch.topk(probs, TOP_K, dim=-1)
    return x, ids, weights / weights.sum(dim=-1, keepdim=True)


class Rank:
    def __init__(self, rank: int, store: dist.Store, checkpoint_path: str) -> None:
        self.rank, self.store = rank, store
        self.checkpoint = CheckpointExperts(checkpoint_path)
        self.layout = self.checkpoint.layout
        self.home = EpPlacement.contiguous(num_layers=NUM_LAYERS, num_logical_experts=NUM_EXPERTS,
                                           num_ranks=WORLD_SIZE, slots_per_rank=SLOTS_PER_RANK)
        self.membership = Membership(WORLD_SIZE)
        self.manager = TierManager.from_config({"tiers": [{"kind": "dram", "capacity_bytes": "1MiB",
                                                           "arena_bytes": "256KiB"}]})
        self.slots = TensorSlots(torch.zeros(NUM_LAYERS, SLOTS_PER_RANK, self.layout.block_bytes, dtype=torch.uint8),
                                 rank=rank, slots_per_rank=SLOTS_PER_RANK)
        for layer in range(NUM_LAYERS):
            for local, expert in enumerate(self.home.experts_on(layer, rank)):
                if expert is not None:
                    self.layout.pack_into(self.checkpoint.tensors(layer, expert),
                                          self.slots.slot(layer, self.home.physical(rank, local)))
        policy = BackupPolicyConfig(dram_bytes_per_node=2 * self.layout.block_bytes, scope=BackupScope.NEXT_NODE)
        self.backups = plan_backup(self.home, FABRIC, policy, expert_bytes=self.layout.block_bytes, expert_load=LOAD)
        host = {}
        for layer in range(NUM_LAYERS):
            for expert in range(NUM_EXPERTS):
                if any(c.node == rank for c in self.backups.holders(layer, expert)):
                    copy = self.manager.empty(self.layout.block_bytes, tier="dram")
                    self.layout.pack_into(self.checkpoint.tensors(layer, expert), copy)
                    host[(layer, expert)] = copy
        self.reader = TieredReader(host=host, checkpoint=self.checkpoint, manager=self.manager, staging_tier="dram",
                                   slots=self.slots)
        self.reference = {(layer, e): self.checkpoint.tensors(layer, e)
                          for layer in range(NUM_LAYERS) for e in range(NUM_EXPERTS)}
        self.serving = RoutingTable(self.home, range(WORLD_SIZE), epoch=0)  # agreed by all ranks every step
        self.landed_here = RoutingTable(self.home, range(WORLD_SIZE), epoch=0)  # the executor's own table
        self.group = self._group("serve", 0, range(WORLD_SIZE))

    def _group(self, name: str, epoch: int, members) -> dist.ProcessGroup:
        members = sorted(members)
        return dist.ProcessGroupGloo(dist.PrefixStore(f"{name}/{epoch}/", self.store), members.index(self.rank),
                                     len(members), datetime.timedelta(seconds=GROUP_TIMEOUT_S))

    def serve_step(self, step: int) -> int:
        """One step of every layer; returns the gaps it served around. Raises RuntimeError if a peer is gone."""
        x, ids, weights = step_inputs(step)
        snapshot = self.serving.snapshot()
        gaps = 0
        for layer in range(NUM_LAYERS):
            physical, routed = snapshot.route(layer, ids, weights)
            outputs = torch.zeros(TOKENS, TOP_K, HIDDEN)
            for p in sorted(set(physical.flatten().tolist()) - {-1}):
                if self.home.rank_of(p) == self.rank:
                    mine = physical == p
                    tensors = self.layout.views(self.slots.slot(layer, p))
                    outputs[mine] = expert_forward(tensors, x).unsqueeze(1).expand(-1, TOP_K, -1)[mine]
            self.group.allreduce([outputs]).wait()
            y = (routed.unsqueeze(-1) * outputs).sum(dim=1)
            expected = torch.zeros(TOKENS, TOP_K, HIDDEN)
            for t in range(TOKENS):
                for k in range(TOP_K):
                    if physical[t, k] >= 0:
                        full = expert_forward(self.reference[(layer, int(ids[t, k]))], x)
                        expected[t, k] = full[t]
            if not torch.equal(y, (routed.unsqueeze(-1) * expected).sum(dim=1)):
                raise AssertionError(f"rank {self.rank} step {step} layer {layer}: output differs from the reference")
            if (physical < 0).any():
                gaps += int((physical < 0).sum())
            elif not torch.equal(routed, weights):
                raise AssertionError("full coverage must serve the router's own weights")
        return gaps

    def sync_landings(self, landed: queue.SimpleQueue, epoch: int, finished: bool) -> int:
        """All-reduce the experts landed on this rank (physical slot + 1 per (layer, expert)) and whether its
        executor finished; apply everyone's landings and return how many executors have finished."""
        mine = torch.zeros(NUM_LAYERS * NUM_EXPERTS + 1, dtype=torch.int64)
        while not landed.empty():
            event = landed.get()
            mine[event.move.layer * NUM_EXPERTS + event.move.expert] = event.move.dst_physical + 1
        mine[-1] = int(finished)
        self.group.allreduce([mine]).wait()
        snapshot = self.serving.snapshot()
        for index in torch.nonzero(mine[:-1]).flatten().tolist():
            layer, expert = divmod(index, NUM_EXPERTS)
            if int(snapshot.dispatch[layer][expert]) < 0:
                self.serving.restore(layer, expert, int(mine[index]) - 1, epoch=epoch)
        return int(mine[-1])

    def recover(self, report: dict) -> tuple[int, list[int], dist.ProcessGroup]:
        """Detect the dead rank by heartbeat, agree on the new epoch, re-form the groups, drop the gaps."""
        failed_at = time.monotonic()
        detector = self.detector
        suspected = frozenset()
        while not suspected:
            if time.monotonic() - failed_at > 10 * HEARTBEAT_TIMEOUT_S:
                raise TimeoutError(f"rank {self.rank}: a collective failed but no heartbeat went stale")
            time.sleep(HEARTBEAT_INTERVAL_S)
            suspected = detector.poll()
        report["detect_s"] = time.monotonic() - failed_at
        view = self.membership.view()
        failed = agree_on_failures(self.store, view.epoch, suspected)
        epoch = self.membership.mark_failed_many(failed, expected_epoch=view.epoch)
        view = self.membership.view()
        live = sorted(view.live_ranks)
        self.group = self._group("serve", epoch, live)
        repair_group = self._group("repair", epoch, live)
        self.serving.rebuild(self.home, live, epoch)
        self.landed_here.rebuild(self.home, live, epoch)
        report["failed"] = sorted(failed)
        report["epoch"] = epoch
        return epoch, live, repair_group

    def run(self) -> dict:
        heartbeat = Heartbeat(self.store, self.rank, interval_s=HEARTBEAT_INTERVAL_S)
        self.detector = FailureDetector(self.store, range(WORLD_SIZE), timeout_s=HEARTBEAT_TIMEOUT_S)
        report: dict = {"rank": self.rank, "full_steps": 0, "degraded_steps": 0}
        step = 0
        try:
            while True:
                if self.rank == DOOMED and step == STEPS_BEFORE_KILL:
                    self.store.set(f"parked/{self.rank}", "1")
                    time.sleep(DEADLINE_S)  # the test kills this process here
                    raise TimeoutError("the doomed rank was never killed")
                try:
                    self.serve_step(step)
                except RuntimeError:  # a peer left in the middle of the step: recover, then redo the step
                    break
                report["full_steps"] += 1
                step += 1
            epoch, live, repair_group = self.recover(report)
            self.serve_degraded_then_repair(step, epoch, live, repair_group, report)
        finally:
            heartbeat.close()
        return report

    def serve_degraded_then_repair(self, step: int, epoch: int, live, repair_group, report: dict) -> None:
        report["degraded_steps"] += self.serve_step(step) > 0  # before any copy: the gaps are served around
        step += 1
        view = self.membership.view()
        started = time.monotonic()
        plan = plan_repair(self.home, view, FABRIC, Sources(self.backups, failed_hosts=frozenset(report["failed"])),
                           expert_bytes=self.layout.block_bytes, expert_load=LOAD)
        report["plan"] = [[m.layer, m.expert, m.dst_rank, m.route.value, m.sender_rank] for m in plan.moves]
        report["plan_optimal"] = plan.optimal
        executor = RepairExecutor(self.manager, self.rank, self.slots, self.reader, self.landed_here,
                                  GroupTransport(repair_group, {r: i for i, r in enumerate(live)}))
        landed: queue.SimpleQueue = queue.SimpleQueue()
        outcome: list = []

        def repair() -> None:
            try:
                outcome.append(executor.run(plan, on_event=landed.put, timeout_s=20.0))
            except Exception as exc:  # reported by the serving loop
                outcome.append(exc)

        worker = threading.Thread(target=repair, name=f"repair-{self.rank}")
        worker.start()
        while True:
            if time.monotonic() - started > 30.0:
                raise TimeoutError(f"rank {self.rank}: coverage not restored within 30 s")
            all_finished = self.sync_landings(landed, epoch, finished=not worker.is_alive()) == len(live)
            gaps = self.serve_step(step)
            step += 1
            report["degraded_steps"] += gaps > 0
            if all_finished:  # every executor is done and its landings applied: the same decision on every rank
                break
        worker.join(timeout=5.0)
        if outcome and isinstance(outcome[0], Exception):
            raise outcome[0]
        report["repair_s"] = time.monotonic() - started
        report["gaps_left"] = sum(len(self.serving.snapshot().gaps(layer)) for layer in range(NUM_LAYERS))
        report["landed_here"] = outcome[0].landed
        report["sent_here"] = outcome[0].sent
        for _ in range(FULL_STEPS_AFTER_REPAIR):
            if self.serve_step(step):
                raise AssertionError("a gap reappeared after the repair")
            step += 1
            report["full_steps"] += 1
        self.reader.close()


def rank_main(rank: int, store_port: int, checkpoint_path: str) -> None:
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=DEADLINE_S))
    try:
        report = Rank(rank, store, checkpoint_path).run()
        store.set(f"result/{rank}", json.dumps(report))
    except BaseException:
        store.set(f"error/{rank}", traceback.format_exc())
        raise
