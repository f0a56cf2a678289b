"""The token corpus on disk, its split by document, and the windows and sequences cut from it.

Invariants:
- The split is by document: ``split_documents`` returns disjoint, sorted train and held-out document
  ids from a seeded permutation, so held-out text is never trained on (documents that repeat another's
  text exactly were dropped when the corpus was built).
- ``WindowSampler`` draws ``seq_len + 1`` token windows from one stream (the concatenated documents of
  one side of the split) with its own seeded generator: the same seed gives the same batches.
- Needs only numpy and torch (no ``tokenizers``): this module also runs on the GPU machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiermem.errors import ConfigError

CORPUS_DIR = Path(".moe_lm")
EOS_TOKEN = "<|endoftext|>"
MANIFEST_FORMAT = "tiermem.moe-lm-corpus/1"


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids of every document, end to end, with the offset of each document."""

    tokens: np.ndarray  # uint16 [N]; every document ends with eos_id
    doc_offsets: np.ndarray  # int64 [D + 1]
    vocab_size: int
    eos_id: int

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.size - 1)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def document(self, doc: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[doc]:self.doc_offsets[doc + 1]]

    def stream(self, docs: np.ndarray) -> np.ndarray:
        """The tokens of ``docs`` (ascending ids), concatenated."""
        return np.concatenate([self.document(int(d)) for d in docs]) if len(docs) else np.empty(0, np.uint16)


def load_corpus(directory: Path = CORPUS_DIR) -> Corpus:
    """Read the corpus written by ``bench.moe_lm.corpus``; a missing or foreign folder raises ``ConfigError``."""
    fix = "build it on the CPU machine with `python -m bench.moe_lm.corpus` (and carry .moe_lm to the GPU machine)"
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        tokens = np.load(directory / "tokens.npy", allow_pickle=False)
        offsets = np.load(directory / "doc_offsets.npy", allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"moe_lm: corpus file {exc.filename} is missing; {fix}") from None
    if manifest.get("format") != MANIFEST_FORMAT or tokens.dtype != np.uint16 or offsets[-1] != tokens.size:
        raise ConfigError(f"moe_lm: {directory} is not a {MANIFEST_FORMAT} corpus (or is truncated); {fix}")
    return Corpus(tokens, offsets.astype(np.int64), int(manifest["vocab_size"]), int(manifest["eos_id"]))


def split_documents(num_docs: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted ``(train, held_out)`` document ids; both sides hold at least one document."""
    if num_docs < 2 or not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"moe_lm: a split needs >= 2 documents and 0 < held_out_fraction < 1; got {num_docs} "
                          f"documents and {held_out_fraction}")
    count = min(max(1, round(held_out_fraction * num_docs)), num_docs - 1)
    order = np.random.default_rng(seed).permutation(num_docs)
    return np.sort(order[count:]), np.sort(order[:count])


class WindowSampler:
    """Seeded random windows of ``seq_len + 1`` tokens from one stream, as ``(inputs, labels)`` on ``device``."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, *, seed: int,
                 device: torch.device | str = "cpu") -> None:
        if stream.size < seq_len + 2:
            raise ConfigError(f"moe_lm: a stream of {stream.size} tokens is too short for windows of {seq_len + 1}")
        self.stream = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._span = torch.arange(seq_len + 1, device=device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.stream.numel() - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        windows = self.stream[starts.to(self.stream.device)[:, None] + self._span]
        return windows[:, :-1], windows[:, 1:]


def held_out_sequences(corpus: Corpus, docs: np.ndarray, *, count: int, max_tokens: int, min_tokens: int,
                       seed: int) -> list[tuple[int, np.ndarray]]:
    """``(doc, tokens)`` for ``count`` seeded picks among ``docs`` with >= ``min_tokens`` tokens, ascending doc ids.

    Each sequence is the start of its document, up to ``max_tokens`` tokens (end-of-text excluded).
    """
    lengths = corpus.doc_lengths()[docs] - 1
    eligible = docs[lengths >= min_tokens]
    if eligible.size < count:
        raise ConfigError(f"moe_lm: only {eligible.size} held-out documents have >= {min_tokens} tokens, asked for "
                          f"{count} sequences; lower --sequences or --min-tokens")
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=count, replace=False))
    return [(int(d), corpus.document(int(d))[:-1][:max_tokens]) for d in chosen]
