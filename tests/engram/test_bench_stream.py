"""Bench token streams: decode steps walk measured documents; caches are profiled on the other documents only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tiermem.bench.engram_stream import Corpus, CorpusStream, RandomStream, row_counts
from tiermem.engram import EngramHashConfig, NgramHasher
from tiermem.errors import ConfigError

DOCS = 12
DOC_TOKENS = 40
PROFILE_VOCAB = 10  # even documents use ids [0, 10); odd ones [10, 20)
WINDOW = 3
HASH = EngramHashConfig(vocab_size=2 * PROFILE_VOCAB, layer_ids=(1,), rows_per_head=(211, 223), heads_per_order=2,
                        max_ngram_order=WINDOW)


def write_corpus(directory, docs=DOCS):
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, PROFILE_VOCAB, DOC_TOKENS) + PROFILE_VOCAB * (doc % 2) for doc in range(docs)]
    np.save(directory / "tokens.npy", np.concatenate(texts).astype(np.uint16))
    np.save(directory / "doc_offsets.npy", np.arange(docs + 1) * DOC_TOKENS)
    return Corpus.load(directory), texts


def test_decode_steps_walk_measured_documents_one_token_per_step(tmp_path):
    corpus, texts = write_corpus(tmp_path)
    windows = CorpusStream(corpus, seed=3).decode_windows(batch=4, window=WINDOW, steps=6)
    assert all(w.shape == (4, WINDOW) for w in windows)
    for earlier, later in itertools.pairwise(windows):
        assert torch.equal(later[:, :-1], earlier[:, 1:])
    walks = torch.cat([windows[0], torch.stack([w[:, -1] for w in windows[1:]], dim=1)], dim=1)
    odd_texts = [texts[d].tolist() for d in range(1, DOCS, 2)]
    for walk in walks.tolist():  # each sequence is a contiguous piece of one measured (odd) document
        assert any(any(text[i:i + len(walk)] == walk for i in range(DOC_TOKENS)) for text in odd_texts)
    again = CorpusStream(corpus, seed=3).decode_windows(batch=4, window=WINDOW, steps=6)
    assert all(torch.equal(a, b) for a, b in zip(windows, again))


def test_cache_profile_counts_only_the_even_documents(tmp_path):
    corpus, texts = write_corpus(tmp_path)
    hasher = NgramHasher(HASH)
    counts, tokens = row_counts(hasher, corpus, torch.device("cpu"))
    expected = torch.zeros(hasher.rows_for_layer(1), dtype=torch.int64)
    for text in texts[0::2]:
        ids = torch.from_numpy(text.astype(np.int64))[None]
        expected += torch.bincount(hasher.hash(ids, ids.shape[1])[1].reshape(-1), minlength=expected.numel())
    assert tokens == DOCS // 2 * DOC_TOKENS
    assert torch.equal(counts[1], expected)


def test_too_few_long_documents_for_the_batch_is_refused(tmp_path):
    corpus, _ = write_corpus(tmp_path)
    with pytest.raises(ConfigError, match="measured documents"):
        CorpusStream(corpus).decode_windows(batch=DOCS, window=WINDOW, steps=2)


def test_missing_corpus_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(ConfigError, match="bench.moe_lm.corpus"):
        Corpus.load(tmp_path)


def test_random_stream_stays_below_its_vocabulary():
    windows = RandomStream(7, seed=0).decode_windows(batch=5, window=WINDOW, steps=4)
    assert all(int(w.max()) < 7 and w.shape == (5, WINDOW) for w in windows)
