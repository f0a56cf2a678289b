"""The registry of predictors that are fitted from a training trace.

Extension: a predictor module defines a frozen config dataclass and a factory
``factory(config, train: RouteTrace) -> Predictor`` and calls ``PREDICTORS.register(name, config_cls,
factory)`` at import time. ``tiermem.predict`` imports every such module, so
``PREDICTORS.get(name)`` sees them all. Predictors that need more than a trace (next-gate speculation
needs the model's router weights; the oracle needs the very rows it predicts) are built directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tiermem.predict.base import Predictor
from tiermem.predict.trace import RouteTrace
from tiermem.registry import Registry

PredictorFactory = Callable[[Any, RouteTrace], Predictor]

PREDICTORS: Registry[PredictorFactory] = Registry("predictor")
