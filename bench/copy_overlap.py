"""Does the device pager's copy kernel leave the GPU room to compute beside it? One GPU call, about a minute.

The device pager copies a layer's missed experts with one Triton kernel that reads their pinned
homes over UVA (``transfer.uva_copy``). Pipelined waves run that copy on a second stream while the
previous wave's grouped GEMMs run; that only pays if both make progress at once. For expert blocks
of Qwen3-30B-A3B's shape (hidden 2048, intermediate 768, bf16: 9 MiB), this measures with CUDA events:

1. the copy kernel's bandwidth by grid size (programs), 8 experts per launch, against the copy
   engines moving the same bytes (``copy_`` from pinned memory);
2. per grid size, the copy on one stream beside a wave's grouped GEMMs on another (64 tokens x top-4
   over 8 slots, repeated ``--gemms`` times), against each alone, compute alone timed again beside each
   grid's runs: ``hidden = (copy alone + compute alone - together) / min(copy alone, compute alone)``
   (1.0: the shorter one hides entirely, 0.0: serialised).

``probe/copy-overlap.jsonl`` in ``bench/results/h100/device-pipelined/`` came from the first version
(commit 926f535), which timed compute alone once, first, and reported ``(copy + compute) / together``.

Usage (repository root, GPU host)::

    PYTHONPATH=. python bench/copy_overlap.py --out $OUT/copy-overlap.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tiermem.experts.grouped import SlotWeights, compute_wave, pair_buffer
from tiermem.residency.device_pager import wave_index
from tiermem.transfer.uva_copy import BlockCopier

HIDDEN, INTERMEDIATE = 2048, 768  # Qwen3-30B-A3B
EXPERTS, SLOTS, TOKENS, TOP_K = 8, 8, 64, 4
GRIDS = (8, 16, 33, 66, 132, 264, 528)


def _elapsed_ms(work: Callable[[], None], repeats: int = 5) -> float:
    """Best of ``repeats`` CUDA-event timings of ``work`` on the current stream."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        work()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file")
    parser.add_argument("--gemms", type=int, default=20, help="grouped-GEMM waves run beside one copy")
    args = parser.parse_args()
    block_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    homes = torch.randint(0, 255, (EXPERTS, block_bytes), dtype=torch.uint8).pin_memory()
    slots = torch.empty((SLOTS, block_bytes), dtype=torch.uint8, device="cuda")
    copier = BlockCopier([list(homes)], [slots])
    rows = torch.arange(EXPERTS, device="cuda")
    count = torch.tensor([EXPERTS], device="cuda")
    weights = SlotWeights(torch.randn(SLOTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02,
                          torch.randn(SLOTS, HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) * 0.02)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    top_k_weights = torch.full((TOKENS, TOP_K), 1.0 / TOP_K, device="cuda", dtype=torch.bfloat16)
    pair_slot = torch.randint(0, SLOTS, (TOKENS * TOP_K,), device="cuda")
    index = wave_index(pair_slot, TOP_K, SLOTS)
    out = pair_buffer(hidden, top_k_weights, weights)
    compute = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    nbytes = EXPERTS * block_bytes

    def gemms() -> None:
        for _ in range(args.gemms):
            compute_wave(hidden, top_k_weights, index, pair_slot.numel(), weights, F.silu, out)

    engines_ms = _elapsed_ms(lambda: [slots[i].copy_(homes[i], non_blocking=True) for i in range(EXPERTS)])
    records = [{"what": "engines", "gbps": nbytes / engines_ms / 1e6, "ms": engines_ms}]
    for programs in GRIDS:
        copy_ms = _elapsed_ms(lambda p=programs: copier.copy(0, rows, rows, count, programs=p))
        compute_ms = _elapsed_ms(gemms)

        def both(p: int = programs) -> None:
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                copier.copy(0, rows, rows, count, programs=p)
            gemms()
            compute.wait_stream(side)

        together_ms = _elapsed_ms(both)
        records.append({"what": "copy", "programs": programs, "gbps": nbytes / copy_ms / 1e6, "ms": copy_ms,
                        "compute_ms": compute_ms, "gemm_waves": args.gemms, "together_ms": together_ms,
                        "hidden": (copy_ms + compute_ms - together_ms) / min(copy_ms, compute_ms)})
    with Path(args.out).open("w") as sink:
        sink.writelines(json.dumps(record) + "\n" for record in records)
    print(f"copy engines {records[0]['gbps']:.1f} GB/s; compute: {args.gemms} grouped-GEMM waves")
    print(f"{'programs':>8} {'GB/s':>6} {'copy ms':>8} {'compute ms':>10} {'together ms':>11} {'hidden':>6}")
    for r in records[1:]:
        print(f"{r['programs']:>8} {r['gbps']:>6.1f} {r['ms']:>8.3f} {r['compute_ms']:>10.3f} {r['together_ms']:>11.3f} "
              f"{r['hidden']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
