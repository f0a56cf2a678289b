"""Check, in seconds, that the carried sglang-kernel loads against this machine's torch and computes right.

sglang-kernel 0.4.5 was built for torch 2.11 but is run under sglang 0.5.23 (which ships with 0.4.10):
this imports it, prints which library it loaded, and runs the AOT ops the end-to-end run reaches on a
Qwen3-MoE (rmsnorm, fused_add_rmsnorm, silu_and_mul, topk_softmax) against torch references. Exit 0
when all agree; 1 with the failing op named otherwise, so the run stops before any server starts.

    python kernel_smoke.py
"""

from __future__ import annotations

import sys

import sgl_kernel
import torch
import torch.nn.functional as F

TOKENS = 37  # not a multiple of any tile size
HIDDEN = 2048
EXPERTS = 128
TOP_K = 8
EPS = 1e-6
BF16_TOLERANCE = 2e-2


def rms_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def main() -> int:
    print(f"sgl_kernel {sgl_kernel.__version__} ({sgl_kernel.common_ops.__file__}); torch {torch.__version__}, "
          f"cuda {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.float32).to(dtype)

    failures = []
    x, weight = randn(TOKENS, HIDDEN), randn(HIDDEN)
    if not torch.allclose(sgl_kernel.rmsnorm(x, weight, EPS).float(), rms_reference(x, weight).float(),
                          atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE):
        failures.append("rmsnorm")

    x, residual = randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN)
    want_residual = (x.float() + residual.float()).to(x.dtype)
    want = rms_reference(want_residual, weight)
    sgl_kernel.fused_add_rmsnorm(x, residual, weight, EPS)
    if not (torch.allclose(residual.float(), want_residual.float(), atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)
            and torch.allclose(x.float(), want.float(), atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)):
        failures.append("fused_add_rmsnorm")

    gate_up = randn(TOKENS, 2 * 768)
    gate, up = gate_up.float().chunk(2, dim=-1)
    if not torch.allclose(sgl_kernel.silu_and_mul(gate_up).float(), (F.silu(gate) * up).to(torch.bfloat16).float(),
                          atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE):
        failures.append("silu_and_mul")

    logits = randn(TOKENS, EXPERTS, dtype=torch.float32)
    weights = torch.empty(TOKENS, TOP_K, device="cuda", dtype=torch.float32)
    ids = torch.empty(TOKENS, TOP_K, device="cuda", dtype=torch.int32)
    sgl_kernel.topk_softmax(weights, ids, logits, renormalize=True)
    want_weights, want_ids = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)
    want_weights = want_weights / want_weights.sum(-1, keepdim=True)
    got_ids, order = ids.long().sort(dim=-1)
    want_sorted, want_order = want_ids.sort(dim=-1)
    if not (torch.equal(got_ids, want_sorted)
            and torch.allclose(weights.gather(1, order), want_weights.gather(1, want_order), atol=1e-5)):
        failures.append("topk_softmax")

    torch.cuda.synchronize()
    if failures:
        print(f"kernel smoke: FAILED {failures}: sglang-kernel 0.4.5 disagrees with torch "
              f"{torch.__version__} here; do not start servers", flush=True)
        return 1
    print("kernel smoke: rmsnorm, fused_add_rmsnorm, silu_and_mul, topk_softmax agree with torch", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
