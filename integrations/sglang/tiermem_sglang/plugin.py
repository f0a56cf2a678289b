"""The SGLang plugin: ``register()`` (entry point ``sglang.srt.plugins: tiermem``) installs tiermem's hooks.

SGLang calls ``register()`` in the CLI process and again in every scheduler process (``load_plugins``),
before any ``ServerArgs`` or model is built. The hooks:

| target                      | type   | installed                        | does                                        |
|-----------------------------|--------|----------------------------------|---------------------------------------------|
| ``ServerArgs.add_cli_args`` | AFTER  | always                           | adds ``--expert-tier*``, ``--engram-table-tier`` |
| ``ServerArgs.from_cli_args``| AROUND | always                           | reads them, refuses incompatible settings, publishes the config |
| ``FusedMoE.__init__``       | BEFORE | where an offloading config is published (the scheduler processes of a server started with ``--expert-tier dram|cxl``) | tiers routed-expert layers (``hooks.py``) |

Without an offloading config SGLang's MoE layers are not patched at all, and the process never
imports the MoE stack on tiermem's behalf: ``hooks`` is imported only where it is installed.
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
