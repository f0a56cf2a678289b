set -uo pipefail
SKIP_TESTS=1 OUT=$OUT/e2e PHASES=device+graph,device-predictor+graph,paged+graph,device REFERENCE=.whl/ref/e2e.json \
  TRACE=.whl/ref/trace.npz BUDGET_S=560 bash bench/results/h100/sglang-device-waves/sgl2.sh > $OUT/e2e-run.log 2>&1
tail -8 $OUT/e2e-run.log
