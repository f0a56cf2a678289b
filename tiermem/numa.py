"""A small ctypes binding to libnuma: node sizes, binding a buffer to a node, verifying placement.

Why ctypes: the PyPI ``numa`` package does not build on Python 3.11 and only sets process-wide
policy; tiermem must place *one buffer* on *one node* (``mbind``) and verify it (``move_pages``).
Invariant: every function raises ``TopologyError`` with the node and the fix when libnuma or the node
is missing; nothing here silently falls back to another node.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

from tiermem.errors import TopologyError

log = logging.getLogger("tiermem.numa")

MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
_BITS_PER_ULONG = ctypes.sizeof(ctypes.c_ulong) * 8


@functools.cache
def _lib() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("numa") or "libnuma.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.numa_available.restype = ctypes.c_int
    lib.numa_max_node.restype = ctypes.c_int
    lib.numa_node_size64.restype = ctypes.c_longlong
    lib.numa_node_size64.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
    lib.numa_run_on_node.argtypes = [ctypes.c_int]
    lib.mbind.restype = ctypes.c_long
    lib.mbind.argtypes = [
        ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int,
        ctypes.POINTER(ctypes.c_ulong), ctypes.c_ulong, ctypes.c_uint,
    ]
    lib.move_pages.restype = ctypes.c_long
    lib.move_pages.argtypes = [
        ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.c_int,
    ]
    if lib.numa_available() < 0:
        return None
    return lib


def available() -> bool:
    """True when libnuma loads and the kernel supports NUMA policy."""
    return _lib() is not None


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise TopologyError(
            "numa: libnuma is not available on this host; install it (Debian: apt-get install "
            "libnuma1) or configure the tier without numa_node"
        )
    return lib


def nodes() -> list[int]:
    """Node ids that have memory (from libnuma's view of the host)."""
    lib = _require()
    return [n for n in range(lib.numa_max_node() + 1) if lib.numa_node_size64(n, None) > 0]


def check_node(node: int) -> None:
    """Raise TopologyError naming the node and the nodes that exist when ``node`` has no memory."""
    existing = nodes()
    if node not in existing:
        raise TopologyError(
            f"numa: node {node} does not exist or has no memory on this host; nodes with memory: "
            f"{existing}. Pick one of those (see `tiermem topo`)."
        )


def node_size_bytes(node: int) -> tuple[int, int]:
    """(total, free) bytes of ``node``."""
    lib = _require()
    check_node(node)
    free = ctypes.c_longlong(0)
    total = lib.numa_node_size64(node, ctypes.byref(free))
    return int(total), int(free.value)


def bind(address: int, nbytes: int, node: int) -> None:
    """Bind the pages of ``[address, address + nbytes)`` strictly to ``node`` (before first touch)."""
    lib = _require()
    check_node(node)
    maxnode = max(node + 1, _BITS_PER_ULONG)
    mask = (ctypes.c_ulong * ((maxnode + _BITS_PER_ULONG - 1) // _BITS_PER_ULONG))()
    mask[node // _BITS_PER_ULONG] = 1 << (node % _BITS_PER_ULONG)
    rc = lib.mbind(address, nbytes, MPOL_BIND, mask, maxnode + 1, MPOL_MF_STRICT | MPOL_MF_MOVE)
    if rc != 0:
        err = ctypes.get_errno()
        raise TopologyError(
            f"numa: mbind of {nbytes} bytes at {address:#x} to node {node} failed: "
            f"{os.strerror(err)} (errno {err})"
        )


def page_nodes(address: int, nbytes: int, max_pages: int = 64) -> list[int]:
    """Nodes of up to ``max_pages`` evenly spaced pages of a touched buffer (via move_pages).

    A negative entry is ``-errno`` for that page (e.g. -14 EFAULT: not yet touched).
    """
    lib = _require()
    page = os.sysconf("SC_PAGE_SIZE")
    count = max(1, min(max_pages, nbytes // page))
    stride = max(page, (nbytes // count) // page * page)
    pages = (ctypes.c_void_p * count)(*[address + i * stride for i in range(count)])
    status = (ctypes.c_int * count)()
    rc = lib.move_pages(0, count, pages, None, status, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise TopologyError(f"numa: move_pages query failed: {os.strerror(err)} (errno {err})")
    return list(status)


def run_on_node(node: int) -> None:
    """Restrict this process's threads to the CPUs of ``node`` (benchmarks bind next to the GPU)."""
    lib = _require()
    check_node(node)
    if lib.numa_run_on_node(node) != 0:
        err = ctypes.get_errno()
        raise TopologyError(f"numa: cannot run on node {node}: {os.strerror(err)}")
