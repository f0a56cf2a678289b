#!/usr/bin/env bash
# GPU tests of the device pager (tiermem + SGLang adaptor), then the SGLang e2e with decode CUDA graphs captured up
# to GRAPH_MAX_BS (16) requests at CONCURRENCY 16: the device pager's waves decided on the GPU inside the graphs.
mkdir -p "$OUT"
[[ -n ${SKIP_TESTS:-} ]] || {
  PYTHONPATH=. timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/experts/test_experts_device_pager.py \
     tests/residency/test_device_pager.py tests/experts/test_experts_moe.py 2>&1 | tail -4
  (cd integrations/sglang && PYTHONPATH=../..:. timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider \
     tests/test_device.py tests/test_pager.py 2>&1 | tail -4)
} > "$OUT/gpu-tests.log"
[[ -n ${SKIP_TESTS:-} ]] || cat "$OUT/gpu-tests.log"
PHASES=${PHASES:-hbm+graph,device+graph,paged+graph} CONCURRENCY=${CONCURRENCY:-16} REQUESTS=${REQUESTS:-64} \
  GRAPH_MAX_BS=${GRAPH_MAX_BS:-16} BUDGET_S=${BUDGET_S:-540} bash integrations/sglang/bench/e2e_h100.sh
