"""``TieredMoEMethod``: the fused-MoE method that runs a ``FusedMoE`` layer over K HBM slots paged by tiermem.

It wraps the layer's own method the way SGLang's paged experts does (``create_weights``, the
per-parameter ``weight_loader``, ``process_weights_after_loading``, ``apply``), with tiermem underneath:

- ``create_weights``: the base method creates the GPU expert tensors with K rows (the slots); every
  expert instead gets a home block in an ``ExpertStore`` on the chosen host tier (dram, cxl);
- ``weight_loader`` (per parameter): SGLang's own per-expert loader writes each checkpoint tensor into
  a one-row view of that expert's home, so homes hold exactly the layout the GPU rows would;
- ``process_weights_after_loading``: experts 0..K-1 are paged into the slots, the base step runs, and
  the slots are checked to be the untransformed home bytes (the pager copies homes verbatim);
- ``apply``: the step's experts are made resident wave by wave (``plan``/``place`` of the pager), the
  base kernel runs on slot ids through SGLang's runner contract (``paged_experts.runners``, same top-k
  sum as unpaged), then the runtime prefetches for the next layer when a predictor is configured.

Two pagers (``--expert-tier-pager``): ``host`` (``LayerPager``: plans on the host) and ``device``
(``DeviceLayerPager``: decides and copies on the GPU). Supported: unquantized (bf16/fp16) experts on
the triton MoE runner, one GPU. CUDA graphs: with the host pager a breakable graph runs the paged
step as an eager break and a full graph is refused at start-up; with the device pager a step of at
most ``--expert-tier-device-waves-max-tokens`` tokens pages in waves decided on the GPU and runs
inside any graph (full decode graphs are captured up to that many requests), and a larger one (a
prefill) runs eagerly (an eager break in a breakable graph).
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.moe.paged_experts.runners import contract_for, run_on_slots, runner_config, runner_of
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput, StandardDispatchOutput
from sglang.srt.layers.moe.topk import StandardTopKOutput
from sglang.srt.layers.parameter import BasevLLMParameter
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import eager_on_graph
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context import is_in_breakable_cuda_graph
from tiermem.errors import ConfigError
from tiermem.experts.layout import ExpertLayout

from tiermem_sglang.config import ExpertPager, ExpertTierConfig
from tiermem_sglang.device import DeviceLayerPager
from tiermem_sglang.pager import LayerPager
from tiermem_sglang.runtime import TierRuntime, runtime_for

log = logging.getLogger("tiermem.sglang")

# SGLang expert parameter -> canonical tiermem projection name (tiermem.experts.layout).
PARTS = {"w13_weight": "gate_up", "w2_weight": "down"}


def select_base_method(layer: torch.nn.Module) -> FusedMoEMethodBase:
    """The method ``FusedMoE`` would have chosen itself: the quant config's, else unquantized."""
    method = None
    if layer.quant_config is not None:
        method = layer.quant_config.get_quant_method(layer, layer.layer_name)
    if method is None:
        method = UnquantizedFusedMoEMethod(layer.use_triton_kernels, layer.use_flashinfer_trtllm_moe,
                                           layer.use_deep_gemm)
    return method


