"""The hook that tiers a ``FusedMoE`` layer, and the checks it runs in a scheduler process first.

``tier_routed_experts`` runs BEFORE ``FusedMoE.__init__`` and passes ``quant_method=TieredMoEMethod(...)``
to routed-expert layers: ``FusedMoE``'s own argument for an explicit method ("overriding selection"),
so SGLang's layer code runs unchanged. The base method ``FusedMoE`` would have chosen is chosen inside
``TieredMoEMethod.create_weights``; a method the model passed itself is wrapped instead. Before the
first layer is built, ``check_worker`` refuses what SGLang's resolved config has that tiering cannot
serve (the CLI checked the raw flags; this also covers ``sglang.Engine`` without a CLI). With the
device pager and full decode graphs, ``cap_decode_graphs`` limits the captured batch sizes to the
steps it pages with no host sync (``--expert-tier-device-waves-max-tokens``).
"""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace
from typing import Any

from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend
from sglang.srt.runtime_context import get_exec, get_model, get_parallel, get_spec, process_model_config

from tiermem_sglang.config import ExpertPager, ExpertTierConfig, published
from tiermem_sglang.flags import incompatibilities, refuse
from tiermem_sglang.method import TieredMoEMethod

log = logging.getLogger("tiermem.sglang")

_FUSED_MOE_SIGNATURE = inspect.signature(FusedMoE.__init__)


def tier_routed_experts(*args: Any, **kwargs: Any) -> tuple[tuple, dict] | None:
    """BEFORE hook of ``FusedMoE.__init__``: hand routed-expert layers a ``TieredMoEMethod``."""
    config = published()
    if config is None or not config.offloads or getattr(args[0], "is_shared_fused_moe", False):
        return None
    check_worker(config)
    bound = _FUSED_MOE_SIGNATURE.bind(*args, **kwargs)
    if bound.arguments.get("num_fused_shared_experts"):
        refuse(["fused shared experts are not tiered; add --disable-shared-experts-fusion"])
    text_config = process_model_config().hf_text_config
    top_k = bound.arguments.get("top_k") or text_config.num_experts_per_tok
    if config.pager is ExpertPager.DEVICE and check_cuda_graph_backend(Phase.DECODE, Backend.FULL):
        cap_decode_graphs(config.unsynced_max_tokens(bound.arguments["num_experts"], top_k))
    bound.arguments["quant_method"] = TieredMoEMethod(
        config, top_k=top_k, num_moe_layers=text_config.num_hidden_layers,
        base_method=bound.arguments.get("quant_method"),
    )
    return bound.args, bound.kwargs


def check_worker(config: ExpertTierConfig) -> None:
    """Refuse, in a scheduler process, what SGLang's resolved config has that tiering cannot serve."""
    parallel, moe = get_parallel(), get_exec().moe
    view = SimpleNamespace(
        tp_size=parallel.tp_size, ep_size=parallel.ep_size, pp_size=parallel.pp_size, dp_size=parallel.dp_size,
        enable_paged_experts=moe.enable_paged_experts, enable_eplb=moe.enable_eplb,
        speculative_algorithm=get_spec().speculative_algorithm, load_format=get_model().load_format,
    )
    problems = incompatibilities(config, view)
    flag = "--cuda-graph-backend-decode"
    if config.pager is ExpertPager.HOST and check_cuda_graph_backend(Phase.DECODE, Backend.FULL):
        problems.append(f"{flag} full: a full CUDA graph cannot page experts on the host's decision; use "
                        f"--expert-tier-pager device (pages on the GPU, inside the graph), {flag} breakable "
                        f"(paging runs as an eager break) or {flag} disabled")
    flag = "--cuda-graph-backend-prefill"
    if check_cuda_graph_backend(Phase.PREFILL, Backend.FULL):
        problems.append(f"{flag} full: a prefill routes more experts than the slots hold, so it pages in waves "
                        f"planned on the host; use {flag} breakable (the waves run as an eager break) or "
                        f"{flag} disabled")
    refuse(problems)


def cap_decode_graphs(max_bs: int) -> None:
    """Capture full decode graphs only at batch sizes the device pager serves with no host sync (at most
    ``max_bs`` tokens); larger batches run without one. Every tiered layer calls this; the first changes SGLang's
    config (as SGLang's own paged experts caps its graphs)."""
    decode = get_exec().graph.cuda_graph_config.decode
    if not decode.bs or max(decode.bs) <= max_bs:
        return
    capture_bs = sorted({bs for bs in decode.bs if bs <= max_bs} | {max_bs})
    log.info("tiermem-sglang: decode CUDA graphs captured at batch sizes %s (up to %d, the largest step the device "
             "pager runs without a host sync: --expert-tier-device-waves-max-tokens); larger batches run without a "
             "graph", capture_bs, max_bs)
    decode.bs = capture_bs
    decode.max_bs = max_bs
