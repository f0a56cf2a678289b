set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p $OUT/moe
PYTHONPATH=. timeout 170 python3 bench/moe_h100.py --rounds 3 --modes all_hbm lru device_lru --traces-dir .traces \
  --only deepseek-v2-lite@uniform mixtral-8x7b@mixtral --out $OUT/moe/runs > $OUT/moe/moe.log 2>&1; echo "bench rc $?"
grep -A30 "acceptance summary" $OUT/moe/moe.log | grep "│" | cut -c1-200
SKIP_TESTS=1 OUT=$OUT/e2e PHASES=hbm,device-predictor+graph,device+graph BUDGET_S=390 \
  bash bench/results/h100/sglang-device-waves/sgl2.sh > $OUT/e2e-run.log 2>&1
tail -6 $OUT/e2e-run.log
