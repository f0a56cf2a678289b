"""Decode of a transformers Qwen3-MoE through ``tiermem.offload``: all-resident vs host pager vs device pager.

Run from the repository root on a GPU (``PYTHONPATH=. python bench/offload_decode.py --out DIR``). The
model has Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts of 768, top-8, 32 heads, 4 KV
heads) with random weights made on the GPU and fewer layers (``--layers``); it is built once per
mode from one seed, since a closed offload handle leaves its model unusable. Each mode prefills the
same prompt and then decodes the same random token ids (teacher forcing: a random model's greedy
output repeats itself, and so would its routing); the offloaded modes must predict the resident
model's next token at every step (their logits are bit-identical, transformers' ``grouped_mm``
experts). Random routers route without the temporal locality of trained ones, so hit rates sit
near the resident fraction: this measures the pagers' mechanics inside a real model (attention,
routers, KV cache, prefill), not a policy. The resident mode runs transformers' own experts
(eager launches, no CUDA graphs): it is the reference for the tokens, not a speed bound. Writes
``<out>/offload_decode.jsonl``: one line per mode with tokens/s over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import transformers as hf

from tiermem.experts import offload

log = logging.getLogger("tiermem.bench")


def build(layers: int, seed: int) -> torch.nn.Module:
    config = hf.Qwen3MoeConfig(vocab_size=32768, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               num_experts=128, num_experts_per_tok=8, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = hf.Qwen3MoeForCausalLM._from_config(config, experts_implementation="grouped_mm", dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, feed: torch.Tensor, warmup: int) -> tuple[list[int], float]:
    """The predicted next token at each step of feeding ``feed`` ``[B, steps]`` after ``prompt``, and tokens/s over
    the steps after ``warmup``."""
    cache = hf.DynamicCache()
    out = model(prompt, past_key_values=cache, use_cache=True)
    predicted, began = [], None
    for step in range(feed.shape[1]):
        if step == warmup:
            torch.cuda.synchronize()
            began = time.perf_counter()
        predicted.append(out.logits[:, -1].argmax(dim=-1))
        out = model(feed[:, step:step + 1], past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    return torch.stack(predicted, dim=1).flatten().tolist(), (feed.shape[1] - warmup) * feed.shape[0] / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5],
                        help="resident fractions of each layer's experts")
    parser.add_argument("--steps", type=int, default=72)
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps (graph captures happen here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 32768, (1, 16), generator=generator).cuda()
    feed = torch.randint(0, 32768, (1, args.steps), generator=generator).cuda()
    records, reference = [], None
    runs = [("resident", 1.0)] + [(pager, f) for f in args.fractions for pager in ("host", "device")]
    for mode, fraction in runs:
        model = build(args.layers, seed=0)
        handle = None
        if mode != "resident":
            handle = offload(model, tier="dram", config={"resident_fraction": fraction, "pager": mode})
        tokens, tokens_per_s = decode(model, prompt, feed, args.warmup)
        reference = reference or tokens
        stats = handle.stats() if handle else {}
        record = {"mode": mode, "fraction": fraction, "tokens_per_s": tokens_per_s,
                  "same_tokens_as_resident": tokens == reference, "layers": args.layers, "steps": args.steps,
                  "warmup": args.warmup, **{k: stats.get(k) for k in ("hit_rate", "misses", "demand_bytes",
                                                                       "graphs_captured", "graph_replays")}}
        print(json.dumps(record), flush=True)
        records.append(record)
        if handle:
            handle.close()
        del model
        torch.cuda.empty_cache()
    (out / "offload_decode.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0 if all(r["same_tokens_as_resident"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
