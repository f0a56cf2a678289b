set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 280 python3 .traces/variants.py > $OUT/variants.jsonl 2>$OUT/variants.err; echo "rc $?"; tail -2 $OUT/variants.err
python3 - <<'PY'
import json, os, collections, statistics
rows = [json.loads(l) for l in open(os.environ["OUT"] + "/variants.jsonl")]
agg = collections.defaultdict(list)
for r in rows: agg[(r["workload"][:6], r["fraction"], r["variant"])].append(r)
for key in agg:
    rs = agg[key]
    print(*key, [x["tokens_per_s"] for x in rs], "median", statistics.median(x["tokens_per_s"] for x in rs), rs[-1]["hit_rate"], rs[-1]["prefetch"])
PY
