"""The copy fast path: ``cudaMemcpyAsync`` on raw pointers, called through ctypes.

``Tensor.copy_`` under a ``torch.cuda.stream`` context costs tens of microseconds of host time per
copy (operator dispatch, overlap and pinning checks, two stream switches); a layer's expert misses
are several copies, issued while the GPU waits for them. The engine has already validated every
copy (sizes, devices, pinned host side), so it can hand the two addresses straight to the CUDA
runtime that torch itself loaded; this is the one runtime call torch does not expose on pointers.

Invariants: only the ``libcudart`` already mapped into this process is used (found in
``/proc/self/maps``), so torch and tiermem share one runtime and one primary context; when it is
absent (a CPU build, a static runtime) ``available()`` is False and the engine uses ``copy_``; a
failed call raises ``TransferError`` with the runtime's own error string.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

from tiermem.errors import TransferError

log = logging.getLogger("tiermem.transfer")

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/libcudart.so" in line}
    if len(paths) != 1:
        if paths:
            log.info("transfer: %d CUDA runtimes mapped (%s); the copy fast path stays off", len(paths), sorted(paths))
        return None
    runtime = ctypes.CDLL(paths.pop())
    runtime.cudaMemcpyAsync.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p)
    runtime.cudaMemcpyAsync.restype = ctypes.c_int
    runtime.cudaGetErrorString.argtypes = (ctypes.c_int,)
    runtime.cudaGetErrorString.restype = ctypes.c_char_p
    return runtime


def available() -> bool:
    """Whether the process has exactly one CUDA runtime loaded (torch's) to call."""
    return _runtime() is not None


def memcpy_async(dst_ptr: int, src_ptr: int, nbytes: int, stream_handle: int) -> None:
    """Enqueue a copy of ``nbytes`` from ``src_ptr`` to ``dst_ptr`` on the raw ``cudaStream_t``."""
    runtime = _runtime()
    if runtime is None:
        raise TransferError("transfer: no CUDA runtime is loaded in this process; the copy fast path is unavailable")
    status = runtime.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, _MEMCPY_DEFAULT, stream_handle)
    if status != 0:
        reason = runtime.cudaGetErrorString(status).decode()
        raise TransferError(f"transfer: cudaMemcpyAsync of {nbytes} bytes ({src_ptr:#x} -> {dst_ptr:#x}) failed: "
                            f"{reason} (error {status})")
