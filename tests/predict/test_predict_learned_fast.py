"""The learned predictor's compiled forward: the torch forward's predictions, at a fraction of the cost."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from tiermem.errors import ConfigError, TraceError
from tiermem.predict.base import RouteContext
from tiermem.predict.contexts import EMBEDDING, anchor_batches, with_row_extras
from tiermem.predict.learned import LearnedConfig, LearnedPredictor
from tiermem.predict.synthetic import SyntheticConfig, gate_routed_trace, synthetic_trace
from tiermem.predict.trace import sequence_folds
from tiermem.predict.train import train

TRACE = SyntheticConfig(num_sequences=8, prefill_tokens=3, decode_tokens=9, num_layers=4, num_experts=16, top_k=2,
                        layer_correlation=0.8, reuse_probability=0.2)
HIDDEN = 24
SMALL = LearnedConfig(max_distance=3, expert_dim=16, anchor_dim=4, token_buckets=64, token_dim=8, hidden_dim=24,
                      hidden_state_dim=8, validation_fraction=0.0, max_steps=40, learning_rate=1e-2, history=True)
VARIANTS = {  # every optional part of the net on and off
    "history+tokens": SMALL,
    "bare": replace(SMALL, wide=False, history=False, token_buckets=0),
    "hidden": replace(SMALL, history=False),
    "hidden+embedding": SMALL,
}
ANCHORS = range(-1, TRACE.num_layers)
RTOL, ATOL = 1e-5, 1e-6
ALWAYS = 10**6  # a compiled_max_batch above any batch here


def _traces(name: str):
    if not name.startswith("hidden"):
        return sequence_folds(synthetic_trace(TRACE), 2)[0], None
    trace, gates = gate_routed_trace(TRACE, hidden_size=HIDDEN, drift=0.1)
    if name == "hidden+embedding":  # anchor -1 gets a hidden state too
        embedding = np.random.default_rng(1).standard_normal((trace.num_tokens, HIDDEN)).astype(np.float16)
        trace = replace(trace, extras={EMBEDDING: embedding})
    train_trace, test_trace = sequence_folds(trace, 2)[0]
    return (with_row_extras(train_trace, trace), with_row_extras(test_trace, trace)), torch.stack(gates)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    """A small trained model of each variant with its held-out trace."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (train_trace, test_trace), gates = _traces(request.param)
    learned = train(train_trace, VARIANTS[request.param], gates=gates)
    torch.set_num_threads(threads)
    return request.param, learned, test_trace


def _assert_same_predictions(compiled: np.ndarray, reference: np.ndarray, k: int) -> None:
    np.testing.assert_allclose(compiled, reference, rtol=RTOL, atol=ATOL)
    order = np.sort(reference, axis=2)[:, :, ::-1]
    clear = order[:, :, k - 1] - order[:, :, k] > RTOL * order[:, :, k - 1] + ATOL  # no near-tie at the k-th place
    assert clear.mean() > 0.9
    top = (lambda scores: np.sort(np.argsort(-scores, axis=2, kind="stable")[:, :, :k], axis=2))
    assert np.array_equal(top(compiled)[clear], top(reference)[clear])


def _contexts(context: RouteContext):
    """The context as recorded, without each optional input the model can do without, and with an expert
    listed twice in a layer's top-k (counted once, as a multi-hot counts it)."""
    yield context
    yield replace(context, token_ids=None)
    yield replace(context, previous=None, activation=None)
    repeated = (lambda ids: np.concatenate([ids[:, :, :1], ids[:, :, :-1]], axis=2))
    yield replace(context, current=repeated(context.current), previous=repeated(context.previous))


def test_the_compiled_forward_predicts_what_the_torch_forward_does_at_every_anchor_and_distance(model):
    name, learned, test_trace = model
    compiled, reference = learned.to("cpu", compiled_max_batch=ALWAYS), learned.to("cpu", compiled_max_batch=0)
    depth = learned.config.max_distance
    uses_hidden = 0
    for batch in anchor_batches(test_trace, depth, anchors=ANCHORS):
        uses_hidden += learned.net.hidden_heads[batch.anchor_layer + 1]
        for context in _contexts(batch.context):
            for distance in range(1, depth + 1):
                _assert_same_predictions(compiled.predict(context, distance), reference.predict(context, distance),
                                         test_trace.top_k)
    assert uses_hidden == {"hidden": len(ANCHORS) - 1, "hidden+embedding": len(ANCHORS)}.get(name, 0)


