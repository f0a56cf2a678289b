set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -2 $OUT/gpu-tests.log
W=qwen3-30b-a3b@qwen,qwen1.5-moe-a2.7b@qwen
for i in 1 2; do
  PYTHONPATH=.device/base timeout 110 python3 .device/fine_run.py base $W 1,8,64 >> $OUT/ab.jsonl 2>>$OUT/ab.err
  PYTHONPATH=. timeout 110 python3 .device/fine_run.py new $W 1,8,64 >> $OUT/ab.jsonl 2>>$OUT/ab.err
done
tail -3 $OUT/ab.err
python3 - <<'PY'
import json, os, collections
rows = [json.loads(l) for l in open(os.environ["OUT"] + "/ab.jsonl")]
agg = collections.defaultdict(list)
for r in rows: agg[(r["workload"][:6], r["batch"], r["fraction"], r["mode"], r["label"])].append(r)
for key in sorted(agg):
    rs = agg[key]; h = rs[-1]["host_us"]
    print(*key, [x["tokens_per_s"] for x in rs], rs[-1]["hit_rate"], rs[-1]["prefetch"], {k: h[k] for k in h if k in ("route_sync","demand_plan","demand_submit","compute","predict","prefetch_plan","prefetch_submit","total")})
PY
