#!/usr/bin/env bash
# GPU tests of the device pager (tiermem + SGLang adaptor), then the SGLang e2e with decode CUDA graphs.
mkdir -p "$OUT"
[[ -n ${SKIP_TESTS:-} ]] || {
  PYTHONPATH=. timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/experts/test_experts_device_pager.py tests/residency/test_device_pager.py 2>&1 | tail -4
  (cd integrations/sglang && PYTHONPATH=../..:. timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider \
     tests/test_device.py tests/test_pager.py 2>&1 | tail -4)
} > "$OUT/gpu-tests.log"
[[ -n ${SKIP_TESTS:-} ]] || cat "$OUT/gpu-tests.log"
PHASES=${PHASES:-hbm+graph,device+graph,paged+graph,tiermem+graph} CONCURRENCY=${CONCURRENCY:-4} \
  REQUESTS=${REQUESTS:-32} BUDGET_S=${BUDGET_S:-440} bash integrations/sglang/bench/e2e_h100.sh
