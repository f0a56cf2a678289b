"""Engram lookups from a host-tier table vs an HBM-resident one, inside a real-shaped decode step.

The same benchmark as ``tiermem bench engram`` (``tiermem/bench/engram.py`` says what it measures);
this script runs it from a checkout. The hot-row cache study lives in ``engram_cache_study.py``.

Run on the H100 (full, ~5 min):   python bench/engram_bench.py --out bench/results/h100/engram.jsonl
Quick (< 2 min):                  python bench/engram_bench.py --quick --out /tmp/engram-quick.jsonl
Logic check without a GPU:        python bench/engram_bench.py --smoke --device cpu --out /tmp/smoke.jsonl
Run from the repository root with ``PYTHONPATH=.`` unless tiermem is installed.
"""

from __future__ import annotations

import sys

from tiermem.bench.engram import main

if __name__ == "__main__":
    sys.exit(main())
