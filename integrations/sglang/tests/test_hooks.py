"""The worker-side checks and the decode-graph cap, against a stand-in of SGLang's resolved runtime context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiermem.errors import ConfigError

pytest.importorskip("sglang")

from sglang.srt.model_executor.cuda_graph_config import Backend, Phase

from tiermem_sglang import hooks
from tiermem_sglang.config import ExpertPager, ExpertTier, ExpertTierConfig


@pytest.fixture
def context(monkeypatch):
    """A resolved one-GPU context whose graph backends and decode batch sizes a test sets."""
    state = SimpleNamespace(backends={Phase.DECODE: Backend.FULL, Phase.PREFILL: Backend.DISABLED},
                            decode=SimpleNamespace(bs=[1, 2, 4, 8, 16, 24], max_bs=24))
    moe = SimpleNamespace(enable_paged_experts=False, enable_eplb=False)
    monkeypatch.setattr(hooks, "get_exec", lambda: SimpleNamespace(
        moe=moe, graph=SimpleNamespace(cuda_graph_config=SimpleNamespace(decode=state.decode))))
    monkeypatch.setattr(hooks, "get_parallel", lambda: SimpleNamespace(tp_size=1, ep_size=1, pp_size=1, dp_size=1))
    monkeypatch.setattr(hooks, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
    monkeypatch.setattr(hooks, "get_model", lambda: SimpleNamespace(load_format="auto"))
    monkeypatch.setattr(hooks, "check_cuda_graph_backend", lambda phase, backend: state.backends[phase] == backend)
    return state


def config(pager: ExpertPager) -> ExpertTierConfig:
    return ExpertTierConfig(expert_tier=ExpertTier.CXL, slots=32, pager=pager)


def test_a_full_decode_graph_is_refused_with_the_host_pager_naming_the_device_pager(context):
    with pytest.raises(ConfigError, match="use --expert-tier-pager device"):
        hooks.check_worker(config(ExpertPager.HOST))
    hooks.check_worker(config(ExpertPager.DEVICE))
    context.backends[Phase.DECODE] = Backend.BREAKABLE
    hooks.check_worker(config(ExpertPager.HOST))


def test_a_full_prefill_graph_is_refused_with_either_pager(context):
    context.backends[Phase.PREFILL] = Backend.FULL
    for pager in ExpertPager:
        with pytest.raises(ConfigError, match="--cuda-graph-backend-prefill full"):
            hooks.check_worker(config(pager))


def test_decode_graphs_are_captured_only_up_to_the_batch_that_fits_the_slots(context):
    hooks.cap_decode_graphs(4)
    assert (context.decode.bs, context.decode.max_bs) == ([1, 2, 4], 4)
    context.decode.bs, context.decode.max_bs = [1, 2, 3, 8], 8
    hooks.cap_decode_graphs(5)
    assert (context.decode.bs, context.decode.max_bs) == ([1, 2, 3, 5], 5)
    hooks.cap_decode_graphs(16)  # already within the cap: unchanged
    assert (context.decode.bs, context.decode.max_bs) == ([1, 2, 3, 5], 5)
