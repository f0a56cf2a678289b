set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p /tmp/mlm
if [ ! -f /tmp/mlm/trace.npz ]; then
timeout 100 python3 -m bench.moe_lm.train --time-budget-s 60 --out /tmp/mlm/model.pt > $OUT/train.log 2>&1; echo "train rc $?"
timeout 60 python3 -m bench.moe_lm.record --checkpoint /tmp/mlm/model.pt --out /tmp/mlm > $OUT/record.log 2>&1; echo "record rc $?"
fi
cp /tmp/mlm/trace.npz .traces/moe-lm-trace.npz
timeout 300 python3 .traces/prof_learned.py $OUT; echo "prof rc $?"
