set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -1 $OUT/gpu-tests.log
for label in prev new new prev; do
  if [ $label = prev ]; then tree=.device/prev; else tree=.; fi
  PYTHONPATH=$tree timeout 60 python3 .traces/ab_b8.py $label 2 >> $OUT/ab8.jsonl 2>>$OUT/ab8.err; echo "$label rc $?"
done
tail -2 $OUT/ab8.err
timeout 320 python3 bench/moe_h100.py --rounds 3 --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-200
