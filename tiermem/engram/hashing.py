"""DeepSeek-compatible n-gram hashing: token ids -> row indices into each Engram layer's flat table.

Follows ``NgramHashMapping`` of DeepSeek's published ``engram_demo_v1.py``:

- token ids first go through an optional compression table (many raw ids -> one normalised id);
- for every position, the suffix n-grams of orders ``2 .. max_ngram_order`` are hashed;
- each layer has ``max_ngram_order`` odd multipliers ``2 * r + 1``, ``r`` drawn by
  ``numpy.random.default_rng(seed + 10007 * layer_id).integers(0, half_bound, max_ngram_order)``
  with ``half_bound = max(1, (int64_max // vocab_size) // 2)``;
- the order-``n`` mix is ``(t[0] * m[0]) ^ (t[1] * m[1]) ^ ... ^ (t[n-1] * m[n-1])`` where ``t[k]``
  is the token ``k`` positions back (positions before the window hold the compressed pad id);
- every order has ``heads_per_order`` heads that share the mix and differ only in their modulus: a
  prime, the smallest one not yet used that is ``>=`` the requested rows per head (the search runs
  over layers in ``layer_ids`` order, then orders, then heads, so every prime is distinct);
- all heads of a layer share one flat table; head ``h``'s rows start at the sum of the primes of the
  heads before it (order 2's heads first).

Invariants: the products cannot overflow int64 because ``ids < vocab_size`` bounds them (this is
why the multipliers depend on ``vocab_size``); every index returned for a layer is below
``rows_for_layer(layer_id)``; the same config yields the same indices on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tiermem.config import option, require
from tiermem.errors import ConfigError

LAYER_SEED_STRIDE = 10007  # the demo's PRIME_1: seed of layer l is seed + 10007 * l
_INT64_MAX = int(np.iinfo(np.int64).max)
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # exact below 3.3e24


@dataclass(frozen=True)
class EngramHashConfig:
    """How token ids map to table rows; every field changes the indices, so it is part of a model."""

    vocab_size: int = option(help="distinct ids fed to the hash, i.e. after compression (the demo's "
                                  "len(CompressedTokenizer)); it bounds the multipliers")
    layer_ids: tuple[int, ...] = option(help="every layer that has an Engram, in model order; primes are "
                                             "drawn for them in this order, so the whole tuple matters")
    rows_per_head: tuple[int, ...] = option(help="requested rows of each head, one entry per order "
                                                 "(2, 3, ...); each head gets a distinct prime >= this")
    max_ngram_order: int = option(3, help="largest n-gram order; orders 2..max_ngram_order are hashed")
    heads_per_order: int = option(8, help="hash heads per order (distinct prime moduli)")
    pad_id: int = option(2, help="raw token id that fills positions before the start of a sequence")
    seed: int = option(0, help="seed of the per-layer multipliers")

    def __post_init__(self) -> None:
        require(self.vocab_size >= 1, self, f"vocab_size must be >= 1, got {self.vocab_size}")
        require(2 <= self.max_ngram_order <= 8, self,
                f"max_ngram_order must be in 2..8, got {self.max_ngram_order}")
        require(self.heads_per_order >= 1, self, f"heads_per_order must be >= 1, got {self.heads_per_order}")
        require(len(self.layer_ids) >= 1, self, "layer_ids must name at least one layer")
        require(len(set(self.layer_ids)) == len(self.layer_ids) and min(self.layer_ids) >= 0, self,
                f"layer_ids must be distinct and >= 0, got {self.layer_ids}")
        require(len(self.rows_per_head) == self.max_ngram_order - 1, self,
                f"rows_per_head needs one entry per order 2..{self.max_ngram_order} "
                f"({self.max_ngram_order - 1} entries), got {len(self.rows_per_head)}")
        require(min(self.rows_per_head) >= 2, self, f"rows_per_head must be >= 2, got {self.rows_per_head}")
        require(self.pad_id >= 0, self, f"pad_id must be >= 0, got {self.pad_id}")

    @property
    def heads_per_layer(self) -> int:
        """Rows looked up per token per layer: (max_ngram_order - 1) * heads_per_order."""
        return (self.max_ngram_order - 1) * self.heads_per_order


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n below 3.3e24."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def head_primes(config: EngramHashConfig) -> dict[int, tuple[int, ...]]:
    """Layer id -> the prime row count of each head (order 2's heads first); all distinct."""
    seen: set[int] = set()
    primes: dict[int, tuple[int, ...]] = {}
    for layer_id in config.layer_ids:
        layer_primes = []
        for requested in config.rows_per_head:
            candidate = requested
            for _ in range(config.heads_per_order):
                while not is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                layer_primes.append(candidate)
                candidate += 1
        primes[layer_id] = tuple(layer_primes)
    return primes


def layer_multipliers(config: EngramHashConfig, layer_id: int) -> tuple[int, ...]:
    """The ``max_ngram_order`` odd multipliers of one layer, drawn exactly as the demo draws them."""
    half_bound = max(1, (_INT64_MAX // config.vocab_size) // 2)
    rng = np.random.default_rng(config.seed + LAYER_SEED_STRIDE * layer_id)
    draws = rng.integers(low=0, high=half_bound, size=(config.max_ngram_order,), dtype=np.int64)
    return tuple(int(r) * 2 + 1 for r in draws)


@dataclass(frozen=True)
class LayerHashConstants:
    """What a fused hash kernel needs for one layer, as tensors on the compute device."""

    multipliers: torch.Tensor  # int64 [max_ngram_order]
    primes: torch.Tensor  # int64 [heads_per_layer]
    offsets: torch.Tensor  # int64 [heads_per_layer]
    compression: torch.Tensor | None  # int64 [raw_vocab], or None without compression
    pad_id: int  # compressed id of the pad token
    raw_vocab_size: int


class NgramHasher:
    """Vectorised hashing for all Engram layers at once; runs on whatever device the ids live on.

    ``compression`` (int64 ``[raw_vocab]``, values in ``[0, vocab_size)``) is the optional token-id
    compression table; without it, ids are hashed as given and must be below ``vocab_size``.
    """

    def __init__(self, config: EngramHashConfig, compression: torch.Tensor | None = None) -> None:
        self.config = config
        self.primes = head_primes(config)
        self.offsets = {layer: tuple(int(x) for x in np.cumsum((0,) + p[:-1])) for layer, p in self.primes.items()}
        self.compression = None if compression is None else self._check_compression(compression)
        raw_vocab = config.vocab_size if self.compression is None else int(self.compression.numel())
        if config.pad_id >= raw_vocab:
            raise ConfigError(f"engram hashing: pad_id {config.pad_id} is not a token id (raw vocabulary "
                              f"has {raw_vocab} ids); set pad_id to the tokenizer's pad or eos id")
        self.raw_vocab_size = raw_vocab
        self.pad_id = config.pad_id if self.compression is None else int(self.compression[config.pad_id])
        layers = config.layer_ids
        self._multipliers = torch.tensor([layer_multipliers(config, layer) for layer in layers])  # [L, N]
        self._primes = torch.tensor([self.primes[layer] for layer in layers])  # [L, H]
        self._offsets = torch.tensor([self.offsets[layer] for layer in layers])  # [L, H]
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def rows_for_layer(self, layer_id: int) -> int:
        """Rows of the layer's flat table: the sum of its heads' primes."""
        return sum(self._layer_primes(layer_id))

    def hash(self, token_ids: torch.Tensor, num_positions: int = 1) -> dict[int, torch.Tensor]:
        """Row indices of the last ``num_positions`` positions of each sequence, per layer.

        ``token_ids`` is int ``[B, T]`` of raw ids: the window must start at the sequence start or
        hold at least ``max_ngram_order - 1`` tokens before the first hashed position (left-pad short
        sequences with ``pad_id``). Decode passes the recent tokens and ``num_positions=1``; a
        prefill passes the whole prompt and ``num_positions=T``. Returns layer id -> int64
        ``[B, num_positions, heads_per_layer]`` indices, offsets included, on ``token_ids.device``.
        """
        self.check_window(token_ids, num_positions)
        ids = self._compress(token_ids)
        multipliers, primes, offsets, _ = self._constants(ids.device)
        order = self.config.max_ngram_order
        window = ids.shape[1]
        padded = torch.nn.functional.pad(ids, (order - 1, 0), value=self.pad_id)
        start = window - num_positions
        mixed = []  # one [L, B, P] tensor per order
        mix = None
        for k in range(order):  # k tokens back from each hashed position
            shifted = padded[:, order - 1 - k + start: order - 1 - k + window]
            term = shifted.unsqueeze(0) * multipliers[:, k].view(-1, 1, 1)
            mix = term if mix is None else torch.bitwise_xor(mix, term)
            if k >= 1:
                mixed.append(mix)
        stacked = torch.stack(mixed, dim=-1)  # [L, B, P, orders]
        per_head = stacked.unsqueeze(-1).expand(*stacked.shape, self.config.heads_per_order).flatten(-2)  # [L, B, P, H]
        shape = (len(self.config.layer_ids), 1, 1, -1)
        indices = torch.remainder(per_head, primes.view(shape)) + offsets.view(shape)
        return dict(zip(self.config.layer_ids, indices.unbind(0)))

    def check_window(self, token_ids: torch.Tensor, num_positions: int) -> None:
        """Raise ConfigError unless ``token_ids`` is an int ``[B, T]`` window holding ``num_positions``."""
        if token_ids.dim() != 2 or not 1 <= num_positions <= token_ids.shape[1]:
            raise ConfigError(f"engram hashing: token_ids must be [batch, tokens] with 1 <= num_positions "
                              f"<= tokens; got shape {tuple(token_ids.shape)}, num_positions {num_positions}")
        if token_ids.dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"engram hashing: token_ids must be int32 or int64, got {token_ids.dtype}")

    def layer_constants(self, layer_id: int, device: torch.device) -> LayerHashConstants:
        """The constants of one layer on ``device`` (cached), for kernels that hash and gather at once."""
        self._layer_primes(layer_id)
        position = self.config.layer_ids.index(layer_id)
        multipliers, primes, offsets, compression = self._constants(device)
        return LayerHashConstants(multipliers[position], primes[position], offsets[position],
                                  compression if self.compression is not None else None, self.pad_id,
                                  self.raw_vocab_size)

    def _layer_primes(self, layer_id: int) -> tuple[int, ...]:
        if layer_id not in self.primes:
            raise ConfigError(f"engram hashing: layer {layer_id} has no Engram; layers with one: "
                              f"{list(self.config.layer_ids)}")
        return self.primes[layer_id]

    def _compress(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.long()
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.raw_vocab_size):
            raise ConfigError(f"engram hashing: token ids must be in [0, {self.raw_vocab_size}), got "
                              f"min {int(ids.min())} max {int(ids.max())}; check the tokenizer/vocab_size")
        if self.compression is None:
            return ids
        return self._constants(ids.device)[3][ids]

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on_device:
            parts = [self._multipliers, self._primes, self._offsets]
            parts.append(self.compression if self.compression is not None else torch.empty(0, dtype=torch.long))
            self._on_device[device] = tuple(p.to(device) for p in parts)
        return self._on_device[device]

    def _check_compression(self, table: torch.Tensor) -> torch.Tensor:
        if table.dim() != 1 or table.dtype not in (torch.int32, torch.int64) or table.numel() == 0:
            raise ConfigError(f"engram hashing: the compression table must be a non-empty 1-D int tensor "
                              f"(raw id -> compressed id), got {table.dtype} {tuple(table.shape)}")
        table = table.to("cpu", torch.int64)
        low, high = int(table.min()), int(table.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ConfigError(f"engram hashing: compression table values must be in [0, vocab_size="
                              f"{self.config.vocab_size}), got [{low}, {high}]; set vocab_size to the number "
                              f"of compressed ids ({high + 1} or more)")
        return table
