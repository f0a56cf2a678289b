set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/foundation tests/experts tests/residency > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc $?"; tail -1 $OUT/gpu-tests.log
grep -E "^(FAILED|ERROR)|^E " $OUT/gpu-tests.log | head -20
timeout 300 python3 bench/offload_decode.py --out $OUT/offload-decode --layers 8 > $OUT/offload-decode.log 2>&1; echo "decode rc $?"
tail -5 $OUT/offload-decode.log
