"""Route prediction: which experts the next layers and steps will use, so they can be prefetched.

Map of the package:
- ``base``: the ``Predictor`` protocol (``predict(context, distance) -> [distance, B, E]``) and
  ``RouteContext`` (what an engine knows at a layer of a step).
- ``trace``: ``RouteTrace``, the on-disk routing trace format (``.npz``), splits by sequence.
- ``importers``: SGLang, vLLM, transformers and ``TraceRecorder`` (for ``tiermem.offload``).
- ``synthetic``: seeded traces with controllable skew, temporal reuse and layer correlation.
- ``contexts``: leak-free contexts replayed from a trace, with the routing that followed.
- predictors: ``frequency``, ``cooccurrence``, ``activation_match`` (MoE-Infinity), ``nextgate``
  (needs router weights and hidden states), ``learned`` + ``train`` (the ExpertFlow-style MLP), and
  ``oracle`` (reads the future; bounds only).
- ``registry``: ``PREDICTORS``, name -> (config, factory(config, train_trace)).
- ``eval``: recall/precision at k and 2k per distance and phase, cross-validated by sequence.

Extension: a new predictor is a class with ``predict``; if it is fitted from a trace, give it a frozen
config and register a factory in ``PREDICTORS`` from its module, and import that module here.
"""

from tiermem.predict import activation_match, cooccurrence, frequency, train  # noqa: F401  (registration)
from tiermem.predict.activation_match import ActivationMatchConfig, ActivationMatchPredictor
from tiermem.predict.base import Predictor, RouteContext
from tiermem.predict.cooccurrence import CoOccurrenceConfig, CoOccurrencePredictor
from tiermem.predict.frequency import FrequencyConfig, FrequencyPredictor
from tiermem.predict.learned import LearnedConfig, LearnedPredictor
from tiermem.predict.nextgate import NextGatePredictor
from tiermem.predict.oracle import OracleRoutes
from tiermem.predict.registry import PREDICTORS
from tiermem.predict.trace import RouteTrace, load_trace, save_trace, sequence_folds, split_by_sequence

__all__ = [
    "PREDICTORS",
    "ActivationMatchConfig",
    "ActivationMatchPredictor",
    "CoOccurrenceConfig",
    "CoOccurrencePredictor",
    "FrequencyConfig",
    "FrequencyPredictor",
    "LearnedConfig",
    "LearnedPredictor",
    "NextGatePredictor",
    "OracleRoutes",
    "Predictor",
    "RouteContext",
    "RouteTrace",
    "load_trace",
    "save_trace",
    "sequence_folds",
    "split_by_sequence",
]
