"""The token-id compression table groups tokens the way DeepSeek's CompressedTokenizer does."""

from __future__ import annotations

import pytest

from tiermem.engram.compression import build_compression_table, normalize_token_text
from tiermem.errors import ConfigError

TRICKY_TEXTS = [
    "Hello", "hello", " HELLO", "héllo", "Ｈｅｌｌｏ", "ﬁne", "Straße", "ΣΑΣ", "İstanbul", "  ", " ", "\t\n",
    "a\r\n b", "x\u00a0y", "\u2003lead", "trail\u3000", "\x1cfs", "ǅ", "Å", "ﾀ", "", "ᾈ", "①", "㎏",
]


def test_tokens_that_normalise_alike_share_an_id():
    decoded = ["Hello", " hello", "héllo", "HELLO ", "world", " ", "  ", "\ufffd"]
    raw = ["Hello", "Ġhello", "héllo", "HELLOĠ", "world", "Ġ", "ĠĠ", "<0xE2>"]
    table, count = build_compression_table(decoded, raw)
    assert table.tolist() == [0, 0, 0, 0, 1, 2, 2, 3]
    assert count == 4


def test_partial_utf8_tokens_keep_their_raw_string_as_key():
    table, count = build_compression_table(["\ufffd", "\ufffd"], ["<0xE2>", "<0x82>"])
    assert table.tolist() == [0, 1] and count == 2


def test_mismatched_inputs_raise():
    with pytest.raises(ConfigError):
        build_compression_table(["a"], [])


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_normaliser_matches_the_tokenizers_sequence_of_the_demo(text):
    tokenizers = pytest.importorskip("tokenizers")
    normalizers, regex = tokenizers.normalizers, tokenizers.Regex
    sentinel = "\ue000"
    demo = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(regex(r"[ \t\r\n]+"), " "), normalizers.Replace(regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])
    assert normalize_token_text(text) == demo.normalize_str(text)
