"""Host time per layer of one source tree, for a same-machine A/B of a host-cost change.

Run from the repository root on the GPU machine, alternating two trees, e.g. the previous commit
unpacked into ``.device/base`` (``git archive HEAD~1 tiermem | tar -x -C .device/base``)::

    for i in 1 2; do PYTHONPATH=.device/base python bench/moe_host_ab.py base --out $OUT/ab.jsonl
                     PYTHONPATH=. python bench/moe_host_ab.py new --out $OUT/ab.jsonl; done

Each run appends one JSON line per (workload, batch, fraction, mode): tokens/s, hit rate and host
microseconds per layer by phase, for LRU and for tiermem with the cross-fitted co-occurrence
predictor, on the Qwen3-30B-A3B and Qwen1.5-MoE shapes driven by the shared Qwen trace in ``.traces``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tiermem.bench.moe import PREFETCH_MIN_SCORE, build_store, copy_bandwidth_gbps, run_mode
from tiermem.bench.moe_workloads import CrossFitted, batch_steps, workloads
from tiermem.manager import ManagerConfig, TierManager
from tiermem.prefetch.prefetcher import PrefetchConfig

WORKLOADS = ("qwen3-30b-a3b@qwen", "qwen1.5-moe-a2.7b@qwen")
STEPS = {1: 120, 8: 30}  # decode steps per batch size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label", help="names this tree in the output (e.g. base, new)")
    parser.add_argument("--out", required=True, help="JSON-lines file to append to")
    parser.add_argument("--traces-dir", default=".traces", help="folder holding the shared .npz traces")
    args = parser.parse_args()
    device = torch.device("cuda")
    with Path(args.out).open("a") as sink:
        for work in workloads(Path(args.traces_dir), list(WORKLOADS), False):
            shape, layers = work.shape, work.trace.layers
            nbytes = len(layers) * shape.num_experts * (3 * shape.hidden * shape.intermediate * 2 + 8192)
            manager = TierManager(ManagerConfig.from_dict({"tiers": [
                {"kind": "dram", "capacity_bytes": nbytes + (2 << 30), "arena_bytes": "1GiB"}]}))
            raw_gbps = copy_bandwidth_gbps(manager, device, 1 << 30)
            store = build_store(manager, shape, layers, device, torch.bfloat16)
            predictor = CrossFitted(work.routes, 1)
            prefetch = PrefetchConfig(distance=1, objects_per_layer=2, min_score=PREFETCH_MIN_SCORE, link_gbps=raw_gbps)
            for batch, max_steps in STEPS.items():
                steps, _ = batch_steps(work.trace, batch, max_steps)
                for fraction in (0.25, 0.5):
                    for mode in ("lru", "tiermem"):
                        common = {"mode": mode, "fraction": fraction, "batch": batch, "device": device,
                                  "prefetch": prefetch, "predictor": predictor}
                        run_mode(store, work, steps[:8], **common)  # warm-up
                        run = run_mode(store, work, steps, **common)
                        line = json.dumps({"label": args.label, "workload": work.name, "batch": batch,
                                           "fraction": fraction, "mode": mode,
                                           "tokens_per_s": round(run["tokens_per_s"], 1),
                                           "hit_rate": round(run["hit_rate"], 3),
                                           "host_us": {k: round(v) for k, v in run["host_us_per_layer"].items()}})
                        print(line, flush=True)
                        sink.write(line + "\n")
            store.close()
            manager.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
