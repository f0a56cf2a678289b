"""Hashing agrees with a plain-Python transcription of DeepSeek's NgramHashMapping on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiermem.config import from_dict
from tiermem.engram.hashing import EngramHashConfig, NgramHasher, head_primes, is_prime, layer_multipliers
from tiermem.errors import ConfigError

BATCH = 3
WINDOW = 9
ENGRAM_27B_ROWS_PER_HEAD = 2_262_400

CONFIGS = {
    "orders-2-3": EngramHashConfig(vocab_size=1000, layer_ids=(1, 15), rows_per_head=(311, 401)),
    "order-4": EngramHashConfig(vocab_size=50_000, layer_ids=(2,), rows_per_head=(997, 997, 1200),
                                max_ngram_order=4, heads_per_order=3, pad_id=7, seed=5),
    "one-head-equal-sizes": EngramHashConfig(vocab_size=64, layer_ids=(0, 3, 9), rows_per_head=(101,),
                                             max_ngram_order=2, heads_per_order=1, pad_id=0),
}


def reference_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def reference_hash(config: EngramHashConfig, ids: list[list[int]], num_positions: int,
                   compression: list[int] | None = None) -> dict[int, list]:
    """The demo's algorithm, one token at a time, in Python integers."""
    seen: set[int] = set()
    primes = {}
    for layer in config.layer_ids:
        layer_primes = []
        for requested in config.rows_per_head:
            start = requested - 1
            for _ in range(config.heads_per_order):
                candidate = start + 1
                while not (reference_is_prime(candidate) and candidate not in seen):
                    candidate += 1
                seen.add(candidate)
                layer_primes.append(candidate)
                start = candidate
        primes[layer] = layer_primes
    half_bound = max(1, ((2 ** 63 - 1) // config.vocab_size) // 2)
    compress = (lambda t: compression[t]) if compression else (lambda t: t)
    pad = compress(config.pad_id)
    out = {}
    for layer in config.layer_ids:
        rng = np.random.default_rng(config.seed + 10007 * layer)
        draws = rng.integers(low=0, high=half_bound, size=(config.max_ngram_order,), dtype=np.int64)
        multipliers = [int(r) * 2 + 1 for r in draws]
        offsets = [sum(primes[layer][:h]) for h in range(len(primes[layer]))]
        per_sequence = []
        for sequence in ids:
            tokens = [compress(t) for t in sequence]
            per_position = []
            for t in range(len(tokens) - num_positions, len(tokens)):
                back = [tokens[t - k] if t - k >= 0 else pad for k in range(config.max_ngram_order)]
                row = []
                for n in range(2, config.max_ngram_order + 1):
                    mix = back[0] * multipliers[0]
                    for k in range(1, n):
                        mix ^= back[k] * multipliers[k]
                    for j in range(config.heads_per_order):
                        head = (n - 2) * config.heads_per_order + j
                        row.append(mix % primes[layer][head] + offsets[head])
                per_position.append(row)
            per_sequence.append(per_position)
        out[layer] = per_sequence
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_positions", [1, 4, WINDOW])
def test_vectorised_hash_matches_reference_on_random_ids(name, num_positions):
    config = CONFIGS[name]
    ids = torch.randint(0, config.vocab_size, (BATCH, WINDOW), generator=torch.Generator().manual_seed(3))
    got = NgramHasher(config).hash(ids, num_positions)
    expected = reference_hash(config, ids.tolist(), num_positions)
    assert list(got) == list(config.layer_ids)
    for layer in config.layer_ids:
        assert got[layer].tolist() == expected[layer]


def test_hash_with_compression_table_matches_reference():
    raw_vocab = 500
    config = CONFIGS["orders-2-3"]
    compression = torch.randint(0, config.vocab_size, (raw_vocab,), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, raw_vocab, (BATCH, WINDOW), generator=torch.Generator().manual_seed(2))
    got = NgramHasher(config, compression).hash(ids, WINDOW)
    expected = reference_hash(config, ids.tolist(), WINDOW, compression.tolist())
    for layer in config.layer_ids:
        assert got[layer].tolist() == expected[layer]


def test_decode_window_gives_the_prefill_indices_of_its_last_position():
    config = CONFIGS["order-4"]
    hasher = NgramHasher(config)
    ids = torch.randint(0, config.vocab_size, (BATCH, 20))
    prefill = hasher.hash(ids, 20)[2]
    recent = hasher.hash(ids[:, -config.max_ngram_order:], 1)[2]
    assert torch.equal(recent[:, 0], prefill[:, -1])


def test_indices_stay_inside_their_head_and_layer_table():
    config = CONFIGS["orders-2-3"]
    hasher = NgramHasher(config)
    ids = torch.randint(0, config.vocab_size, (64, WINDOW))
    for layer, indices in hasher.hash(ids, WINDOW).items():
        starts = torch.tensor(hasher.offsets[layer])
        sizes = torch.tensor(hasher.primes[layer])
        assert bool(((indices >= starts) & (indices < starts + sizes)).all())
        assert int(indices.max()) < hasher.rows_for_layer(layer)


def test_primes_are_distinct_primes_at_or_above_the_requested_rows():
    config = EngramHashConfig(vocab_size=129_280, layer_ids=(2, 15),
                              rows_per_head=(ENGRAM_27B_ROWS_PER_HEAD, ENGRAM_27B_ROWS_PER_HEAD))
    primes = head_primes(config)
    flat = [p for layer in config.layer_ids for p in primes[layer]]
    assert len(flat) == len(set(flat)) == 2 * 2 * 8
    assert all(reference_is_prime(p) and p >= ENGRAM_27B_ROWS_PER_HEAD for p in flat)
    assert primes == head_primes(config)  # deterministic
    assert max(flat) - ENGRAM_27B_ROWS_PER_HEAD < 2_000  # "near": prime gaps are tiny at this size


def test_miller_rabin_agrees_with_trial_division():
    assert [n for n in range(5_000) if is_prime(n)] == [n for n in range(5_000) if reference_is_prime(n)]
    assert is_prime(2_305_843_009_213_693_951) and not is_prime(2_305_843_009_213_693_953)


def test_multipliers_are_odd_and_differ_per_layer():
    config = CONFIGS["orders-2-3"]
    first, second = (layer_multipliers(config, layer) for layer in config.layer_ids)
    assert all(m % 2 == 1 for m in first + second) and first != second
    assert len(first) == config.max_ngram_order


@pytest.mark.parametrize("bad", [
    {"rows_per_head": [100]},  # orders 2 and 3 need two entries
    {"layer_ids": [1, 1]},
    {"layer_ids": []},
    {"max_ngram_order": 1, "rows_per_head": []},
    {"heads_per_order": 0},
    {"vocab_size": 0},
    {"unknown_key": 1},
])
def test_bad_hash_config_raises_config_error(bad):
    base = {"vocab_size": 1000, "layer_ids": [1, 15], "rows_per_head": [311, 401]}
    with pytest.raises(ConfigError):
        from_dict(EngramHashConfig, {**base, **bad})


def test_out_of_vocabulary_ids_and_bad_shapes_raise():
    hasher = NgramHasher(CONFIGS["orders-2-3"])
    with pytest.raises(ConfigError, match=r"\[0, 1000\)"):
        hasher.hash(torch.tensor([[1, 1000]]))
    with pytest.raises(ConfigError, match="num_positions"):
        hasher.hash(torch.tensor([[1, 2]]), num_positions=3)
    with pytest.raises(ConfigError, match="compression table values"):
        NgramHasher(CONFIGS["orders-2-3"], torch.tensor([0, 1000]))


@pytest.mark.gpu
def test_hash_on_gpu_matches_cpu():
    config = CONFIGS["order-4"]
    hasher = NgramHasher(config)
    ids = torch.randint(0, config.vocab_size, (BATCH, WINDOW))
    cpu = hasher.hash(ids, WINDOW)
    gpu = hasher.hash(ids.cuda(), WINDOW)
    for layer in config.layer_ids:
        assert torch.equal(gpu[layer].cpu(), cpu[layer])
