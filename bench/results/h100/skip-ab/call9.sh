set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -1 $OUT/gpu-tests.log
# A/B: prev (2649c61) vs new, processes in ABBA order, 2 rotated rounds each
for label in prev new new prev prev new; do
  if [ $label = prev ]; then tree=.device/prev; else tree=.; fi
  PYTHONPATH=$tree timeout 110 python3 .traces/ab_b1.py $label 2 >> $OUT/ab.jsonl 2>>$OUT/ab.err; echo "$label rc $?"
done
tail -3 $OUT/ab.err
python3 - <<'PY'
import json, os, collections, statistics
rows = [json.loads(l) for l in open(os.environ["OUT"] + "/ab.jsonl")]
agg = collections.defaultdict(list)
for r in rows: agg[(r["workload"][:6], r["fraction"], r["tree"], r["mode"])].append(r)
for key in sorted(agg):
    rs = agg[key]
    print(*key, [x["tokens_per_s"] for x in rs], "median", statistics.median(x["tokens_per_s"] for x in rs), rs[-1]["hit_rate"], rs[-1]["prefetch"], rs[-1]["skipped"])
PY
