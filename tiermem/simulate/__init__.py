"""Simulation: replay routing traces through HBM expert caches against a cost model, and plan capacity.

- ``trace``: the shared ``.npz`` trace format (``load_trace``), synthetic flat routing, batch groups.
- ``steps``: decode steps of a batch and the ``RouteContext`` a predictor sees at each layer.
- ``cache``: per-layer caches built on the real residency layer and planners.
- ``config``, ``engine``, ``result``: ``simulate(trace, SimConfig, predictor=..., cost=...) -> SimResult``;
  ``combine`` adds up results of disjoint sequence sets (cross-fitted folds).
- ``cost``: the link / compute / host timeline (``CostModel``, ``HostCost``, ``Timing``).
- ``models``: real model shapes, GPU, host-link and pager profiles; ``capacity``: ``plan_capacity``.

A new policy to compare goes in ``tiermem.residency.policies``; a new predictor implements
``tiermem.predict.base.Predictor`` and is passed to ``simulate``; nothing here needs changing.
"""

from tiermem.simulate.capacity import CapacityPlan, decode_cost, expert_budget, plan_capacity
from tiermem.simulate.config import CacheLifetime, SimConfig
from tiermem.simulate.cost import CostModel, HostCost, Timing
from tiermem.simulate.engine import simulate
from tiermem.simulate.models import (
    GPUS,
    HOST_LINKS,
    MODELS,
    PAGERS,
    GpuProfile,
    ModelShape,
    PagerProfile,
    model_shape,
)
from tiermem.simulate.result import LayerStats, SimResult, combine
from tiermem.simulate.trace import SimTrace, load_trace, mask_incomplete_layers, select_sequences, synthetic_trace

__all__ = [
    "GPUS",
    "HOST_LINKS",
    "MODELS",
    "PAGERS",
    "CacheLifetime",
    "CapacityPlan",
    "CostModel",
    "GpuProfile",
    "HostCost",
    "LayerStats",
    "ModelShape",
    "PagerProfile",
    "SimConfig",
    "SimResult",
    "SimTrace",
    "Timing",
    "combine",
    "decode_cost",
    "expert_budget",
    "load_trace",
    "mask_incomplete_layers",
    "model_shape",
    "plan_capacity",
    "select_sequences",
    "simulate",
    "synthetic_trace",
]
