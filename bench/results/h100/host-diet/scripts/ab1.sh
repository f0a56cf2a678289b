set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation/test_transfer.py tests/experts 2>&1 | tail -2
for i in 1 2; do
  PYTHONPATH=.device/base timeout 100 python3 .device/fine_run.py base "${1:-qwen3-30b-a3b@qwen}" "${2:-1}" >> $OUT/ab.jsonl
  PYTHONPATH=. timeout 100 python3 .device/fine_run.py new "${1:-qwen3-30b-a3b@qwen}" "${2:-1}" >> $OUT/ab.jsonl
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
