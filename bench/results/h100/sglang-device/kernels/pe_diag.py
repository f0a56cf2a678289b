"""Per-component GPU time: tiermem's device pager (page kernel + BlockCopier) vs SGLang's paged-experts kernels.

Qwen3-30B-A3B expert shapes, K=32 slots of 128 experts, 32 routed entries (decode batch 4 x top-8).
Everything runs in CUDA graphs (as in SGLang's decode), timed with CUDA events over many replays.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from tiermem.residency.device_pager import DevicePager  # noqa: E402
from tiermem.transfer.uva_copy import BlockCopier  # noqa: E402
from sglang.kernels.ops.moe.paged_experts import (  # noqa: E402
    paged_experts_decide, paged_experts_gather, paged_experts_host_device_pointer)

E, K, TOPK, BS, H, I = 128, 32, 8, 4, 2048, 768
dev = torch.device("cuda")
host13 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16).pin_memory()
host2 = torch.randn(E, H, I, dtype=torch.bfloat16).pin_memory()
slot13 = torch.zeros(K, 2 * I, H, dtype=torch.bfloat16, device=dev)
slot2 = torch.zeros(K, H, I, dtype=torch.bfloat16, device=dev)
out = {}


def timed(fn, iters=200, prepare=None):
    """GPU ms per call of fn captured in a graph; prepare(i) runs (uncaptured) before each replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    total = 0.0
    for i in range(iters):
        if prepare:
            prepare(i)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        total += a.elapsed_time(b)
    return total / iters


gen = torch.Generator().manual_seed(0)
seq = [torch.randperm(E, generator=gen)[:BS * TOPK].to(torch.int32) for _ in range(400)]
# a routing with reuse: draw from a hot half 80% of the time
hot = [torch.where(torch.rand(BS * TOPK, generator=gen) < 0.8, torch.randint(0, 40, (BS * TOPK,), generator=gen),
                   torch.randint(0, E, (BS * TOPK,), generator=gen)).to(torch.int32) for _ in range(400)]

# ---- tiermem
pager = DevicePager(num_groups=1, slots_per_group=K, objects_per_group=E, device=dev)
copier = BlockCopier([[host13[e] for e in range(E)], [host2[e] for e in range(E)]],
                     [slot13.view(K, -1).view(torch.uint8), slot2.view(K, -1).view(torch.uint8)])
ids = torch.zeros(BS, TOPK, dtype=torch.int32, device=dev)


def tm_place():
    wave = pager.page(0, ids.reshape(-1), TOPK)
    copier.copy(0, wave.missing, wave.victims, wave.count)
    copier.copy(1, wave.missing, wave.victims, wave.count)
    return wave.pair_slot.view(ids.shape).to(ids.dtype)


def tm_page_only():
    pager.page(0, ids.reshape(-1), TOPK)


# ---- sglang
step = torch.zeros(1, dtype=torch.int32, device=dev)
slot_expert = torch.arange(K, dtype=torch.int32, device=dev)
expert_slot = torch.full((E,), -1, dtype=torch.int32, device=dev)
expert_slot[:K] = slot_expert
lastuse = torch.zeros(K, dtype=torch.int32, device=dev)
src = torch.zeros(K, dtype=torch.int32, device=dev)
dst = torch.zeros(K, dtype=torch.int32, device=dev)
count = torch.zeros(1, dtype=torch.int32, device=dev)
args = [torch.tensor(v, dtype=torch.int64, device=dev) for v in (
    [paged_experts_host_device_pointer(host13), paged_experts_host_device_pointer(host2)],
    [slot13.data_ptr(), slot2.data_ptr()], [host13[0].numel() * 2, host2[0].numel() * 2])]


def sg_place():
    paged_experts_decide(ids.flatten().to(torch.int32), step, slot_expert, expert_slot, lastuse, src, dst, count)
    paged_experts_gather(*args, src, dst, count)
    return expert_slot[ids.clamp(min=0)].masked_fill(ids < 0, -1)


def sg_decide_only():
    paged_experts_decide(ids.flatten().to(torch.int32), step, slot_expert, expert_slot, lastuse, src, dst, count)