def test_a_batch_above_the_threshold_runs_the_torch_forward(model):
    _, learned, test_trace = model
    batch = next(iter(anchor_batches(test_trace, 2, anchors=range(1, 2))))
    reference = learned.to("cpu", compiled_max_batch=0).predict(batch.context, 2)
    served = learned.to("cpu", compiled_max_batch=batch.rows.size - 1).predict(batch.context, 2)
    assert np.array_equal(served, reference)  # bit for bit: the same torch kernels ran


def test_a_half_precision_hidden_state_is_widened_as_the_torch_forward_widens_it(model):
    name, learned, test_trace = model
    if not name.startswith("hidden"):
        pytest.skip("the model has no hidden-state paths")
    batch = next(iter(anchor_batches(test_trace, 2, anchors=range(1, 2))))
    context = replace(batch.context, hidden=batch.context.hidden.to(torch.bfloat16))
    compiled = learned.to("cpu", compiled_max_batch=ALWAYS).predict(context, 2)
    _assert_same_predictions(compiled, learned.to("cpu", compiled_max_batch=0).predict(context, 2), test_trace.top_k)


def test_an_expert_id_beyond_the_model_raises_trace_error(model):
    _, learned, _ = model
    current = np.full((1, TRACE.num_layers, TRACE.top_k), -1, dtype=np.int16)
    current[0, 0] = (1, TRACE.num_experts + 3)
    context = RouteContext(num_experts=TRACE.num_experts, layer=0, current=current,
                           hidden=torch.zeros(1, HIDDEN) if learned.net.hidden_size else None)
    with pytest.raises(TraceError, match=f"experts \\[{TRACE.num_experts + 3}\\]"):
        learned.predict(context, 1)


def test_a_negative_compiled_max_batch_is_refused(model):
    _, learned, _ = model
    with pytest.raises(ConfigError, match="compiled_max_batch"):
        learned.to("cpu", compiled_max_batch=-1)


def test_the_compiled_forward_is_several_times_faster_than_torch_for_one_token(model):
    _, learned, test_trace = model
    batch = next(iter(anchor_batches(test_trace, 3, anchors=range(1, 2))))
    context = RouteContext(num_experts=TRACE.num_experts, layer=1, current=batch.context.current[:1],
                           previous=batch.context.previous[:1], token_ids=batch.context.token_ids[:1],
                           hidden=None if batch.context.hidden is None else batch.context.hidden[:1])

    def fastest_us(predictor: LearnedPredictor) -> float:
        calls = []
        for _ in range(30):
            start = time.perf_counter()
            predictor.predict(context, 3)
            calls.append(time.perf_counter() - start)
        return min(calls) * 1e6

    compiled_us = fastest_us(learned.to("cpu", compiled_max_batch=ALWAYS))
    torch_us = fastest_us(learned.to("cpu", compiled_max_batch=0))
    assert compiled_us * 3 < torch_us, f"compiled {compiled_us:.0f} us, torch {torch_us:.0f} us per call"


@pytest.mark.gpu
def test_a_hidden_state_on_the_gpu_gives_the_host_predictions(model):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    name, learned, test_trace = model
    if not name.startswith("hidden"):
        pytest.skip("the model has no hidden-state paths")
    batch = next(iter(anchor_batches(test_trace, 2, anchors=range(1, 2))))
    on_gpu = replace(batch.context, hidden=batch.context.hidden.cuda())
    assert np.array_equal(learned.predict(on_gpu, 2), learned.predict(batch.context, 2))
    on_host = learned.to("cpu", compiled_max_batch=0)
    served = learned.to("cuda", compiled_max_batch=0)  # the torch forward on the GPU; the original stays on the CPU
    _assert_same_predictions(served.predict(on_gpu, 2), on_host.predict(batch.context, 2), test_trace.top_k)
