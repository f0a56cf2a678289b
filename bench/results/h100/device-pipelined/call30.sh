set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/residency/test_device_pager.py \
  tests/experts/test_experts_device_pager.py > $OUT/gpu-tests.log 2>&1; echo "tests rc $?"; tail -2 $OUT/gpu-tests.log
timeout 420 python3 bench/moe_h100.py --rounds 3 --modes all_hbm lru device_lru device_pipelined \
  --only qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error\|Traceback" $OUT/moe.log | head -5
grep -B3 -A24 "tiermem bench moe *$" $OUT/moe.log | grep "│" | grep device | cut -c1-140
