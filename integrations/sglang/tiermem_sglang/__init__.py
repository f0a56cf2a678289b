"""tiermem for SGLang: ``sglang serve --expert-tier cxl`` keeps routed experts off the GPU, paged into K HBM slots.

Pinned to SGLang ``0.5.23`` (``SGLANG_VERSION``); the only tiermem package that imports sglang, and it
uses tiermem's public API only. Modules, in the order a request meets them:

| module     | role                                                                                   |
|------------|----------------------------------------------------------------------------------------|
| plugin     | ``register()``, the ``sglang.srt.plugins`` entry point: installs the hooks            |
| flags      | the ``--expert-tier*`` flags, start-up refusals of incompatible settings               |
| config     | ``ExpertTierConfig`` (frozen) and how it reaches scheduler processes (environment)     |
| method     | ``TieredMoEMethod``: wraps a ``FusedMoE`` layer's method, experts homed by tiermem     |
| device     | ``DeviceLayerPager`` (default): residency decided on the GPU, CUDA-graph capturable    |
| pager      | ``LayerPager`` (host pager): residency planned on the host, predictor prefetch         |
| runtime    | ``TierRuntime``: per-process TierManager, expert homes, pagers, predictor prefetching  |
| collect    | routing traces from a running server, in tiermem's trace format                        |

``plugin``, ``hooks`` and ``method`` import sglang; ``config``, ``flags``, ``device``, ``pager``, ``runtime``
and ``collect`` do not.
"""

from tiermem_sglang.config import ENV_VAR, ExpertPager, ExpertTier, ExpertTierConfig, TableTier, publish, published

SGLANG_VERSION = "0.5.23"

__all__ = ["ENV_VAR", "SGLANG_VERSION", "ExpertPager", "ExpertTier", "ExpertTierConfig", "TableTier", "publish",
           "published"]
