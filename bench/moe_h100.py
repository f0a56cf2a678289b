"""The MoE offload suite for one lent H100, in one device call (< 8 minutes): ``tiermem bench moe`` per workload.

Run from the repository root with the shared traces copied to ``.traces/``::

    PYTHONPATH=. python bench/moe_h100.py --out $OUT/moe           # full suite (acceptance set first)
    PYTHONPATH=. python bench/moe_h100.py --out $OUT/moe --quick   # a 1-minute smoke run
    PYTHONPATH=. python bench/moe_h100.py --out $OUT/moe --only qwen3-30b-a3b@qwen   # chosen workloads
    PYTHONPATH=. python bench/moe_h100.py --out $OUT/moe --modes all_hbm lru lfu tiermem   # host pager only
        # (the device modes add about a minute: device_lru runs every batch, batch 8 and 64 in waves)
    PYTHONPATH=. python bench/moe_h100.py --out $OUT/moe --only qwen3-30b-a3b@moe-lm --predictor learned
        # Qwen3-shaped experts routed by the small MoE LM, with its recorded router inputs for the predictor
        # (.traces/moe-lm-trace.npz: the trace.npz of bench/moe_lm's record stage)

Each workload writes ``<out>/<workload>/moe.jsonl`` (one JSON line per run, summary and workload
header with the raw pinned copy bandwidth measured in the same process). Workloads after the time
guard are skipped and listed in ``<out>/skipped.json``. The last thing printed is one summary table
over every workload (tokens/s against LRU, gap closed, transfer efficiency, overlap ratios), after
a table of host time per layer by phase for every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tiermem.bench.moe import MODES, add_run_options, run_suite
from tiermem.bench.moe_report import print_summary, print_table

TIME_GUARD_S = 390.0  # start no workload after this: the device call must end within 8 minutes

# (workload, fractions, batches, max batch-1 steps): the acceptance set first, then the extra shapes.
FULL = (
    ("qwen1.5-moe-a2.7b@qwen", (0.25, 0.5), (1, 8, 64), 160),
    ("qwen3-30b-a3b@qwen", (0.25, 0.5), (1, 8, 64), 160),
    ("deepseek-v2-lite@uniform", (0.5,), (1, 64), 96),
    ("mixtral-8x7b@mixtral", (0.5,), (1,), 40),
)
QUICK = (("qwen3-30b-a3b@qwen", (0.25,), (1, 8), 24),)
# run only when named with --only: routing of the small MoE LM (bench/moe_lm), whose recorded router inputs
# let a predictor read hidden states; needs .traces/moe-lm-trace.npz (record's trace.npz, made on the GPU)
EXTRA = (("qwen3-30b-a3b@moe-lm", (0.25, 0.5), (1, 8), 160),)


PHASES = ("route_sync", "route", "stats", "demand_plan", "demand_submit", "predict", "prefetch_plan",
          "prefetch_submit", "compute", "device", "total")


def print_host_phases(records: list[dict]) -> None:
    """Host microseconds per layer by phase, one row per run: where a host-bound step spends its time."""
    table = Table(title="host us per layer, by phase (route_sync includes waiting for the GPU)")
    for column in ("workload", "batch", "fraction", "mode", *PHASES):
        table.add_column(column)
    for r in (r for r in records if r["kind"] == "run" and r.get("host_us_per_layer")):
        phases = r["host_us_per_layer"]
        table.add_row(r["workload"][:22], str(r["batch"]), f"{r['fraction']:.2f}", r["mode"],
                      *(f"{phases[p]:.0f}" if p in phases else "-" for p in PHASES))
    Console(width=200).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--traces-dir", default=".traces", help="folder holding the shared .npz traces")
    parser.add_argument("--quick", action="store_true", help="one small workload")
    add_run_options(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default: all)")
    parser.add_argument("--only", nargs="+", choices=[w for w, *_ in FULL + EXTRA],
                        help="run just these workloads (of the full suite, or the extra ones)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(options.out)
    began = time.perf_counter()
    skipped = []
    suite = QUICK if options.quick else (FULL if options.only is None else
                                         tuple(w for w in FULL + EXTRA if w[0] in options.only))
    records = []
    for workload, fractions, batches, max_steps in suite:
        if time.perf_counter() - began > TIME_GUARD_S:
            skipped.append(workload)
            continue
        args = argparse.Namespace(
            workloads=[workload], fractions=list(fractions), batches=list(batches), max_steps=max_steps,
            modes=options.modes, traces_dir=options.traces_dir, device="cuda",
            out=str(out / workload.replace("@", "_")), quick=options.quick,
            prefetch_distance=options.prefetch_distance, prefetch_experts=options.prefetch_experts,
            prefetch_min_score=options.prefetch_min_score, compute=options.compute, cuda_graphs=options.cuda_graphs,
            predictor=options.predictor, rounds=options.rounds,
        )
        done = run_suite(args)
        print_table(done)
        records += done
        print(f"{workload}: done at {time.perf_counter() - began:.0f} s", flush=True)
    print_host_phases(records)
    print_summary(records)
    (out / "skipped.json").write_text(json.dumps({"skipped": skipped, "elapsed_s": time.perf_counter() - began}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