class TieredMoEMethod(FusedMoEMethodBase, torch.nn.Module):
    """Runs the base method over K slots whose experts tiermem pages in from a host tier."""

    def __init__(
        self, config: ExpertTierConfig, *, top_k: int, num_moe_layers: int,
        base_method: FusedMoEMethodBase | None = None, contract: object | None = None,
    ) -> None:
        torch.nn.Module.__init__(self)
        self.config = config
        self.top_k = top_k
        self.num_moe_layers = num_moe_layers
        self.base_method = base_method  # None: chosen in create_weights, as FusedMoE would
        self.contract = contract  # None: follows from the runner the base method builds
        self.num_experts = 0
        self.num_slots = 0
        self.routed_scaling_factor = 1.0
        self.runtime: TierRuntime | None = None
        self.store = None
        self.pager: LayerPager | DeviceLayerPager | None = None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra):
        if self.base_method is None:
            self.base_method = select_base_method(layer)
        if not isinstance(self.base_method, UnquantizedFusedMoEMethod) or getattr(layer, "with_bias", False):
            raise ConfigError(
                f"tiermem-sglang: layer {layer.layer_name!r} uses {type(self.base_method).__name__}"
                f"{' with bias' if getattr(layer, 'with_bias', False) else ''}; tiered experts support unquantized "
                "(bf16/fp16) experts without bias so far; serve this model without --expert-tier"
            )
        self.num_experts = num_experts
        self.num_slots = self.config.resident_slots(num_experts, self.top_k)
        layer.num_local_experts = self.num_slots
        layer._num_local_routed = layer._num_global_routed = self.num_slots
        self.base_method.create_weights(layer=layer, num_experts=self.num_slots, hidden_size=hidden_size,
                                        intermediate_size_per_partition=intermediate_size_per_partition,
                                        params_dtype=params_dtype, **extra)
        layer.weight_load_method = self.base_method
        layer._derived_weight_cache_error = (
            "Online weight updates are not supported with --expert-tier: experts in HBM slots would keep "
            "the old weights."
        )
        layout = ExpertLayout.build(
            (part, tuple(getattr(layer, name).shape[1:]), getattr(layer, name).dtype) for name, part in PARTS.items()
        )
        capacity = self.num_moe_layers * num_experts * layout.block_bytes
        self.runtime = runtime_for(self.config, host_capacity_bytes=capacity)
        self.store = self.runtime.store_for(layer.layer_id, layout, num_experts)
        for name, part in PARTS.items():
            param = getattr(layer, name)
            loader = self._home_loader(layer, part)
            if isinstance(param, BasevLLMParameter):
                param._weight_loader = loader
            else:
                param.weight_loader = loader

    def _home_loader(self, layer, part: str):
        def weight_loader(param, loaded_weight, weight_name, shard_id, *rest, **kwargs):
            expert_id = kwargs.get("expert_id", rest[0] if rest else None)
            if expert_id is None:
                raise ConfigError(
                    f"tiermem-sglang: {weight_name!r} holds every expert in one checkpoint tensor; tiered experts "
                    "load per-expert tensors (model.layers.N.mlp.experts.E.*_proj.weight)"
                )
            # SGLang's own per-expert loader (sharding, w1/w3 placement) on a one-row view of the home.
            row = torch.nn.Parameter(self.store.read(layer.layer_id, expert_id)[part].unsqueeze(0),
                                     requires_grad=False)
            row.__dict__.update(param.__dict__)
            layer._weight_loader_impl(param=row, loaded_weight=loaded_weight, weight_name=weight_name,
                                      shard_id=shard_id, expert_id=0)
        return weight_loader

    def create_moe_runner(self, layer, moe_runner_config):
        self.base_method.create_moe_runner(layer=layer,
                                           moe_runner_config=runner_config(moe_runner_config, self.num_slots))
        self.runner = runner_of(self.base_method, layer)
        if self.contract is None:
            self.contract = contract_for(self.runner)
        self.routed_scaling_factor = moe_runner_config.routed_scaling_factor or 1.0

    def process_weights_after_loading(self, layer):
        slots = {part: getattr(layer, name).data for name, part in PARTS.items()}
        if self.config.pager is ExpertPager.DEVICE:
            policy = "lru" if self.runtime.predictor is None else "predicted"
            self.pager = DeviceLayerPager(store=self.store, layer=layer.layer_id, slots=slots, policy=policy,
                                          waves_max_tokens=self.config.device_waves_max_tokens)
        else:
            self.pager = LayerPager(manager=self.runtime.manager, store=self.store, layer=layer.layer_id, slots=slots)
        self.pager.fill()
        self.base_method.process_weights_after_loading(layer)
        for name, part in PARTS.items():
            after = getattr(layer, name).data
            expert = self.store.read(layer.layer_id, 0)[part]
            if after.data_ptr() != slots[part].data_ptr() or not torch.equal(after[0].cpu(), expert):
                raise ConfigError(
                    f"tiermem-sglang: {type(self.base_method).__name__} rewrites {name} after loading (moe runner "
                    f"{getattr(self.runner, 'runner_backend', None)}), which the pager cannot replay for each "
                    "expert it pages in; use --moe-runner-backend triton"
                )
        self.runtime.add_pager(self.pager, top_k=self.top_k)

    def apply(self, layer, dispatch_output):
        topk_output = dispatch_output.topk_output
        # Decided from shapes alone, so a captured graph always takes the same path.
        if isinstance(self.pager, DeviceLayerPager) and self.pager.on_device(topk_output.topk_ids):
            # Waves paged on the GPU: no host sync, so they run (and are captured) inside any CUDA graph.
            waves = self.pager.device_waves(topk_output.topk_ids)
            return StandardCombineInput(hidden_states=self._combine(layer, dispatch_output, waves,
                                                                    self.pager.place_all))
        if is_in_breakable_cuda_graph():
            # The host-planned waves run as an eager break between captured segments.
            out = torch.empty_like(dispatch_output.hidden_states)
            self._run_eager_into(layer, dispatch_output.hidden_states, topk_output.topk_weights,
                                 topk_output.topk_ids, topk_output.router_logits, out)
            return StandardCombineInput(hidden_states=out)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            tokens = topk_output.topk_ids.shape[0]
            if isinstance(self.pager, DeviceLayerPager):
                most = self.config.unsynced_max_tokens(self.num_experts, self.top_k)
                why = (f"more than --expert-tier-device-waves-max-tokens {self.pager.waves_max_tokens}, so its waves "
                       f"are planned after reading its routing back; capture decode graphs up to "
                       f"--cuda-graph-max-bs-decode {most}, or raise the flag")
            else:
                why = (f"more routed entries than the {self.num_slots} slots, planned on the host; use "
                       f"--expert-tier-pager device")
            raise ConfigError(f"tiermem-sglang: a CUDA graph is capturing a step of {tokens} token(s) x "
                              f"top-{self.top_k}, {why}")
        return StandardCombineInput(hidden_states=self.run(layer, dispatch_output))

    def run(self, layer, dispatch_output) -> torch.Tensor:
        """The layer's output for one step, planned: waves over the K slots, summed like the unpaged runner."""
        topk_ids = dispatch_output.topk_output.topk_ids
        out = self._combine(layer, dispatch_output, self.pager.plan(topk_ids),
                            lambda wave: self.pager.place(topk_ids, wave))
        self.runtime.after_routing(layer.layer_id, topk_ids)
        return out

    def _combine(self, layer, dispatch_output, waves: list, place) -> torch.Tensor:
        """Place each wave (``place(wave)``: its slot ids) and run the base kernel on it before placing the next
        (which may evict its experts), then sum the top-k entries like the unpaged runner."""
        merged = None
        for wave in waves:
            slots = place(wave)
            if len(waves) == 1:
                merged = run_on_slots(self.base_method, layer, dispatch_output, slots)
            else:
                merged = self.contract.run_wave(base_method=self.base_method, layer=layer,
                                                dispatch_output=dispatch_output, slots=slots, merged=merged)
        return self.contract.finish(merged=merged, hidden_states=dispatch_output.hidden_states,
                                    routed_scaling_factor=self.routed_scaling_factor)

    def _run_eager_into_impl(self, layer, hidden_states, topk_weights, topk_ids, router_logits, out) -> None:
        dispatch_output = StandardDispatchOutput(
            hidden_states=hidden_states, hidden_states_scale=None,
            topk_output=StandardTopKOutput(topk_weights=topk_weights, topk_ids=topk_ids, router_logits=router_logits),
        )
        out.copy_(self.run(layer, dispatch_output))

    # Capture records the break's buffers before routing ids exist, so the stub skips the waves then;
    # warmup and every replay run them.
    _run_eager_into = eager_on_graph(True, capture_stub=lambda *args, **kwargs: None)(_run_eager_into_impl)
