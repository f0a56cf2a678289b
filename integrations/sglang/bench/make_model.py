"""Write a random-weight Qwen3-MoE checkpoint with real per-layer shapes (Qwen3-30B-A3B's by default).

Weights are drawn on the GPU when there is one (CPU random numbers are far too slow at this size), saved
one safetensors file per decoder layer under the hub's per-expert names
(``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``), with the config written by transformers.
No tokenizer: servers run with ``--skip-tokenizer-init`` and take token ids.

    python make_model.py OUT_DIR [--layers 6] [--experts 128] [--top-k 8] [--hidden 2048] [--moe-intermediate 768]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3MoeConfig

INIT_STD = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    args.out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * INIT_STD).to(
            torch.bfloat16).cpu()

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=torch.bfloat16)

    h, hd, i = args.hidden, args.head_dim, args.moe_intermediate
    index: dict[str, str] = {}

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(args.out / name), metadata={"format": "pt"})
        index.update({key: name for key in tensors})

    save("embed.safetensors", {"model.embed_tokens.weight": rand(args.vocab, h), "model.norm.weight": ones(h),
                               "lm_head.weight": rand(args.vocab, h)})
    for layer in range(args.layers):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h),
            f"{p}.self_attn.q_proj.weight": rand(args.heads * hd, h),
            f"{p}.self_attn.k_proj.weight": rand(args.kv_heads * hd, h),
            f"{p}.self_attn.v_proj.weight": rand(args.kv_heads * hd, h),
            f"{p}.self_attn.o_proj.weight": rand(h, args.heads * hd),
            f"{p}.self_attn.q_norm.weight": ones(hd), f"{p}.self_attn.k_norm.weight": ones(hd),
            f"{p}.mlp.gate.weight": rand(args.experts, h),
        }
        for expert in range(args.experts):
            e = f"{p}.mlp.experts.{expert}"
            tensors[f"{e}.gate_proj.weight"] = rand(i, h)
            tensors[f"{e}.up_proj.weight"] = rand(i, h)
            tensors[f"{e}.down_proj.weight"] = rand(h, i)
        save(f"layer{layer:03d}.safetensors", tensors)
    total = sum((args.out / name).stat().st_size for name in set(index.values()))
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    expert_bytes = args.layers * args.experts * 3 * h * i * 2
    print(f"{args.out}: {total / 2**30:.2f} GiB, of which routed experts {expert_bytes / 2**30:.2f} GiB "
          f"({args.layers} layers x {args.experts} experts x {3 * h * i * 2 / 2**20:.1f} MiB)", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
