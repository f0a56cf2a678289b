set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 200 python3 bench/offload_decode.py --out $OUT/offload-decode --layers 8 > $OUT/offload-decode.log 2>&1; echo "decode rc $?"
grep '^{' $OUT/offload-decode.log | cut -c1-220
timeout 380 python3 bench/moe_h100.py --rounds 3 --only qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error" $OUT/moe.log | head -5
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-250
