set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 570 python3 bench/moe_h100.py --rounds 3 --modes all_hbm lru device_lru device_pipelined \
  --only qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error\|Traceback" $OUT/moe.log | head -5
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-40,190-330
