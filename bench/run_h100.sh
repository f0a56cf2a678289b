#!/usr/bin/env bash
# The GPU measurements behind issues 2 (transfer engine) and 3 (tiermem bench), in one run of < 8 minutes.
#
#   bench/run_h100.sh OUT_DIR
#
# Writes into OUT_DIR: one JSON-lines file and one PNG per suite (named <time>-<suite>), a log per suite,
# checks.txt (the acceptance checks over the copy and gather results) and report.png (all cells).
# Every suite runs even if an earlier one failed; the exit status is 1 if any suite or check failed.
# Needs torch with CUDA, triton, numba, rich and matplotlib; tiermem from this checkout (PYTHONPATH).
set -uo pipefail

out=${1:?usage: bench/run_h100.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS=${COLUMNS:-160}  # wide tables in the logs
status=0

# run NAME TIMEOUT_S ARGS...: `tiermem bench ARGS --out OUT_DIR`, log in OUT_DIR/NAME.log
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: tiermem bench $* (limit ${limit} s)"
  local start=$SECONDS
  if ! timeout --signal=INT "$limit" python -m tiermem bench "$@" --out "$out" --no-progress >"$out/$name.log" 2>&1; then
    echo "!! $name failed or timed out (see $name.log)"
    status=1
  fi
  tail -n 12 "$out/$name.log"
  echo "== $name took $((SECONDS - start)) s"
}

python -c "import torch, triton, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.get_device_name(0), 'triton', triton.__version__, 'numba', numba.__version__)"

# Every GPU path on tiny sizes first (verifies bytes, not speed), where pytest is installed.
if python -c "import pytest" 2>/dev/null; then
  timeout 120 python -m pytest tests/bench -q -m gpu -p no:cacheprovider >"$out/gpu-tests.log" 2>&1 || status=1
  tail -n 15 "$out/gpu-tests.log"
fi

# Issue 2 + issue 3 harness: raw copy_ vs the tiermem engine vs a plain copy_ loop, same run, 4 KiB..1 GiB.
run copy 150 copy --direction h2d d2h bidir --memory pinned dram --engine torch tiermem plain-loop \
  --size 4KiB 64KiB 1MiB 16MiB 64MiB 256MiB 1GiB
# The engine's chunk size x streams, for the large objects of the acceptance.
run copy-tuning 60 copy --name copy-tuning --direction h2d bidir --memory dram --engine tiermem \
  --chunk 16MiB 64MiB 256MiB --streams 1 2 4 --size 256MiB 1GiB
# Pageable memory and the SM copy kernel (UVA), device-to-device.
run copy-paths 50 copy --name copy-paths --direction h2d d2h d2d --memory pageable dram --engine torch sm \
  --size 64KiB 1MiB 16MiB 256MiB
# Issue 3: scattered rows, 64 B..16 KiB, from pinned and tiermem-registered tables.
run gather 90 gather --memory pinned dram --method uva cpu-staged naive
# Idle latency from the CPU and the GPU (dram, emulated cxl, pinned, hbm).
run latency 40 latency --memory dram cxl pinned hbm
# Source x destination at 256 MiB.
run matrix 30 matrix
# The default command must finish in under a minute.
run quick 60

python -m tiermem bench report "$out"/*-copy.jsonl "$out"/*-gather.jsonl --check --plot "$out/report.png" \
  >"$out/checks.txt" 2>&1 || status=1
tail -n 25 "$out/checks.txt"
exit $status
