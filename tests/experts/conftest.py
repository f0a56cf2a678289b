"""Fixtures of the expert tests: tiny expert modules, and one intra-op thread.

On the 2-core CI VM, CPU ``index_add_`` with two intra-op threads takes ~10-30 ms per call (thread
hand-off), against 0.2 ms with one; the reference modules and ``OffloadedMoE`` both call it per expert.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

HIDDEN = 16
INTERMEDIATE = 8
NUM_EXPERTS = 6
TOP_K = 2


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class FusedExperts(nn.Module):
    """The transformers >= 5 experts layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int = NUM_EXPERTS, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * 0.2)
        self.act_fn = nn.SiLU()


class Mlp(nn.Module):
    def __init__(self, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        super().__init__()
        for name, shape in zip(names, ((INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))):
            setattr(self, name, nn.Linear(shape[1], shape[0], bias=False))


@pytest.fixture
def fused_experts() -> FusedExperts:
    torch.manual_seed(0)
    return FusedExperts()
