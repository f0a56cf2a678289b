"""``nixl``: the transport through NVIDIA NIXL over UCX (RDMA and GPUDirect on NICs; shared memory or TCP
on one host).

Where bytes go: UCX picks the path from ``UCX_TLS`` in the environment (read when the agent is created):
on one host without a NIC the default is shared memory (CMA), ``UCX_TLS=tcp`` forces TCP; figures
measured that way are loopback figures, never RDMA figures.

Why a client can read only what was exported (the bounds argument):
1. the pool server registers every object as its own NIXL registration, exactly the object's bytes
   (page-aligned, zero-padded arena blocks), and registers nothing else;
2. a grant is ``get_partial_agent_metadata`` of exactly the registrations of the objects the server
   bounds-checked for this client, so the client never holds metadata (UCX rkeys) for anything else;
3. NIXL refuses, at ``initialize_xfer``, any remote descriptor not covered by a loaded registration
   (``NIXL_ERR_NOT_FOUND``; ``tests/rdma`` shows it for a span one byte past an object), and tiermem's
   client checks bounds against the directory before it posts;
4. on a NIC the memory key of a registration only covers that registration, so even a client that
   bypasses tiermem and NIXL cannot read around it. On one host, shared memory is only bounded by the
   OS: processes of the same user may read each other's memory anyway.
Read-only exports: NIXL 1.5 registers memory with UCX's default remote read *and write* access and
offers no per-registration flag, so ``writable=False`` is enforced by the pool protocol and the client
library (no write grant is issued, ``post(WRITE)`` is refused), not by the NIC. The ``verbs`` transport
registers read-only exports without remote-write access, which the NIC enforces.

Threads: the agent runs in NIXL's strict thread-sync mode (safe from several threads) without NIXL's
busy-polling progress thread. Initiators progress UCX when they poll a handle; a pool server sets
``progress_interval_us`` (200 us) so that a named thread progresses it for TCP peers (shared memory
and RDMA reads need no target-side progress).
"""

from __future__ import annotations

import base64
import importlib
import itertools
import json
import logging
import os
import socket
import threading
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch

from tiermem.errors import TopologyError, TransferError
from tiermem.rdma.transport import (
    MemoryKind, Operation, PollingHandle, Registration, Span, Transfer, TransportConfig, TransportHandle,
    TransportKind, check_granted, completed_handle,
)

log = logging.getLogger("tiermem.rdma")

NIXL_MODULES = ("nixl", "nixl_cu13", "nixl_cu12")
INSTALL_HINT = "pip install tiermem[rdma] (or: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)"
_MEMORY = {MemoryKind.HOST: "DRAM", MemoryKind.GPU: "VRAM"}
_NAMES = itertools.count()


def load_nixl() -> ModuleType:
    """The NIXL Python API: the ``nixl`` meta package, else a CUDA-specific wheel installed alone."""
    failures = []
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
    raise TopologyError(f"rdma nixl transport: NIXL is not importable ({'; '.join(failures)}); {INSTALL_HINT}")


def nixl_available() -> bool:
    """True when the NIXL Python API imports here (tests skip the NIXL path otherwise)."""
    try:
        load_nixl()
    except TopologyError:
        return False
    return True