fixed = seq[0].view(BS, TOPK).to(dev)
ids.copy_(fixed)
out["tiermem_page_only_hit_ms"] = timed(tm_page_only)
out["sglang_decide_only_hit_ms"] = timed(sg_decide_only)
out["tiermem_place_hit_ms"] = timed(tm_place)
out["sglang_place_hit_ms"] = timed(sg_place)
for name, routes in (("uniform", seq), ("hot", hot)):
    def prep(i, routes=routes):
        ids.copy_(routes[i].view(BS, TOPK))
    pager.reset_stats()
    out[f"tiermem_place_{name}_ms"] = timed(tm_place, 300, prep)
    needed, loads = pager.stats()
    out[f"tiermem_{name}_misses_per_step"] = int(loads.sum()) / 302
    out[f"sglang_place_{name}_ms"] = timed(sg_place, 300, prep)

# ---- copies alone: 8 experts (both tensors), kernel vs kernel vs copy engines
n = 8
missing = torch.arange(40, 40 + n, dtype=torch.int64, device=dev)
victims = torch.arange(n, dtype=torch.int64, device=dev)
cnt64 = torch.tensor([n], dtype=torch.int64, device=dev)
src.copy_(missing.to(torch.int32).repeat(K // n)[:K])
dst.copy_(torch.arange(K, dtype=torch.int32, device=dev))
cnt32 = torch.tensor([n], dtype=torch.int32, device=dev)
nbytes = n * (host13[0].numel() + host2[0].numel()) * 2
for label, fn in (
        ("tiermem_copy", lambda: (copier.copy(0, missing, victims, cnt64), copier.copy(1, missing, victims, cnt64))),
        ("sglang_gather", lambda: paged_experts_gather(*args, src, dst, cnt32)),
        ("copy_engine", lambda: [(slot13[j].copy_(host13[40 + j], non_blocking=True),
                                  slot2[j].copy_(host2[40 + j], non_blocking=True)) for j in range(n)])):
    ms = timed(fn, 50)
    out[f"{label}_8_ms"] = ms
    out[f"{label}_8_gbps"] = nbytes / ms / 1e6


# ---- a candidate copy kernel: every group in one launch, 16-byte aligned hints
@triton.jit
def copy_all_kernel(addresses_ptr, width, outs_ptr, words_ptr, objects_ptr, slots_ptr, count_ptr,
                    GROUPS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    n = tl.load(count_ptr)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    words = tl.arange(0, BLOCK)
    for g in tl.static_range(GROUPS):
        wpb = tl.load(words_ptr + g)
        chunks = tl.cdiv(wpb, BLOCK)
        out_base = tl.load(outs_ptr + g)
        for item in range(pid, n * chunks, programs):
            row = item // chunks
            chunk = item % chunks
            offsets = chunk * BLOCK + words
            addr = tl.load(addresses_ptr + g * width + tl.load(objects_ptr + row))
            target_addr = out_base + tl.load(slots_ptr + row) * wpb * 8
            if ALIGNED:
                addr = tl.multiple_of(addr, 16)
                target_addr = tl.multiple_of(target_addr, 16)
            source = addr.to(tl.pointer_type(tl.int64))
            target = target_addr.to(tl.pointer_type(tl.int64))
            if (chunk + 1) * BLOCK <= wpb:
                tl.store(target + offsets, tl.load(source + offsets))
            else:
                mask = offsets < wpb
                tl.store(target + offsets, tl.load(source + offsets, mask=mask), mask=mask)


table = torch.stack([copier._addresses[0], copier._addresses[1]]).contiguous()
outs = torch.tensor([slot13.data_ptr(), slot2.data_ptr()], dtype=torch.int64, device=dev)
words_t = torch.tensor([copier.block_bytes[0] // 8, copier.block_bytes[1] // 8], dtype=torch.int64, device=dev)
sms = torch.cuda.get_device_properties(dev).multi_processor_count
for block, warps, per_sm, aligned in ((2048, 8, 4, True), (2048, 8, 4, False), (1024, 4, 8, True),
                                      (4096, 8, 2, True), (2048, 8, 8, True), (1024, 8, 4, True)):
    def cand(block=block, warps=warps, per_sm=per_sm, aligned=aligned):
        copy_all_kernel[(sms * per_sm,)](table, table.shape[1], outs, words_t, missing, victims, cnt64,
                                         GROUPS=2, BLOCK=block, ALIGNED=aligned, num_warps=warps)
    slot13.zero_()
    slot2.zero_()
    ms = timed(cand, 50)
    ok = all(torch.equal(slot13[j].cpu(), host13[40 + j]) and torch.equal(slot2[j].cpu(), host2[40 + j])
             for j in range(n))
    out[f"cand_b{block}_w{warps}_p{per_sm}_a{int(aligned)}_8_gbps"] = round(nbytes / ms / 1e6, 2) if ok else "WRONG"

for k, v in out.items():
    print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "pe_diag.json"), "w"), indent=1)
