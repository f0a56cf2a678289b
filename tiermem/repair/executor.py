"""The repair executor: runs this rank's part of a ``RepairPlan`` and reports each expert as it lands.

Every live rank runs the same plan: it copies the moves whose destination it is and sends the bytes
of the moves whose sender it is. Local moves (the destination reads its own node's DRAM, CXL, the
pool or the checkpoint) go through the ``TierManager``'s transfer engine, all submitted at once so
that the links overlap; moves that cross ranks go through a ``PeerTransport`` on a named thread, in
plan order on every rank (the same global order on both ends of every pair, so blocking sends and
receives cannot deadlock). Serving continues meanwhile: before a slot is overwritten its old replica
is retired from routing, and as each copy lands the routing table switches that expert to its new
replica (one atomic swap). Progress events are delivered on the caller's thread, in landing order.

Design note (one move, as seen by the rank that runs ``run``):
| role on this rank      | how                                           | on landing                  |
|------------------------|-----------------------------------------------|-----------------------------|
| destination, local     | reader.read(move) -> manager.copy -> handle   | routing.restore, event      |
| destination, peer      | transport.recv into the slot (peer thread)    | routing.restore, event      |
| sender                 | transport.send(reader.read(move)) (peer thread)| counted in ``sent``         |
| neither                | nothing                                       |                             |
Reads from the checkpoint block the submitting thread (disk I/O), so local moves from memory are
submitted before local moves from disk. Other ranks learn of this rank's landings from the caller
(e.g. an all-reduce of landed experts before each serving step); only the owner may dispatch to a
slot whose copy it has not seen land.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from tiermem.errors import RepairError, TransferError
from tiermem.manager import TierManager
from tiermem.repair.fabric import Route
from tiermem.repair.planner import Move, RepairPlan
from tiermem.repair.routing import RoutingTable
from tiermem.transfer import TransferHandle

log = logging.getLogger("tiermem.repair")

_POLL_S = 50e-6


class SlotStore(Protocol):
    """This rank's expert slots (HBM on a GPU, host memory in CPU tests)."""

    def slot(self, layer: int, physical: int) -> torch.Tensor:
        """The uint8 bytes of one local physical slot of one layer."""
        ...


class SourceReader(Protocol):
    """Source bytes this rank can read itself: its node's host copies, the pool, the checkpoint, its HBM."""

    def read(self, move: Move) -> torch.Tensor:
        """A tensor holding ``move``'s expert bytes, valid until the move has landed."""
        ...