class NixlTransport:
    """One NIXL agent with the UCX backend."""

    kind = TransportKind.NIXL

    def __init__(self, name: str, config: TransportConfig | None = None) -> None:
        config = config or TransportConfig(kind=TransportKind.NIXL)
        nixl = load_nixl()
        self.name = f"{name}-{socket.gethostname()}-{os.getpid()}-{next(_NAMES)}"
        agent_config = nixl.nixl_agent_config(
            enable_prog_thread=False, backends=[],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent = nixl.nixl_agent(self.name, agent_config)
            self._agent.create_backend("UCX")
        except Exception as exc:  # a RuntimeError or nixlBackendError from the binding
            raise TopologyError(
                f"rdma nixl transport: creating the UCX backend failed ({type(exc).__name__}: {exc}); "
                f"UCX_TLS={os.environ.get('UCX_TLS')!r}. Unset UCX_TLS, or name transports UCX accepts on "
                "its own (e.g. 'tcp'; 'sm,self' alone fails here)"
            ) from None
        self._lock = threading.Lock()
        self._peers: dict[str, Any] = {}  # peer name -> name as NIXL returned it
        self._grants: dict[str, list[tuple[Span, bool]]] = {}  # peer -> spans it granted us, writable
        self._batches: set[_Batch] = set()
        self._closed = False
        self._stop = threading.Event()
        self._progress = None
        if config.progress_interval_us > 0:
            self._progress = threading.Thread(
                target=self._progress_loop, args=(config.progress_interval_us * 1e-6,),
                name="tiermem-nixl-progress", daemon=True,
            )
            self._progress.start()
        log.info("rdma: NIXL agent %s ready (UCX_TLS=%s)", self.name, os.environ.get("UCX_TLS", "default"))

    def register(self, tensor: torch.Tensor, *, writable: bool = False) -> Registration:
        span = Span.of(tensor)
        self._check_open()
        try:
            descs = self._agent.register_memory([(span.address, span.nbytes, span.device, "")],
                                                _MEMORY[span.memory], backends=["UCX"])
        except Exception as exc:
            raise TransferError(f"rdma nixl transport: registering {span} failed: {type(exc).__name__}: {exc}") \
                from None
        return Registration(span, writable, tensor, descs)

    def deregister(self, registration: Registration) -> None:
        if not self._closed:
            self._agent.deregister_memory(registration.backend, backends=["UCX"])

    def hello(self) -> bytes:
        return self.name.encode()

    def accept(self, hello: bytes) -> str:
        return hello.decode(errors="replace")  # reads are one-sided: the server needs nothing from the client

    def export(self, registrations: Sequence[Registration], peer: str) -> bytes:
        self._check_open()
        blobs = []
        for memory in MemoryKind:
            spans = [(r.span.address, r.span.nbytes, r.span.device, "") for r in registrations
                     if r.span.memory is memory]
            if not spans:
                continue
            descs = self._agent.get_reg_descs(spans, _MEMORY[memory])
            try:
                metadata = self._agent.get_partial_agent_metadata(descs, True, ["UCX"])
            except Exception as exc:
                raise TransferError(f"rdma nixl transport: exporting {len(spans)} spans to {peer!r} failed "
                                    f"({type(exc).__name__}: {exc}); every exported span must be registered "
                                    "exactly as it is exported") from None
            blobs.append(base64.b64encode(metadata).decode())
        spans = [[*r.span.to_wire(), r.writable] for r in registrations]
        return json.dumps({"agent": self.name, "metadata": blobs, "spans": spans}).encode()

    def attach(self, grant: bytes) -> str:
        self._check_open()
        body = json.loads(grant)
        for blob in body["metadata"]:
            try:
                loaded = self._agent.add_remote_agent(base64.b64decode(blob))
            except Exception as exc:
                raise TransferError(f"rdma nixl transport: loading the grant of {body['agent']!r} failed "
                                    f"({type(exc).__name__}: {exc}); the peer may run another NIXL version") \
                    from None
            with self._lock:
                self._peers[body["agent"]] = loaded
        with self._lock:
            self._grants.setdefault(body["agent"], []).extend(
                (Span.from_wire(s[:4]), bool(s[4])) for s in body["spans"])
        return body["agent"]

    def detach(self, peer: str) -> None:
        with self._lock:
            loaded = self._peers.pop(peer, None)
            self._grants.pop(peer, None)
        if loaded is not None and not self._closed:
            try:
                self._agent.remove_remote_agent(loaded)
            except Exception as exc:
                log.debug("rdma: removing NIXL peer %s: %s", peer, exc)

    def post(self, operation: Operation, peer: str, transfers: Sequence[Transfer]) -> TransportHandle:
        self._check_open()
        with self._lock:
            remote_name = self._peers.get(peer)
            granted = list(self._grants.get(peer, ()))
        if remote_name is None:
            raise TransferError(f"rdma nixl transport: no grant from peer {peer!r} is loaded (detached or never "
                                "attached); attach the pool again")
        for transfer in transfers:  # NIXL checks reads too; writes into read-only grants only tiermem refuses
            check_granted("rdma nixl transport", peer, operation, transfer.remote, granted)
        if not transfers:
            return completed_handle(0)
        groups: dict[tuple[MemoryKind, MemoryKind], list[Transfer]] = {}
        for transfer in transfers:
            groups.setdefault((transfer.local.memory, transfer.remote.memory), []).append(transfer)
        batch = _Batch(self, peer, operation)
        try:
            for (local_memory, remote_memory), group in groups.items():
                local = self._agent.get_xfer_descs(_descs(t.local for t in group), _MEMORY[local_memory])
                remote = self._agent.get_xfer_descs(_descs(t.remote for t in group), _MEMORY[remote_memory])
                batch.start(local, remote, remote_name, sum(t.local.nbytes for t in group))
        except TransferError:
            batch.abort()
            raise
        with self._lock:
            self._batches.add(batch)
        return PollingHandle(batch.nbytes, batch.poll, batch.abort, f"nixl {operation.value} from {peer!r}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            batches = list(self._batches)
        self._stop.set()
        if self._progress is not None:
            self._progress.join()
        for batch in batches:
            try:
                batch.abort()
            except TransferError as exc:
                log.error("%s", exc)
        self._peers.clear()
        self._agent = None  # the NIXL agent releases its registrations when destroyed

    def _forget(self, batch: "_Batch") -> None:
        with self._lock:
            self._batches.discard(batch)

    def _progress_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self._agent.get_new_notifs()
            except Exception as exc:  # a peer went away; transfers report it through their handles
                log.debug("rdma: NIXL progress: %s", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"rdma nixl transport {self.name!r} is closed")


class _Batch:
    """The NIXL transfer requests of one ``post``; polled and aborted under one lock."""

    def __init__(self, transport: NixlTransport, peer: str, operation: Operation) -> None:
        self._transport = transport
        self._agent = transport._agent
        self._peer = peer
        self._operation = operation
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self.nbytes = 0

    def start(self, local: Any, remote: Any, remote_name: Any, nbytes: int) -> None:
        op = "READ" if self._operation is Operation.READ else "WRITE"
        try:
            handle = self._agent.initialize_xfer(op, local, remote, remote_name)
        except Exception as exc:
            raise TransferError(
                f"rdma nixl transport: NIXL refused a {nbytes}-byte {self._operation.value} with peer "
                f"{self._peer!r} ({type(exc).__name__}: {exc}); a remote span outside what the peer granted, or "
                "a local span that is not registered, is refused (NIXL_ERR_NOT_FOUND)"
            ) from None
        self._pending.append(handle)
        self.nbytes += nbytes
        if self._agent.transfer(handle) == "ERR":
            raise TransferError(f"rdma nixl transport: posting a {nbytes}-byte {self._operation.value} to "
                                f"{self._peer!r} failed at once; the peer may be gone")

    def poll(self) -> bool:
        with self._lock:
            still = []
            for handle in self._pending:
                try:
                    state = self._agent.check_xfer_state(handle)
                except Exception as exc:  # nixlRemoteDisconnectError and friends
                    self._fail(f"{type(exc).__name__}: {exc}")
                if state == "ERR":
                    self._fail("NIXL reported ERR")
                if state == "DONE":
                    handle.release()
                else:
                    still.append(handle)
            self._pending = still
        if not still:
            self._transport._forget(self)
        return not still

    def abort(self) -> None:
        """Cancel what is in flight; if NIXL cannot, disconnect the peer, which ends every transfer with it."""
        with self._lock:
            pending, self._pending = self._pending, []
        stuck = 0
        for handle in pending:
            try:
                handle.release()
            except Exception:
                self._transport.detach(self._peer)
                try:
                    handle.release()
                except Exception:
                    stuck += 1
        self._transport._forget(self)
        if stuck:
            raise TransferError(
                f"rdma nixl transport: {stuck} transfer(s) with peer {self._peer!r} could not be cancelled even "
                "after disconnecting it; their destination buffers may still be written, so do not reuse them"
            )

    def _fail(self, cause: str) -> None:
        pending, self._pending = self._pending, []
        for handle in pending:
            try:
                handle.release()
            except Exception as exc:
                log.debug("rdma: releasing a failed NIXL transfer: %s", exc)
        self._transport._forget(self)
        raise TransferError(
            f"rdma nixl transport: a {self.nbytes}-byte {self._operation.value} with peer {self._peer!r} failed "
            f"({cause}); the pool server died or the link broke. Read the object from another tier that holds "
            "a copy (FallbackReader)"
        )


def _descs(spans: Any) -> np.ndarray:
    return np.array([(s.address, s.nbytes, s.device) for s in spans], dtype=np.uint64).reshape(-1, 3)
