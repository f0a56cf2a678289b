"""RDMA peers: memory of another host, exported by a pool server and read one-sidedly by its clients.

| module    | what                                                                              |
|-----------|-----------------------------------------------------------------------------------|
| transport | Transport protocol (register, grant, attach, batched one-sided post), spans, config |
| inprocess | memcpy between endpoints of one process, with a NIC's access checks (tests)        |
| nixl      | NVIDIA NIXL over UCX: RDMA/GPUDirect on NICs, shared memory or TCP on one host     |
| verbs     | raw ibverbs through pyverbs (needs an RDMA device; none exists on this project's hosts) |
| backends  | ``make_transport(config, name)``                                                  |
| wire      | control channel: framing, mutual HMAC authentication, secrets                     |
| server    | ``PoolServer``: exports objects of local host tiers (``tiermem pool serve``)      |
| client    | ``PoolClient``: attach, directory, grants, async reads; fails fast when the server dies |
| source    | ``ReadRequest``, the ``ObjectSource`` protocol, ``TensorSource`` (a local copy)   |
| fallback  | ``FallbackReader``: first source that holds an object, the next one on failure   |
| bench     | ``measure_read_bandwidth`` with an honest path label (loopback is never RDMA)     |
| synthetic | objects with known bytes for benches and tests (``--synthetic COUNTxSIZE``)       |

The ``rdma`` tier (``tiermem.tiers.rdma``) is a ``PoolClient`` behind the Tier protocol. NIXL and
pyverbs are imported only when a transport that needs them is built.
"""

from tiermem.rdma.backends import make_transport
from tiermem.rdma.bench import measure_read_bandwidth
from tiermem.rdma.client import PoolClient, PoolClientConfig, PoolHandle
from tiermem.rdma.fallback import FallbackHandle, FallbackReader
from tiermem.rdma.server import PoolServer, PoolServerConfig
from tiermem.rdma.source import ObjectSource, ReadRequest, TensorSource, WriteRequest
from tiermem.rdma.transport import Operation, Span, Transfer, Transport, TransportConfig, TransportKind
from tiermem.rdma.wire import load_secret

__all__ = [
    "FallbackHandle", "FallbackReader", "ObjectSource", "Operation", "PoolClient", "PoolClientConfig", "PoolHandle",
    "PoolServer", "PoolServerConfig", "ReadRequest", "Span", "TensorSource", "Transfer", "Transport",
    "TransportConfig", "TransportKind", "WriteRequest", "load_secret", "make_transport", "measure_read_bandwidth",
]
