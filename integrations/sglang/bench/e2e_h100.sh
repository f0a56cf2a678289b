#!/usr/bin/env bash
# Runs ON the GPU machine (image 'cuda': Python 3.12, torch 2.11.0+cu130, driver 580), from the repository
# root, after bench/fetch_wheels.sh's folders .whl/p1 .. .whl/pN were carried there (see README.md).
# Installs sglang 0.5.23 (+ stripped sglang-kernel) and tiermem + tiermem-sglang into /tmp/site, writes a
# random-weight Qwen3-MoE checkpoint, then serves it all-HBM, with --expert-tier cxl and with SGLang's
# --enable-paged-experts at the same K, and writes $OUT/e2e.json and the server logs.
# Knobs (environment): SLOTS (K, default 32), PHASES (default hbm,tiermem,paged,predictor), LAYERS (6),
# EXPERTS (128), REQUESTS (64), CONCURRENCY (16), NEW_TOKENS (64).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
site=/tmp/site
set +e
{
  echo "== versions"; python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "== install"; time python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/p*/*.whl
  time python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" \
    . ./integrations/sglang
  export PYTHONPATH=$site
  python3 -c 'import sgl_kernel, sglang; print("sgl_kernel", sgl_kernel.__version__, "sglang", sglang.__version__)'
  python3 -c 'from importlib.metadata import entry_points as e; print([p.value for p in e(group="sglang.srt.plugins")])'
  echo "== model"; time python3 integrations/sglang/bench/make_model.py /tmp/qwen3moe-random \
    --layers "${LAYERS:-6}" --experts "${EXPERTS:-128}"
  echo "== serve"; python3 integrations/sglang/bench/e2e.py /tmp/qwen3moe-random "$OUT" --slots "${SLOTS:-32}" \
    --phases "${PHASES:-hbm,tiermem,paged,predictor}" --requests "${REQUESTS:-64}" \
    --concurrency "${CONCURRENCY:-16}" --new-tokens "${NEW_TOKENS:-64}"
} 2>&1 | tee "$OUT/e2e.log"
status=${PIPESTATUS[0]}
set -e
for log in "$OUT"/server-*.log; do [[ -f $log ]] && tail -c 200000 "$log" > "$log.tail" && mv "$log.tail" "$log"; done
exit "$status"