class PeerTransport(Protocol):
    """Point-to-point bytes between ranks (gloo on CPU, NCCL between GPUs, NIXL for RDMA)."""

    def send(self, tensor: torch.Tensor, dst_rank: int, *, timeout_s: float) -> None: ...

    def recv(self, tensor: torch.Tensor, src_rank: int, *, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class RepairEvent:
    """One move landed on this rank."""

    move: Move
    landed_s: float  # since run() started
    moves_done: int
    moves_total: int  # moves whose destination is this rank
    bytes_done: int


@dataclass(frozen=True)
class RepairReport:
    """What one rank did for one plan."""

    epoch: int
    rank: int
    landed: int
    sent: int
    nbytes: int  # bytes landed on this rank
    elapsed_s: float  # from run() to the last landing on this rank


class RepairExecutor:
    """Runs the moves of repair plans for one rank."""

    def __init__(self, manager: TierManager, rank: int, slots: SlotStore, reader: SourceReader,
                 routing: RoutingTable, transport: PeerTransport | None = None) -> None:
        self.manager = manager
        self.rank = rank
        self.slots = slots
        self.reader = reader
        self.routing = routing
        self.transport = transport

    def run(self, plan: RepairPlan, *, on_event: Callable[[RepairEvent], None] | None = None,
            timeout_s: float = 60.0) -> RepairReport:
        """Execute this rank's moves of ``plan``; returns when they landed, raises after ``timeout_s``."""
        if plan.epoch != self.routing.snapshot().epoch:
            raise RepairError(
                f"repair executor: rank {self.rank} got a plan for epoch {plan.epoch} but routes at epoch "
                f"{self.routing.snapshot().epoch}; re-plan for the current membership"
            )
        mine = [m for m in plan.moves if m.dst_rank == self.rank]
        peer = [m for m in plan.moves if m.route.crosses_ranks and self.rank in (m.dst_rank, m.sender_rank)]
        if peer and self.transport is None:
            raise RepairError(
                f"repair executor: rank {self.rank} takes part in {len(peer)} move(s) between ranks "
                f"({peer[0].route.value} first) but has no PeerTransport; pass one or plan without those routes"
            )
        start = time.perf_counter()
        deadline = start + timeout_s
        for move in mine:
            if move.evicts is not None:
                self.routing.retire(move.layer, move.dst_physical)
        local = sorted((m for m in mine if not m.route.crosses_ranks), key=lambda m: m.route is Route.DISK)
        pending: list[tuple[Move, TransferHandle]] = [(m, self._submit(m)) for m in local]
        landed: queue.SimpleQueue[Move | Exception] = queue.SimpleQueue()
        worker = None
        if peer:
            worker = threading.Thread(target=self._peer_moves, args=(peer, landed, deadline),
                                      name=f"tiermem-repair-peer-{self.rank}", daemon=True)
            worker.start()
        done, nbytes, sent = 0, 0, sum(1 for m in peer if m.sender_rank == self.rank)
        peer_left = sum(1 for m in peer if m.dst_rank == self.rank)
        while pending or peer_left:
            pending, arrived = _arrivals(pending, landed)
            peer_left -= sum(1 for m in arrived if m.route.crosses_ranks)
            for move in arrived:
                self.routing.restore(move.layer, move.expert, move.dst_physical, epoch=plan.epoch)
                done += 1
                nbytes += move.nbytes
                if on_event is not None:
                    on_event(RepairEvent(move, time.perf_counter() - start, done, len(mine), nbytes))
            if not arrived:
                if time.perf_counter() > deadline:
                    raise TransferError(
                        f"repair executor: rank {self.rank} still waits for {len(pending) + peer_left} of {len(mine)} "
                        f"move(s) after {timeout_s} s ({len(pending)} local copies, {peer_left} from peers); a source "
                        "tier or peer is stalled or gone: re-plan at the next epoch"
                    )
                time.sleep(_POLL_S)
        if worker is not None:
            worker.join(max(0.0, deadline - time.perf_counter()))
            if worker.is_alive():
                raise TransferError(
                    f"repair executor: rank {self.rank} still sends to peers after {timeout_s} s; a peer is stalled or "
                    "gone: re-plan at the next epoch"
                )
            _arrivals([], landed)  # raises a send's failure
        elapsed = time.perf_counter() - start
        log.info("repair epoch %d rank %d: %d move(s) landed (%d bytes), %d sent, in %.3f s",
                 plan.epoch, self.rank, done, nbytes, sent, elapsed)
        return RepairReport(plan.epoch, self.rank, done, sent, nbytes, elapsed)

    def _submit(self, move: Move) -> TransferHandle:
        source = self.reader.read(move)
        return self.manager.copy([(source, self.slots.slot(move.layer, move.dst_physical))])

    def _peer_moves(self, moves: list[Move], landed: queue.SimpleQueue, deadline: float) -> None:
        try:
            for move in moves:
                timeout_s = max(0.0, deadline - time.perf_counter())
                if move.dst_rank == self.rank:
                    self.transport.recv(self.slots.slot(move.layer, move.dst_physical), move.sender_rank,
                                        timeout_s=timeout_s)
                    landed.put(move)
                else:
                    self.transport.send(self.reader.read(move), move.dst_rank, timeout_s=timeout_s)
        except Exception as exc:  # handed to run(), which raises it on the caller's thread
            landed.put(exc)


Pending = list[tuple[Move, TransferHandle]]


def _arrivals(pending: Pending, landed: queue.SimpleQueue) -> tuple[Pending, list[Move]]:
    """Split ``pending`` local copies into still running and landed, and add the peer moves that landed.

    Raises the ``TransferError`` of a failed local copy, or the exception the peer thread handed over.
    """
    arrived, still = [], []
    for move, handle in pending:
        if handle.done():
            handle.wait()
            arrived.append(move)
        else:
            still.append((move, handle))
    while not landed.empty():
        item = landed.get()
        if isinstance(item, Exception):
            raise item
        arrived.append(item)
    return still, arrived
