#!/usr/bin/env bash
# Runs ON the GPU machine (image 'cuda': Python 3.12, torch 2.11.0+cu130, triton 3.6.0, driver 580), from the
# repository root, with bench/fetch_wheels.sh's folder .whl/p1 carried (one call; see README.md). Installs
# sglang 0.5.23 + sglang-kernel 0.4.5 (stripped) and tiermem + tiermem-sglang into /tmp/site, checks the
# kernels against torch (kernel_smoke.py), writes a random-weight Qwen3-MoE checkpoint, then serves it
# all-HBM, with --expert-tier cxl (device pager, host pager), and with SGLang's --enable-paged-experts at the
# same K (e2e.py: phases, and NAME+graph for decode in CUDA graphs), and writes $OUT/e2e.json, $OUT/e2e.log and
# the server logs.
#
# Idempotent on a warm machine: the install and the checkpoint are reused when their inputs are unchanged,
# so a second call spends its time on serving. A later call that skips hbm compares against an earlier
# call's results carried in .whl/ref (REFERENCE=.whl/ref/e2e.json TRACE=.whl/ref/trace.npz).
# Knobs (environment): PHASES (default hbm,device,paged,tiermem; also predictor, and any NAME+graph), SLOTS (K, 32), LAYERS (6), EXPERTS (128),
# REQUESTS (64), CONCURRENCY (16), NEW_TOKENS (64), GRAPH_MAX_BS (largest captured decode batch of +graph phases;
# default K // top-k), REFERENCE, TRACE, COLLECT_TRACE (1: hbm records the routing
# trace for a later call's predictor phase), BUDGET_S (570: the serving part stops by then, so the logs still
# come back inside a 600 s call).
set -euo pipefail
export PYTHONUNBUFFERED=1
export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1   # sglang 0.5.23 asks for sglang-kernel >= 0.4.9; 0.4.5 is torch 2.11's
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
site=/tmp/site
model=/tmp/qwen3moe-random
budget_s=${BUDGET_S:-570}
started=$SECONDS
set +e
{
  echo "== versions"
  python3 -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  command -v nvcc && nvcc --version | tail -1
  echo "== install"
  stamp=$( (md5sum .whl/p*/*.whl; find tiermem integrations/sglang/tiermem_sglang pyproject.toml \
            integrations/sglang/pyproject.toml -name '*.py' -o -name pyproject.toml | sort | xargs md5sum) \
          | md5sum | cut -d' ' -f1)
  if [[ -f $site/.stamp && $(cat "$site/.stamp") == "$stamp" ]]; then
    echo "reusing $site"
  else
    rm -rf "$site"
    time python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/p*/*.whl \
      || exit 1
    time python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" \
      . ./integrations/sglang || exit 1
    echo "$stamp" > "$site/.stamp"
  fi
  export PYTHONPATH=$site
  python3 -c 'import sglang, transformers; print("sglang", sglang.__version__, "transformers", transformers.__version__)'
  python3 -c 'from importlib.metadata import entry_points as e; print("plugins:", [p.value for p in e(group="sglang.srt.plugins")])'
  echo "== kernels"
  python3 integrations/sglang/bench/kernel_smoke.py || exit 1
  echo "== model"
  model_args="--layers ${LAYERS:-6} --experts ${EXPERTS:-128}"
  if [[ -f $model/.args && $(cat "$model/.args") == "$model_args" ]]; then
    echo "reusing $model"
  else
    rm -rf "$model"
    # shellcheck disable=SC2086
    time python3 integrations/sglang/bench/make_model.py "$model" $model_args || exit 1
    echo "$model_args" > "$model/.args"
  fi
  left_s=$((budget_s - (SECONDS - started)))
  echo "== serve ($((SECONDS - started)) s in; serving stops at ${budget_s} s)"
  (( left_s >= 120 )) || { echo "only ${left_s} s left of BUDGET_S=${budget_s}: too little to serve"; exit 1; }
  reference=()
  [[ -n ${REFERENCE:-} ]] && reference+=(--reference "$REFERENCE")
  [[ -n ${TRACE:-} ]] && reference+=(--trace "$TRACE")
  [[ -n ${COLLECT_TRACE:-} ]] && reference+=(--collect-trace)
  timeout --kill-after=30 "$left_s" \
    python3 integrations/sglang/bench/e2e.py "$model" "$OUT" --slots "${SLOTS:-32}" \
    --phases "${PHASES:-hbm,device,paged,tiermem}" --requests "${REQUESTS:-64}" \
    --concurrency "${CONCURRENCY:-16}" --new-tokens "${NEW_TOKENS:-64}" --graph-max-bs "${GRAPH_MAX_BS:-0}" \
    "${reference[@]}"
} 2>&1 | tee "$OUT/e2e.log"
status=${PIPESTATUS[0]}
set -e
for log in "$OUT"/server-*.log; do [[ -f $log ]] && tail -c 200000 "$log" > "$log.tail" && mv "$log.tail" "$log"; done
echo "done in $((SECONDS - started)) s, status $status"
exit "$status"
