"""Read bandwidth of an attached pool, labelled with the path the bytes really took.

A pool on this host is reached over loopback (UCX shared memory, or TCP with ``UCX_TLS=tcp``): those
figures prove the path works and are labelled ``loopback``; they are never RDMA figures.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import statistics
import time

import torch

from tiermem.errors import ConfigError
from tiermem.rdma.client import PoolClient
from tiermem.rdma.source import ReadRequest
from tiermem.rdma.transport import TransportKind
from tiermem.rdma.wire import parse_address


def is_loopback(host: str) -> bool:
    """True when ``host`` resolves to this machine (127/8, ::1, or one of this host's addresses)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        local = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return False
    return any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in local for a in addresses)


def describe_path(client: PoolClient) -> tuple[str, bool]:
    """(label of the path bytes take to this client, whether it is loopback)."""
    loopback = is_loopback(parse_address(client.address)[0])
    kind = client.transport.kind
    if kind is TransportKind.INPROCESS:
        return "in-process memcpy (test transport, not RDMA)", True
    if kind is TransportKind.VERBS:
        return ("RDMA verbs, loopback" if loopback else "RDMA verbs"), loopback
    tls = os.environ.get("UCX_TLS", "")
    if not loopback:
        return f"NIXL/UCX over the network (UCX_TLS={tls or 'default'})", False
    names = {t.strip() for t in tls.split(",") if t.strip()}
    medium = "TCP" if names and names <= {"tcp", "self"} else "shared memory"
    return f"loopback via UCX {medium} (NIXL), not RDMA", True


def measure_read_bandwidth(client: PoolClient, nbytes: int, trials: int,
                           destination: torch.Tensor | None = None) -> dict:
    """Time ``trials`` one-sided reads of ``nbytes`` (spread over the pool's largest objects).

    The destination (a fresh host buffer unless given, e.g. an HBM tensor) is registered once and
    warmed by one untimed read that also fetches the grants. Returns figures and the path label.
    """
    if nbytes <= 0 or trials <= 0:
        raise ConfigError(f"rdma bench: nbytes and trials must be > 0, got {nbytes} and {trials}")
    pool_bytes = sum(client.directory.values())
    if pool_bytes < nbytes:
        raise ConfigError(f"rdma bench: the pool at {client.address} exports {pool_bytes} bytes, fewer than the "
                          f"{nbytes} asked for; serve more (e.g. --synthetic 16x64MiB) or read less")
    if destination is None:
        destination = torch.zeros(nbytes, dtype=torch.uint8)
    destination = destination.reshape(-1).view(torch.uint8)[:nbytes]
    requests, offset = [], 0
    for key, size in sorted(client.directory.items(), key=lambda item: -item[1]):
        if offset == nbytes:
            break
        take = min(size, nbytes - offset)
        requests.append(ReadRequest(key, destination.narrow(0, offset, take)))
        offset += take
    client.register(destination)
    try:
        client.submit(requests).wait()
        seconds = []
        for _ in range(trials):
            start = time.perf_counter()
            client.submit(requests).wait()
            seconds.append(time.perf_counter() - start)
    finally:
        client.deregister(destination)
    path, loopback = describe_path(client)
    median_s = statistics.median(seconds)
    return {
        "tier": "rdma", "address": client.address, "transport": client.transport.kind.value, "path": path,
        "loopback": loopback, "nbytes": nbytes, "objects": len(requests), "trials": trials,
        "destination": str(destination.device), "seconds": seconds,
        "bandwidth_gbps_best": nbytes / min(seconds) / 1e9, "bandwidth_gbps_median": nbytes / median_s / 1e9,
        "latency_us_median": median_s * 1e6,
    }
