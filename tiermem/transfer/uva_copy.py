"""Block copies listed on the device: the GPU reads each block straight from its home, no host call per block.

``BlockCopier`` serves a pager whose decisions never leave the GPU (``residency.device_pager``): the
host cannot issue a ``cudaMemcpyAsync`` per miss without first reading the misses back, so on a GPU
the copies are one Triton kernel launch whose threads read the homes through unified virtual
addressing (the host address of pinned or registered memory is valid on the device); measured on
the H100: 45.8-48.7 GB/s at 1-4 KiB rows against 55 GB/s for the copy engines. On a CPU the same
copies run as tensor copies (tests), reading the count back.

Invariants: every home is validated once, at construction (contiguous, as long as a row of its
group's slots, pinned when the slots are on a GPU), and its holder keeps it alive and in place while
the copier lives; a copy only reads homes and writes the listed slot rows, on the current stream,
graph-capturable on a GPU (unless ``copy(..., engines=True)`` reads the list back).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch

from tiermem.errors import ConfigError, TransferError

KERNEL_MODULE = "tiermem.transfer.uva_copy_kernel"  # imports Triton (the optional [gpu] extra): loaded on first use
BLOCK_WORDS = 2048  # 8-byte words one program copies per item (16 KiB)
NUM_WARPS = 8
PROGRAMS_PER_SM = 4  # programs in flight per SM: enough reads outstanding to fill the link


class BlockCopier:
    """Copies blocks of ``homes`` (``homes[g][o]``: object ``o`` of group ``g``) into rows of ``slots[g]``.

    ``slots[g]`` is ``[S, block_bytes]`` bytes; groups may differ in block size (e.g. one group per
    weight tensor of a layer whose slots are separate tensors, as in SGLang's ``w13`` / ``w2``)."""

    def __init__(self, homes: Sequence[Sequence[torch.Tensor]], slots: Sequence[torch.Tensor], *,
                 kernel: bool | None = None) -> None:
        """``kernel``: copy with the Triton kernel (default: where the slots are on a GPU); True on a CPU runs it
        in Triton's interpreter (tests)."""
        if len(homes) != len(slots) or not slots:
            raise ConfigError(f"uva copy: {len(homes)} home group(s) for {len(slots)} slot group(s); give one each")
        self.block_bytes = [int(s.shape[1]) for s in slots]
        odd = [b for b in self.block_bytes if b % 8]
        if odd:
            raise ConfigError(f"uva copy: blocks of {odd[0]} bytes; the copy moves 8-byte words, so pad "
                              "blocks to a multiple of 8 bytes")
        self.device = slots[0].device
        self.slots = [s.view(torch.int64) for s in slots]
        for g, group in enumerate(homes):
            for o, home in enumerate(group):
                _check_home(home, self.block_bytes[g], self.device, g, o)
        self.homes = [[home.reshape(-1).view(torch.uint8) for home in group] for group in homes]  # any dtype/shape
        self._addresses = None
        if kernel if kernel is not None else self.device.type == "cuda":
            width = max(len(group) for group in self.homes)
            table = torch.zeros((len(homes), width), dtype=torch.int64)
            for g, group in enumerate(self.homes):
                table[g, :len(group)] = torch.tensor([home.data_ptr() for home in group], dtype=torch.int64)
            self._addresses = table.to(self.device)
            programs = torch.cuda.get_device_properties(self.device).multi_processor_count \
                if self.device.type == "cuda" else 2
            self._grid = (programs * PROGRAMS_PER_SM,)

    def copy(self, group: int, objects: torch.Tensor, slots: torch.Tensor, count: torch.Tensor, *,
             engines: bool = False, programs: int | None = None) -> None:
        """Copy home ``objects[i]`` into slot row ``slots[i]`` of ``group`` for ``i < count[0]`` (all on the device).
        ``engines``: read the list back and copy one block per ``cudaMemcpyAsync`` on the current stream (the copy
        engines, ~5% faster than the kernel on the H100; a host sync, so not capturable: for waves that have
        synchronised anyway, a prefill's); without the kernel (a CPU) the copier always does. ``programs``: the
        kernel's grid (default ``PROGRAMS_PER_SM`` per SM); fewer leave SMs to kernels running beside the copy."""
        if engines or self._addresses is None:
            listed = int(count)
            for obj, slot in torch.stack([objects[:listed], slots[:listed]]).T.tolist():
                self.slots[group][slot].copy_(self.homes[group][obj].view(torch.int64), non_blocking=True)
            return
        grid = self._grid if programs is None else (programs,)
        _kernel()[grid](self._addresses[group], objects, slots, count, self.slots[group], self.block_bytes[group] // 8,
                        BLOCK=BLOCK_WORDS, num_warps=NUM_WARPS)


def _check_home(home: torch.Tensor, block_bytes: int, device: torch.device, group: int, index: int) -> None:
    nbytes = home.numel() * home.element_size()
    if not home.is_contiguous() or nbytes != block_bytes or home.data_ptr() % 8:
        raise ConfigError(f"uva copy: home {index} of group {group} must be one contiguous, 8-byte aligned block of "
                          f"{block_bytes} bytes; got {nbytes} bytes, contiguous={home.is_contiguous()}, "
                          f"address {home.data_ptr():#x}")
    if device.type == "cuda" and home.device.type == "cpu" and not home.is_pinned():
        raise TransferError(f"uva copy: home {index} of group {group} is pageable host memory, which the GPU cannot "
                            "read; keep the homes on a host tier (pinned/registered) or in HBM")


@functools.cache
def _kernel():
    try:
        return importlib.import_module(KERNEL_MODULE).copy_blocks_kernel
    except ImportError:
        raise TransferError("uva copy: Triton is not installed; install tiermem[gpu] or use the host pager "
                            "(pager='host')") from None
