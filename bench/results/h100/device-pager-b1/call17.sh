set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts tests/residency > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -3 $OUT/gpu-tests.log
grep -E "^(FAILED|ERROR)|^E " $OUT/gpu-tests.log | head -20
timeout 120 python3 .traces/diag2.py 2>&1 | grep -v "^WARNING" | tail -12
timeout 300 python3 -m tiermem bench moe --workloads qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --batches 1 --fractions 0.25 0.5 --modes all_hbm lru tiermem device_lru --rounds 3 --max-steps 160 --traces-dir .traces --out $OUT/b1 > $OUT/b1.log 2>&1; echo "b1 rc $?"
grep -i "captur" $OUT/b1.log | head -3
grep -A20 "tiermem bench moe  " $OUT/b1.log | cut -c1-150 | head -40
