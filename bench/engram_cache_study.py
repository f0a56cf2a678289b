"""Hit rates of a frequency-chosen HBM hot-row cache for Engram-27B heads, on a real token stream (CPU).

The stream is a ``.npz`` with ``tokens`` (int), ``doc_offsets`` and optionally ``compression`` (raw id
-> compressed id), or a corpus folder (``tokens.npy``, ``doc_offsets.npy``; e.g. ``.moe_lm``). Rows are chosen from the even documents and the hit rate is measured on the odd
ones, for caches of 0.1%, 1% and 10% of a layer's rows; row contents do not matter, so the tables
are zero-filled host tensors and the lookup runs on the CPU.

Run: PYTHONPATH=. python bench/engram_cache_study.py TOKENS.npz|.moe_lm --out cache.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tiermem.bench.engram_model import SHAPES
from tiermem.bench.engram_stream import Corpus
from tiermem.engram import (
    EngramLookup,
    EngramLookupConfig,
    EngramTable,
    GatherMethod,
    HotRowCache,
    NgramHasher,
    TableLayout,
)

CACHE_FRACTIONS = (0.001, 0.01, 0.1)  # of a layer's rows
SUBMIT_TOKENS = 4096
ENGRAM27B_ROW_BYTES = 160


def cache_study(path: Path, write) -> None:
    """Write one ``cache_stream`` record per layer and one ``cache_study`` record per layer and size."""
    if path.is_dir():
        corpus = Corpus.load(path)
        data = {"tokens": corpus.tokens, "doc_offsets": corpus.doc_offsets}
    else:
        data = dict(np.load(path))
    compression = torch.from_numpy(data["compression"]).long() if "compression" in data else None
    vocab = int(compression.max()) + 1 if compression is not None else int(data["tokens"].max()) + 1
    config = dataclasses.replace(SHAPES["engram27b"].hash, vocab_size=vocab, pad_id=0)
    hasher = NgramHasher(config, compression)
    tokens, bounds = torch.from_numpy(data["tokens"]).long(), data["doc_offsets"]
    docs = [tokens[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
    indexed = [hasher.hash(doc[None], doc.numel()) for doc in docs]
    profile = {k: torch.cat([ix[k].reshape(-1) for ix in indexed[0::2]]) for k in config.layer_ids}
    evaluate = {k: torch.cat([ix[k].reshape(-1) for ix in indexed[1::2]]) for k in config.layer_ids}
    tables = {}
    for layer in config.layer_ids:
        layout = TableLayout(hasher.rows_for_layer(layer), 4)  # row content does not matter here
        tables[layer] = EngramTable(torch.zeros(layout.num_rows, layout.row_bytes, dtype=torch.uint8), layout)
        write(kind="cache_stream", layer=layer, profile_lookups=profile[layer].numel(),
              eval_lookups=evaluate[layer].numel(), vocab_size=vocab, raw_vocab=hasher.raw_vocab_size,
              eval_first_time_fraction=torch.unique(evaluate[layer]).numel() / evaluate[layer].numel())
    window = config.max_ngram_order - 1
    for fraction in CACHE_FRACTIONS:
        caches = {k: HotRowCache.from_observed(t, profile[k], int(t.layout.num_rows * fraction), "cpu")
                  for k, t in tables.items()}
        lookup_config = EngramLookupConfig(method=GatherMethod.STAGED, max_tokens_per_submit=SUBMIT_TOKENS)
        with EngramLookup(hasher, tables, lookup_config, device="cpu", caches=caches) as lookup:
            for doc in docs[1::2]:
                for start in range(0, doc.numel(), SUBMIT_TOKENS):
                    end = min(start + SUBMIT_TOKENS, doc.numel())
                    lookup.submit(doc[max(0, start - window):end][None], end - start)
        for layer, cache in caches.items():
            write(kind="cache_study", layer=layer, capacity_rows=cache.capacity_rows, capacity_fraction=fraction,
                  cache_bytes_at_160B_rows=cache.capacity_rows * ENGRAM27B_ROW_BYTES, submit_tokens=SUBMIT_TOKENS,
                  hit_rate_of_lookups=float(torch.isin(evaluate[layer], cache.ids).float().mean()),
                  hit_rate_of_distinct_rows_per_submit=cache.stats().hit_rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stream", type=Path, help="token-stream .npz (tokens, doc_offsets[, compression]) or corpus folder")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines output path")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as file:
        def write(**record) -> None:
            file.write(json.dumps(record) + "\n")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        write(kind="meta", command=" ".join(sys.argv), torch=torch.__version__, stream=str(args.stream))
        cache_study(args.stream, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
