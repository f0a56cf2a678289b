set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p /tmp/mlm
timeout 170 python3 -m bench.moe_lm.train --out /tmp/mlm/model.pt > $OUT/train.log 2>&1; echo "train rc $?"; tail -2 $OUT/train.log
timeout 60 python3 -m bench.moe_lm.record --checkpoint /tmp/mlm/model.pt --out /tmp/mlm > $OUT/record.log 2>&1; echo "record rc $?"; tail -1 $OUT/record.log
cp /tmp/mlm/trace.npz .traces/moe-lm-trace.npz
timeout 330 python3 bench/moe_h100.py --predictor learned --only qwen3-30b-a3b@moe-lm --rounds 3 --out $OUT/learned > $OUT/learned.log 2>&1; echo "bench rc $?"
grep -A40 "acceptance summary" $OUT/learned.log | grep "│" | cut -c1-200
