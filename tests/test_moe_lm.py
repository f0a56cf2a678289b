"""The MoE language model benchmark (bench/moe_lm) on tiny shapes: training, the document split, recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.moe_lm.data import Corpus, WindowSampler, held_out_sequences, split_documents
from bench.moe_lm.evaluate import run
from bench.moe_lm.model import ModelConfig, MoeLM, router_gates
from bench.moe_lm.record import gate_agreement, record
from bench.moe_lm.train import Stop, TrainConfig, fit, held_out_loss
from tiermem.predict import LearnedConfig
from tiermem.predict.contexts import EMBEDDING, anchor_batches
from tiermem.predict.trace import DECODE, PREFILL

VOCAB = 128  # > 3 * DOCS: every document owns a band of 3 token ids
TINY = ModelConfig(vocab_size=VOCAB, seq_len=32, d_model=32, num_heads=2, num_layers=3, num_experts=8, top_k=2,
                   expert_ffn=16)
DOCS = 40
DOC_TOKENS = 48
PROMPT = 8


def corpus_of_unique_documents() -> Corpus:
    """Document i holds only token ids from its own band, so any token tells which document it came from."""
    rng = np.random.default_rng(0)
    docs = [np.r_[rng.integers(1 + 3 * i, 4 + 3 * i, DOC_TOKENS), 0] for i in range(DOCS // 2)]
    docs += [np.r_[np.arange(DOC_TOKENS) % 3 + 1 + 3 * i, 0] for i in range(DOCS // 2, DOCS)]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.r_[0, np.cumsum([d.size for d in docs])]
    return Corpus(tokens, offsets, VOCAB, eos_id=0)


def tiny_model(seed: int = 0) -> MoeLM:
    torch.manual_seed(seed)
    return MoeLM(TINY).eval()


def test_document_split_is_disjoint_complete_and_seeded():
    train, held = split_documents(DOCS, 0.25, seed=3)
    assert np.intersect1d(train, held).size == 0
    assert np.array_equal(np.union1d(train, held), np.arange(DOCS))
    assert held.size == DOCS // 4
    assert all(np.array_equal(a, b) for a, b in zip((train, held), split_documents(DOCS, 0.25, seed=3)))
    assert not np.array_equal(held, split_documents(DOCS, 0.25, seed=4)[1])


def test_training_windows_and_held_out_sequences_never_cross_the_split():
    corpus = corpus_of_unique_documents()
    train, held = split_documents(DOCS, 0.25, seed=0)
    held_bands = {(int(t) - 1) // 3 for d in held for t in corpus.document(int(d))[:-1]}
    sampler = WindowSampler(corpus.stream(train), seq_len=16, batch_size=64, seed=0)
    seen = np.concatenate([torch.cat(sampler.next(), dim=1).numpy().reshape(-1) for _ in range(10)])
    assert not held_bands & {(int(t) - 1) // 3 for t in seen if t != corpus.eos_id}
    sequences = held_out_sequences(corpus, held, count=4, max_tokens=20, min_tokens=20, seed=0)
    assert [doc for doc, _ in sequences] == sorted(doc for doc, _ in sequences)
    assert all(doc in held and np.array_equal(tokens, corpus.document(doc)[:20]) for doc, tokens in sequences)


def test_tiny_model_loss_drops_within_a_few_steps():
    corpus = corpus_of_unique_documents()
    stream = corpus.stream(np.arange(DOCS))
    model = tiny_model().train()
    batches = [WindowSampler(stream, TINY.seq_len, 16, seed=1).next() for _ in range(2)]
    before = held_out_loss(model, batches)
    config = TrainConfig(steps=40, batch_size=16, learning_rate=1e-2, warmup_steps=5, eval_every=1000, log_every=10)
    result = fit(model, WindowSampler(stream, TINY.seq_len, 16, seed=0), batches, config)
    assert result.steps == 40 and result.stopped_by is Stop.STEPS
    assert result.held_out_loss < before - 1.0
    assert np.isfinite(result.balance_loss)


def test_training_stops_at_the_wall_budget_before_the_step_count():
    corpus = corpus_of_unique_documents()
    sampler = WindowSampler(corpus.stream(np.arange(DOCS)), TINY.seq_len, 4, seed=0)
    config = TrainConfig(steps=10_000, time_budget_s=0.2, batch_size=4, eval_batches=1, log_every=1000)
    result = fit(tiny_model().train(), sampler, [sampler.next()], config)
    assert result.stopped_by is Stop.TIME and 0 < result.steps < config.steps
    assert np.isfinite(result.held_out_loss)


def test_recorded_experts_are_each_routers_top_k_on_the_unpadded_sequence():
    model = tiny_model()
    rng = np.random.default_rng(1)
    sequences = [(2, rng.integers(1, VOCAB, 30)), (5, rng.integers(1, VOCAB, 17)), (9, rng.integers(1, VOCAB, 24))]
    trace = record(model, sequences, prompt_tokens=PROMPT, batch_size=2)

    logits: list[torch.Tensor] = []
    hooks = [b.moe.router.register_forward_hook(lambda _m, _i, out: logits.append(out)) for b in model.blocks]
    for seq, tokens in sequences:
        logits.clear()
        with torch.inference_mode():
            model(torch.from_numpy(tokens)[None])
        expected = np.stack([np.sort(x.topk(TINY.top_k, dim=-1).indices.numpy(), axis=-1) for x in logits], axis=1)
        rows = trace.seq_id == seq
        assert np.array_equal(np.sort(trace.experts[rows], axis=-1), expected)
        assert np.array_equal(trace.token_ids[rows], tokens)
    for hook in hooks:
        hook.remove()

    total = sum(t.size for _, t in sequences)
    assert trace.hidden.shape == (total, TINY.num_layers, TINY.d_model) and trace.hidden.dtype == np.float16
    assert trace.extras["embedding"].shape == (total, TINY.d_model)
    assert np.allclose(trace.weights.astype(np.float32).sum(axis=-1), 1.0, atol=1e-2)
    assert np.array_equal(trace.phase, np.where(trace.pos < PROMPT, PREFILL, DECODE))
    assert gate_agreement(trace, router_gates(model)) > 0.99


def test_contexts_hold_the_anchor_layers_router_input_and_every_predictor_is_scored():
    model = tiny_model()
    rng = np.random.default_rng(2)
    trace = record(model, [(s, rng.integers(1, VOCAB, 24)) for s in range(6)], prompt_tokens=PROMPT)
    for batch in anchor_batches(trace, 2, anchors=range(-1, TINY.num_layers)):
        source = trace.extras[EMBEDDING] if batch.anchor_layer < 0 else trace.hidden[:, batch.anchor_layer]
        assert np.array_equal(batch.context.hidden.numpy(), source[batch.rows].astype(np.float32))
    report, costs = run(trace, router_gates(model), LearnedConfig(max_steps=20, hidden_dim=16), folds=2, device="cpu")
    assert set(report.predictors) == {"popularity", "frequency", "cooccurrence", "activation-match", "next-gate",
                                      "learned", "learned+hidden", "oracle"}
    for name in report.predictors:
        for distance in range(1, 5):
            assert report.tally(name, "decode", distance).targets > 0
    assert report.tally("oracle", "decode", 2).recall_k == pytest.approx(1.0)
    assert report.tally("next-gate", "decode", 1).recall_k < 0.99  # no look at the target router's own input
    expected = {(name, path, batch) for name in ("learned", "learned+hidden") for path in ("compiled", "torch@cpu")
                for batch in (1, 8)}
    assert {(c.predictor, c.path, c.batch) for c in costs} == expected and min(c.us_per_call for c in costs) > 0
