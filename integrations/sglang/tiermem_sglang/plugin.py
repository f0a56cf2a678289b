"""The SGLang plugin: ``register()`` (entry point ``sglang.srt.plugins: tiermem``) installs tiermem's hooks.

SGLang calls ``register()`` in the CLI process and again in every scheduler process (``load_plugins``),
before any ``ServerArgs`` or model is built. The hooks:

| target                       | type   | installed in                        | does                          |
|------------------------------|--------|-------------------------------------|-------------------------------|
| ``ServerArgs.add_cli_args``  | AFTER  | every process                       | adds the flags                |
| ``ServerArgs.from_cli_args`` | AROUND | every process                       | reads, refuses, publishes     |
| ``FusedMoE.__init__``        | BEFORE | processes with an offloading config | tiers routed-expert layers    |

The scheduler processes of a server started with ``--expert-tier dram|cxl`` inherit the published
config, so they get the third hook (``hooks``). Without an offloading config SGLang's MoE layers are
not patched, and the process never imports the MoE stack on tiermem's behalf.
"""

from __future__ import annotations

import importlib
import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from tiermem_sglang.config import published
from tiermem_sglang.flags import add_flags, read_flags

log = logging.getLogger("tiermem.sglang")

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
FUSED_MOE_INIT = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__"


def register() -> None:
    """Install tiermem's hooks; SGLang applies them right after every plugin has registered."""
    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", add_flags, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", read_flags, HookType.AROUND)
    config = published()
    if config is not None and config.offloads:
        hooks = importlib.import_module("tiermem_sglang.hooks")  # the MoE stack, only where layers are tiered
        HookRegistry.register(FUSED_MOE_INIT, hooks.tier_routed_experts, HookType.BEFORE)
        log.info("tiermem-sglang: routed experts of every FusedMoE layer homed on %s", config.expert_tier.value)
