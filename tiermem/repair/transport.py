"""``GroupTransport``: the executor's ``PeerTransport`` over a torch.distributed process group.

gloo moves CPU tensors (tests, host-to-host), NCCL moves CUDA tensors (HBM to HBM over NVLink or
GPUDirect RDMA). Every call blocks until its bytes moved or ``timeout_s`` passed; a dead peer turns
into a ``TransferError`` naming it, never a hang. The group is the one formed for the current
membership epoch; EP ranks are translated to group ranks through ``group_ranks``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist

from tiermem.errors import TransferError

_TAG = 0x7E9A  # one tag for repair traffic; order is the plan's, identical on both ends


class GroupTransport:
    """Point-to-point sends and receives between EP ranks through ``group``."""

    def __init__(self, group: dist.ProcessGroup, group_ranks: Mapping[int, int]) -> None:
        self.group = group
        self.group_ranks = dict(group_ranks)  # EP rank -> rank inside ``group``

    def send(self, tensor: torch.Tensor, dst_rank: int, *, timeout_s: float) -> None:
        self._wait(self.group.send([tensor], self._peer(dst_rank), _TAG), "send to", dst_rank, tensor, timeout_s)

    def recv(self, tensor: torch.Tensor, src_rank: int, *, timeout_s: float) -> None:
        self._wait(self.group.recv([tensor], self._peer(src_rank), _TAG), "receive from", src_rank, tensor, timeout_s)

    def _peer(self, rank: int) -> int:
        if rank not in self.group_ranks:
            raise TransferError(
                f"repair transport: EP rank {rank} is not in this epoch's group (members: {sorted(self.group_ranks)}); "
                "the plan and the group come from different epochs"
            )
        return self.group_ranks[rank]

    def _wait(self, work: dist.Work, what: str, rank: int, tensor: torch.Tensor, timeout_s: float) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        try:
            work.wait(datetime.timedelta(seconds=max(timeout_s, 1e-3)))
        except RuntimeError as exc:
            raise TransferError(
                f"repair transport: {what} EP rank {rank} ({nbytes} bytes) failed or timed out after "
                f"{timeout_s:.1f} s: "
                f"{str(exc).splitlines()[0]}; the peer is probably gone, so re-plan at the next epoch"
            ) from exc
