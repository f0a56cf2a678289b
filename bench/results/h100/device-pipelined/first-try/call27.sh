set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/residency/test_device_pager.py \
  tests/experts/test_experts_device_pager.py > $OUT/gpu-tests.log 2>&1; echo "tests rc $?"; tail -4 $OUT/gpu-tests.log
timeout 380 python3 bench/moe_h100.py --rounds 3 --modes all_hbm lru device_lru device_pipelined \
  --only qwen3-30b-a3b@qwen --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -i "captur\|Error\|Traceback" $OUT/moe.log | head -5
grep -B2 -A22 "tiermem bench moe  " $OUT/moe.log | grep "│" | cut -c1-200 | head -30
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-40,190-330
