set -uo pipefail
export PYTHONUNBUFFERED=1
for label in base new; do
  path=.; [ $label = base ] && path=.device/base
  PYTHONPATH=$path timeout 280 python3 bench/moe_h100.py --only "$@" --rounds 3 --out $OUT/$label > $OUT/$label.log 2>&1
  echo "$label rc $?"; grep -A40 "acceptance summary" $OUT/$label.log | grep "│" | cut -c1-150
done
