set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts tests/residency > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -1 $OUT/gpu-tests.log
grep -E "^(FAILED|ERROR)|^E " $OUT/gpu-tests.log | head -20
timeout 420 python3 bench/moe_h100.py --rounds 3 --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error" $OUT/moe.log | head -5
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-250
