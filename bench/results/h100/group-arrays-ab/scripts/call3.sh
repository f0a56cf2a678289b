set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
W=qwen3-30b-a3b@qwen,qwen1.5-moe-a2.7b@qwen
for i in 1 2; do
  PYTHONPATH=.device/base timeout 60 python3 .device/fine_run.py base $W 1 >> $OUT/ab.jsonl 2>>$OUT/ab.err
  PYTHONPATH=. timeout 60 python3 .device/fine_run.py new $W 1 >> $OUT/ab.jsonl 2>>$OUT/ab.err
done
python3 - <<'PY'
import json, os, collections
rows = [json.loads(l) for l in open(os.environ["OUT"] + "/ab.jsonl")]
agg = collections.defaultdict(list)
for r in rows: agg[(r["workload"][:6], r["batch"], r["fraction"], r["mode"], r["label"])].append(r)
for key in sorted(agg):
    rs = agg[key]; h = rs[-1]["host_us"]
    print(*key, [x["tokens_per_s"] for x in rs], rs[-1]["hit_rate"], rs[-1]["prefetch"], {k: h[k] for k in h if k in ("route_sync","demand_plan","demand_submit","compute","predict","prefetch_plan","prefetch_submit","total")})
PY
timeout 330 python3 bench/moe_h100.py --only qwen1.5-moe-a2.7b@qwen qwen3-30b-a3b@qwen --rounds 3 --out $OUT/moe > $OUT/moe.log 2>&1; echo "bench rc $?"
grep -A40 "acceptance summary" $OUT/moe.log | grep "│" | cut -c1-190
