set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 400 python3 bench/moe_h100.py --rounds 3 --modes all_hbm lru device_lru \
  --only qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error" $OUT/moe.log | head -5
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-250
