set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
git log --oneline -1 2>/dev/null || true
timeout 560 python3 bench/moe_h100.py --rounds 3 --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-200
