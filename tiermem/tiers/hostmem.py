"""Host memory for arenas: mmap, bind to a NUMA node, first touch, register for GPU DMA.

Order matters and is the whole point: ``mbind`` before the first touch places the pages, the touch
makes them resident, and ``cudaHostRegister`` (once per arena) makes them DMA-able and visible to the
GPU under UVA. ``pin_memory``/``cudaHostAlloc`` give no control over the node, so they are not used.

Invariant: ``HostMapping.tensor`` is a uint8 view of the whole mapping; ``close()`` unregisters and
unmaps once. Views still held by users keep the mapping alive (no use-after-free): it is then unmapped
when the last view dies, and only the registration is dropped at ``close()``.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import time

import torch

from tiermem import numa
from tiermem.errors import TopologyError

log = logging.getLogger("tiermem.tiers")

HUGE_PAGE_BYTES = 2 * 1024 * 1024
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02


class CudaRegistration(str, enum.Enum):
    """Whether host arenas are registered with CUDA for DMA (``auto``: when a GPU is present)."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"

    def wanted(self, tier: str) -> bool:
        if self is CudaRegistration.NEVER:
            return False
        present = torch.cuda.is_available()
        if self is CudaRegistration.ALWAYS and not present:
            raise TopologyError(
                f"tier {tier!r}: register_cuda='always' but CUDA is not available here "
                f"(torch {torch.__version__}, cuda build {torch.version.cuda}); use 'auto' or 'never'"
            )
        return present


class HostMapping:
    """One anonymous (or devdax) mapping, optionally bound to a node and registered with CUDA."""

    def __init__(
        self, nbytes: int, *, tier: str, numa_node: int | None, register_cuda: bool,
        dax_path: str | None = None, hugepages: bool = True,
    ) -> None:
        start = time.perf_counter()
        self.nbytes = nbytes
        self._registered = False
        self._closed = False
        if dax_path is None:
            self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
        else:
            self._mmap = _map_dax(dax_path, nbytes, tier)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        address = self.tensor.data_ptr()
        if numa_node is not None and dax_path is None:
            numa.bind(address, nbytes, numa_node)
        self.tensor.zero_()  # first touch, after binding (torch parallelises the fill)
        if register_cuda:
            _check_cuda(torch.cuda.cudart().cudaHostRegister(address, nbytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED),
                        f"tier {tier!r}: cudaHostRegister of {nbytes} bytes")
            self._registered = True
        log.debug(
            "tier %s: mapped %d bytes at %#x (node %s, registered %s) in %.3f s",
            tier, nbytes, address, numa_node, register_cuda, time.perf_counter() - start,
        )

    @property
    def registered(self) -> bool:
        return self._registered

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            log.debug("host mapping still viewed by live tensors; it is unmapped when they are freed")


def _map_dax(path: str, nbytes: int, tier: str) -> mmap.mmap:
    if nbytes % HUGE_PAGE_BYTES:
        raise TopologyError(
            f"tier {tier!r}: devdax mappings must be multiples of 2 MiB; got {nbytes} bytes for {path}"
        )
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise TopologyError(f"tier {tier!r}: cannot open devdax device {path}: {exc.strerror}") from None
    try:
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    except OSError as exc:
        raise TopologyError(f"tier {tier!r}: cannot map {nbytes} bytes of {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _check_cuda(result: object, what: str) -> None:
    code = int(getattr(result, "value", result))
    if code != 0:
        raise TopologyError(f"{what} failed with CUDA error {code} ({result})")
