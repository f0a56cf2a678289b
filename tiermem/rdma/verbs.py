"""``verbs``: raw ibverbs through pyverbs: one RC queue pair per peer, RDMA READ/WRITE work requests.

Status, stated plainly: no machine this project runs on has an RDMA device (no ``/sys/class/infiniband``,
and the kernel cannot load soft-RoCE), so this backend has never moved a byte here. Its tests cover the
refusal path only: without ``pyverbs``, or where ``get_device_list()`` finds no device, constructing it
raises ``TopologyError`` naming what is missing. Use the ``nixl`` transport (which reaches RDMA NICs
through UCX) unless raw verbs are what you need.

What it gives that NIXL 1.5 does not: read-only exports are registered without
``IBV_ACCESS_REMOTE_WRITE``, so the NIC itself refuses a peer's write; and every memory key covers
exactly one registered object, so the NIC refuses reads outside it.

Connection: ``hello()`` creates a queue pair and returns its address (LID, GID, QP number, PSN); the
server's ``accept`` creates its own queue pair for that client and moves it to RTS; the grant carries
the server's address and the (address, length, rkey) of each granted object, and ``attach`` moves the
client's queue pair to RTS. GPU memory can be registered where the NIC supports peer memory
(nvidia-peermem).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import random
import threading
from types import ModuleType
from typing import Any, Sequence

import torch

from tiermem.errors import TopologyError, TransferError
from tiermem.rdma.transport import (
    Operation, PollingHandle, Registration, Span, Transfer, TransportConfig, TransportHandle, TransportKind,
    check_granted, completed_handle,
)

log = logging.getLogger("tiermem.rdma")

MAX_WR_BYTES = 1 << 30  # one work request moves at most this much (RC messages are limited to 2 GiB)
MAX_RD_ATOMIC = 16  # RDMA READs in flight per queue pair, capped by the device
_IDS = itertools.count(1)


def load_pyverbs() -> dict[str, ModuleType]:
    """The pyverbs modules this backend uses; TopologyError when pyverbs is not installed."""
    names = ("addr", "cq", "device", "enums", "mr", "pd", "qp", "wr", "pyverbs_error")
    try:
        return {n: importlib.import_module(f"pyverbs.{n}") for n in names}
    except ImportError as exc:
        raise TopologyError(
            f"rdma verbs transport: pyverbs is not importable ({exc}); it ships with rdma-core (Debian: "
            "python3-pyverbs). Or use transport 'nixl', which reaches RDMA NICs through UCX"
        ) from None


class VerbsTransport:
    """RC queue pairs on one RDMA device port."""

    kind = TransportKind.VERBS

    def __init__(self, name: str, config: TransportConfig) -> None:
        v = load_pyverbs()
        self._v = v
        try:
            devices = v["device"].get_device_list()
        except v["pyverbs_error"].PyverbsError as exc:
            raise TopologyError(f"rdma verbs transport: no RDMA device exists on this host ({exc}); "
                                "use transport 'nixl' (shared memory or TCP here)") from None
        names = [d.name.decode() for d in devices]
        if not names or (config.verbs_device is not None and config.verbs_device not in names):
            raise TopologyError(f"rdma verbs transport: RDMA device {config.verbs_device or '(any)'} not found; "
                                f"this host has {names or 'none'}")
        device = config.verbs_device or names[0]
        e = v["enums"]
        self._e = e
        self.name = f"{name}-{device}-{next(_IDS)}"
        self._config = config
        self._ctx = v["device"].Context(name=device)
        self._pd = v["pd"].PD(self._ctx)
        self._cq = v["cq"].CQ(self._ctx, 4 * config.verbs_max_outstanding, None, None, 0)
        self._port = self._ctx.query_port(config.verbs_port)
        self._gid = self._ctx.query_gid(config.verbs_port, config.verbs_gid_index).gid
        self._rd_atomic = min(MAX_RD_ATOMIC, self._ctx.query_device().max_qp_rd_atom)
        self._lock = threading.Lock()
        self._mrs: list[Registration] = []
        self._pending_qps: dict[int, tuple[Any, int]] = {}  # qp_num -> (QP in INIT, psn), awaiting attach
        self._peers: dict[str, tuple[Any, list[tuple[Span, int, bool]]]] = {}  # peer -> (QP, granted spans)
        self._accepted: dict[str, tuple[dict[str, Any], int]] = {}  # server side: peer -> (its address, our PSN)
        self._batches: dict[int, _VerbsBatch] = {}  # wr_id -> batch
        self._closed = False

    def register(self, tensor: torch.Tensor, *, writable: bool = False) -> Registration:
        span = Span.of(tensor)
        e = self._e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | (e.IBV_ACCESS_REMOTE_WRITE if writable else 0)
        try:
            mr = self._v["mr"].MR(self._pd, span.nbytes, access, address=span.address)
        except self._v["pyverbs_error"].PyverbsError as exc:
            raise TransferError(f"rdma verbs transport: registering {span} failed: {exc}") from None
        registration = Registration(span, writable, tensor, mr)
        with self._lock:
            self._mrs.append(registration)
        return registration

    def deregister(self, registration: Registration) -> None:
        with self._lock:
            self._mrs = [r for r in self._mrs if r is not registration]
        registration.backend.close()

    def hello(self) -> bytes:
        qp, psn = self._new_qp()
        with self._lock:
            self._pending_qps[qp.qp_num] = (qp, psn)
        return json.dumps(self._address(qp, psn)).encode()

    def accept(self, hello: bytes) -> str:
        remote = json.loads(hello)
        qp, psn = self._new_qp()
        self._to_rts(qp, psn, remote)
        peer = f"verbs-peer-{remote['qpn']}-{next(_IDS)}"
        with self._lock:
            self._peers[peer] = (qp, [])
            self._accepted[peer] = (remote, psn)
        return peer

    def export(self, registrations: Sequence[Registration], peer: str) -> bytes:
        with self._lock:
            qp, _ = self._peers[peer]
            remote, psn = self._accepted[peer]
        spans = [[*r.span.to_wire(), r.backend.rkey, r.writable] for r in registrations]
        return json.dumps({"endpoint": self._address(qp, psn), "for_qpn": remote["qpn"], "spans": spans}).encode()

    def attach(self, grant: bytes) -> str:
        body = json.loads(grant)
        peer = f"verbs-{body['endpoint']['gid']}-{body['endpoint']['qpn']}"
        with self._lock:
            pending = self._pending_qps.pop(body["for_qpn"], None)
        if pending is not None:
            qp, psn = pending
            self._to_rts(qp, psn, body["endpoint"])
            with self._lock:
                self._peers[peer] = (qp, [])
        with self._lock:
            if peer not in self._peers:
                raise TransferError(f"rdma verbs transport: grant from {peer} names no queue pair of ours")
            self._peers[peer][1].extend((Span.from_wire(s[:4]), int(s[4]), bool(s[5])) for s in body["spans"])
        return peer

    def detach(self, peer: str) -> None:
        with self._lock:
            entry = self._peers.pop(peer, None)
            self._accepted.pop(peer, None)
        if entry is not None:
            entry[0].close()

    def post(self, operation: Operation, peer: str, transfers: Sequence[Transfer]) -> TransportHandle:
        if not transfers:
            return completed_handle(0)
        with self._lock:
            if self._closed or peer not in self._peers:
                raise TransferError(f"rdma verbs transport: peer {peer!r} is not attached (or the transport closed)")
            qp, granted = self._peers[peer]
            mrs = list(self._mrs)
        requests = []
        for transfer in transfers:
            rkey = _granted_key(granted, transfer.remote, operation, peer)
            local = next((r.backend for r in mrs if r.span.covers(transfer.local)), None)
            if local is None:
                raise TransferError(f"rdma verbs transport: local span {transfer.local} is not registered")
            for offset in range(0, transfer.local.nbytes, MAX_WR_BYTES):
                size = min(MAX_WR_BYTES, transfer.local.nbytes - offset)
                requests.append((transfer.local.address + offset, size, local.lkey, rkey,
                                 transfer.remote.address + offset))
        batch = _VerbsBatch(self, qp, operation, requests, peer)
        batch.post_more()
        return PollingHandle(batch.nbytes, batch.poll, lambda: self.detach(peer), f"verbs {operation.value}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            qps = [qp for qp, _ in self._peers.values()] + [qp for qp, _ in self._pending_qps.values()]
            mrs, self._mrs = self._mrs, []
            self._peers.clear()
            self._accepted.clear()
            self._pending_qps.clear()
        for resource in [*qps, *(r.backend for r in mrs), self._cq, self._pd, self._ctx]:
            resource.close()

    def _new_qp(self) -> tuple[Any, int]:
        v, e = self._v, self._e
        cap = v["qp"].QPCap(max_send_wr=self._config.verbs_max_outstanding, max_recv_wr=1,
                            max_send_sge=1, max_recv_sge=1)
        init = v["qp"].QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap)
        attr = v["qp"].QPAttr(port_num=self._config.verbs_port)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        return v["qp"].QP(self._pd, init, attr), random.getrandbits(24)

    def _address(self, qp: Any, psn: int) -> dict[str, Any]:
        return {"lid": self._port.lid, "gid": self._gid, "qpn": qp.qp_num, "psn": psn}

    def _to_rts(self, qp: Any, psn: int, remote: dict[str, Any]) -> None:
        v = self._v
        attr = v["qp"].QPAttr(port_num=self._config.verbs_port)
        attr.path_mtu = self._port.active_mtu
        attr.dest_qp_num = remote["qpn"]
        attr.rq_psn = remote["psn"]
        attr.sq_psn = psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = self._rd_atomic
        attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7
        route = v["addr"].GlobalRoute(dgid=v["addr"].GID(remote["gid"]), sgid_index=self._config.verbs_gid_index)
        attr.ah_attr = v["addr"].AHAttr(port_num=self._config.verbs_port, is_global=1, gr=route, dlid=remote["lid"])
        qp.to_rts(attr)

    def _poll_cq(self) -> None:
        """Hand every completion on the shared CQ to the batch that posted it."""
        with self._lock:
            count, completions = self._cq.poll(self._config.verbs_max_outstanding)
            for wc in completions[:count]:
                batch = self._batches.pop(wc.wr_id, None)
                if batch is not None:
                    batch.completed(wc.status == self._e.IBV_WC_SUCCESS, wc.status)


class _VerbsBatch:
    """Work requests of one ``post``: at most ``verbs_max_outstanding`` in flight at a time."""

    def __init__(self, transport: VerbsTransport, qp: Any, operation: Operation,
                 requests: list[tuple[int, int, int, int, int]], peer: str) -> None:
        self._t = transport
        self._qp = qp
        self._opcode = transport._e.IBV_WR_RDMA_READ if operation is Operation.READ else \
            transport._e.IBV_WR_RDMA_WRITE
        self._todo = requests
        self._in_flight = 0
        self._failure: str | None = None
        self._peer = peer
        self.nbytes = sum(r[1] for r in requests)

    def post_more(self) -> None:
        v, e = self._t._v, self._t._e
        while self._todo and self._in_flight < self._t._config.verbs_max_outstanding:
            local_address, size, lkey, rkey, remote_address = self._todo.pop()
            wr_id = next(_IDS)
            wr = v["wr"].SendWR(wr_id=wr_id, opcode=self._opcode, num_sge=1,
                                sg=[v["wr"].SGE(local_address, size, lkey)], send_flags=e.IBV_SEND_SIGNALED)
            wr.set_wr_rdma(rkey, remote_address)
            with self._t._lock:
                self._t._batches[wr_id] = self
            try:
                self._qp.post_send(wr)
            except v["pyverbs_error"].PyverbsError as exc:
                raise TransferError(f"rdma verbs transport: posting to {self._peer} failed: {exc}") from None
            self._in_flight += 1

    def completed(self, ok: bool, status: int) -> None:
        self._in_flight -= 1
        if not ok and self._failure is None:
            self._failure = f"work completion status {status}"

    def poll(self) -> bool:
        self._t._poll_cq()
        if self._failure is not None:
            raise TransferError(f"rdma verbs transport: a {self.nbytes}-byte transfer with {self._peer} failed "
                                f"({self._failure}); the peer died or refused access")
        self.post_more()
        return not self._todo and self._in_flight == 0


def _granted_key(granted: list[tuple[Span, int, bool]], span: Span, operation: Operation, peer: str) -> int:
    """The rkey of a grant covering ``span`` (writable for a WRITE); TransferError when none does."""
    check_granted("rdma verbs transport", peer, operation, span, [(region, w) for region, _, w in granted])
    return next(rkey for region, rkey, writable in granted
                if region.covers(span) and (writable or operation is Operation.READ))
