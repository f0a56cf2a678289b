"""Token streams for ``tiermem bench engram``: decode steps that walk real documents, or uniform random ids.

A corpus folder holds ``tokens.npy`` (int ids, every document end to end) and ``doc_offsets.npy``
(``[D + 1]``: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``), as written by
``python -m bench.moe_lm.corpus``. Documents are split by parity: even documents are the
*profiling* side (a hot-row cache is chosen from how often their n-grams look each row up), odd
documents the *measured* side (decode steps). No text is on both sides.

Invariants: a corpus stream's decode step ``t`` gives each of its ``batch`` sequences the window of
its own measured document that ends ``t`` tokens after its seeded starting point, so successive
steps walk forward through real text, one token per step; streams are deterministic for a seed;
the random stream draws uniform ids (no reuse beyond chance), the first benches' input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiermem.engram import EngramTable, HotRowCache, NgramHasher
from tiermem.errors import ConfigError

PROFILE_CHUNK_TOKENS = 1 << 20  # profiling tokens whose row indices are counted at once


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids of every document, end to end, with each document's offset."""

    tokens: np.ndarray  # int [N]
    doc_offsets: np.ndarray  # int64 [D + 1]
    source: str

    @classmethod
    def load(cls, directory: Path) -> Corpus:
        """Read ``tokens.npy`` and ``doc_offsets.npy``; a missing or inconsistent folder raises ConfigError."""
        fix = "build it with `python -m bench.moe_lm.corpus` on the CPU machine and carry .moe_lm to this one"
        try:
            tokens = np.load(directory / "tokens.npy", allow_pickle=False)
            offsets = np.load(directory / "doc_offsets.npy", allow_pickle=False).astype(np.int64)
        except FileNotFoundError as exc:
            raise ConfigError(f"engram bench: corpus file {exc.filename} is missing; {fix}") from None
        if tokens.ndim != 1 or offsets.ndim != 1 or offsets.size < 3 or offsets[0] != 0 or offsets[-1] != tokens.size \
                or np.any(np.diff(offsets) < 0):
            raise ConfigError(f"engram bench: {directory} holds {tokens.size} tokens and {offsets.size} offsets that "
                              f"do not describe >= 2 documents end to end; {fix}")
        return cls(tokens, offsets, str(directory))

    @property
    def num_docs(self) -> int:
        return self.doc_offsets.size - 1

    def document(self, doc: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[doc]:self.doc_offsets[doc + 1]]

    def profile_docs(self) -> list[int]:
        return list(range(0, self.num_docs, 2))

    def measured_docs(self) -> list[int]:
        return list(range(1, self.num_docs, 2))


class CorpusStream:
    """Decode windows of ``batch`` sequences, each walking one measured document from a seeded point."""

    def __init__(self, corpus: Corpus, *, seed: int = 0) -> None:
        self.corpus = corpus
        self.seed = seed
        self.label = f"corpus {corpus.source} (odd documents; caches profiled on even documents)"

    def decode_windows(self, batch: int, window: int, steps: int) -> list[torch.Tensor]:
        """``steps`` int64 ``[batch, window]`` host tensors; step ``t + 1`` is step ``t`` one token further on."""
        span = window + steps - 1
        docs = [d for d in self.corpus.measured_docs() if self.corpus.document(d).size >= span]
        if len(docs) < batch:
            raise ConfigError(f"engram bench: only {len(docs)} measured documents of the corpus hold >= {span} "
                              f"tokens, {batch} sequences need one each; use fewer --steps or smaller --batches")
        rng = np.random.default_rng(self.seed)
        walks = []
        for doc in rng.choice(np.array(docs), size=batch, replace=False):
            text = self.corpus.document(int(doc))
            start = int(rng.integers(0, text.size - span + 1))  # a request somewhere in its text
            walks.append(text[start:start + span])
        walk = torch.from_numpy(np.stack(walks).astype(np.int64))
        return [walk[:, t:t + window] for t in range(steps)]

    def prefill(self, sequences: int, positions: int, window: int) -> torch.Tensor:
        """``[sequences, positions + window]`` ids: a chunk of real text per sequence (a prefill)."""
        return torch.cat(self.decode_windows(sequences, positions + window, 1))


class RandomStream:
    """Uniform random ids below ``vocab`` (the fallback when no corpus is given)."""

    def __init__(self, vocab: int, *, seed: int = 0) -> None:
        self.vocab = vocab
        self.generator = torch.Generator().manual_seed(seed)
        self.label = f"uniform random ids below {vocab}"

    def decode_windows(self, batch: int, window: int, steps: int) -> list[torch.Tensor]:
        return [torch.randint(0, self.vocab, (batch, window), generator=self.generator) for _ in range(steps)]

    def prefill(self, sequences: int, positions: int, window: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (sequences, positions + window), generator=self.generator)


def row_counts(hasher: NgramHasher, corpus: Corpus, device: torch.device,
               max_tokens: int | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """(lookups per table row of each layer, tokens hashed) over the profiling documents, on ``device``.

    Each document is hashed on its own (its first positions see pad tokens, as in serving); with
    ``max_tokens``, profiling stops after the document that reaches it.
    """
    vocab = hasher.raw_vocab_size
    if int(corpus.tokens.max()) >= vocab:
        raise ConfigError(f"engram bench: the corpus holds token id {int(corpus.tokens.max())}, the Engram hash "
                          f"config takes ids below {vocab}; use a corpus of that tokenizer")
    counts = {layer: torch.zeros(hasher.rows_for_layer(layer), dtype=torch.int64, device=device)
              for layer in hasher.config.layer_ids}
    pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in counts}
    hashed = pending_tokens = 0

    def flush() -> None:
        for layer, parts in pending.items():
            if parts:
                counts[layer] += torch.bincount(torch.cat(parts), minlength=counts[layer].numel())
                parts.clear()

    for doc in corpus.profile_docs():
        text = torch.from_numpy(corpus.document(doc).astype(np.int64)).to(device)
        if text.numel() == 0:
            continue
        for layer, indices in hasher.hash(text[None], text.numel()).items():
            pending[layer].append(indices.reshape(-1))
        hashed += text.numel()
        pending_tokens += text.numel()
        if pending_tokens >= PROFILE_CHUNK_TOKENS:
            flush()
            pending_tokens = 0
        if max_tokens is not None and hashed >= max_tokens:
            break
    flush()
    return counts, hashed


def build_caches(tables: dict[int, EngramTable], counts: dict[int, torch.Tensor], fraction: float,
                 device: torch.device) -> dict[int, HotRowCache]:
    """Per layer, an HBM cache of the ``fraction`` of its rows that the profiling text looked up most."""
    return {layer: HotRowCache.from_counts(table, counts[layer], max(1, int(table.layout.num_rows * fraction)), device)
            for layer, table in tables.items()}
