set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 90 python3 bench/copy_overlap.py --out $OUT/copy-overlap.jsonl 2>&1 | tail -12
for grid in 132 33; do
  timeout 200 python3 bench/moe_h100.py --rounds 2 --modes lru device_lru device_pipelined --device-pipeline-depth 2 \
    --device-pipeline-copy-programs $grid --only qwen3-30b-a3b@qwen --out $OUT/moe-g$grid > $OUT/moe-g$grid.log 2>&1
  echo "bench grid $grid rc $?"
  grep -B3 -A24 "tiermem bench moe *$" $OUT/moe-g$grid.log | grep "│" | grep device | cut -c1-140
done
