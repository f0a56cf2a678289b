"""Token-id compression: map raw tokenizer ids that normalise to the same text onto one id.

Rebuilds the table of DeepSeek's ``CompressedTokenizer`` (``engram_demo_v1.py``) without the
``tokenizers`` package: each token's decoded text goes through NFKC, NFD, accent stripping,
lower-casing, whitespace collapsing and stripping (a lone space stays a space); tokens whose
decoding holds U+FFFD (partial UTF-8) keep their raw token string as their key; an empty result
falls back to the decoded text. New ids are numbered in order of first appearance.

Invariant: the table maps every raw id to ``[0, num_compressed)``; equal keys share an id.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch

from tiermem.errors import ConfigError

REPLACEMENT_CHAR = "\ufffd"
_RUN_OF_SPACES = re.compile(r"[ \t\r\n]+")
# Rust's char::is_whitespace (what the tokenizers Strip normaliser uses); str.isspace differs on \x1c-\x1f.
_RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"


def normalize_token_text(text: str) -> str:
    """The demo's normaliser sequence applied to one decoded token."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    text = "".join(c.lower() for c in text)  # per character, like the Rust normaliser (no final-sigma rule)
    text = _RUN_OF_SPACES.sub(" ", text)
    if text == " ":
        return " "
    return text.strip(_RUST_WHITESPACE)


def build_compression_table(decoded: Sequence[str], raw_tokens: Sequence[str]) -> tuple[torch.Tensor, int]:
    """Compression table from every token's decoded text and raw token string (index = raw id).

    With a transformers tokenizer: ``decoded[i] = tok.decode([i], skip_special_tokens=False)`` and
    ``raw_tokens[i] = tok.convert_ids_to_tokens(i)``. Returns (int64 ``[raw_vocab]``, number of
    compressed ids); the number is ``EngramHashConfig.vocab_size``.
    """
    if len(decoded) != len(raw_tokens) or not decoded:
        raise ConfigError(f"engram compression: need one decoded text and one raw token per id, got "
                          f"{len(decoded)} and {len(raw_tokens)}")
    key_to_id: dict[str, int] = {}
    new_ids = []
    for text, raw in zip(decoded, raw_tokens):
        key = raw if REPLACEMENT_CHAR in text else (normalize_token_text(text) or text)
        new_ids.append(key_to_id.setdefault(key, len(key_to_id)))
    return torch.tensor(new_ids, dtype=torch.int64), len(key_to_id)
