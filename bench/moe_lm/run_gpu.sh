#!/usr/bin/env bash
# The MoE language model benchmark on the GPU machine: train -> record -> evaluate, < 6 minutes on one H100.
#
#   bash bench/moe_lm/run_gpu.sh OUT_DIR
#
# Needs .moe_lm/ at the repository root (built on the CPU machine by `python -m bench.moe_lm.corpus`; carry it),
# torch with CUDA, numpy and rich; no tokenizers. Writes into OUT_DIR: run.log (every stage's output),
# eval.jsonl (one meta record, then one record per predictor x phase x distance), routes.npz (the held-out
# trace without hidden states), sample.npz (its first sequences with hidden states) and gates.npy (the router
# gates for NextGatePredictor). The checkpoint and the full trace stay in MOE_LM_WORK (default
# /tmp/tiermem-moe-lm). MOE_LM_TRAIN_ARGS adds arguments to train (e.g.
# "--tiny --steps 20" for a CPU check); MOE_LM_EVAL_THREADS sets the evaluation's torch threads (default 8).
set -euo pipefail

out=${1:?usage: bash bench/moe_lm/run_gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS=${COLUMNS:-250}  # the evaluation table is wide
work=${MOE_LM_WORK:-/tmp/tiermem-moe-lm}
mkdir -p "$work"
log="$out/run.log"

stage() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*" | tee -a "$log"
  python3 -m "$@" 2>&1 | tee -a "$log"
  echo "== $name took $((SECONDS - start)) s" | tee -a "$log"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$log"
# shellcheck disable=SC2086  # MOE_LM_TRAIN_ARGS is a list of arguments
stage train bench.moe_lm.train --out "$work/model.pt" ${MOE_LM_TRAIN_ARGS:-}
stage record bench.moe_lm.record --checkpoint "$work/model.pt" --out "$work"
stage evaluate bench.moe_lm.evaluate --trace "$work/trace.npz" --gates "$work/gates.npy" --out "$out/eval.jsonl" \
  --threads "${MOE_LM_EVAL_THREADS:-8}"
cp "$work/routes.npz" "$work/sample.npz" "$work/gates.npy" "$out/"
echo "== done in $SECONDS s; $out: $(ls "$out" | tr '\n' ' ')" | tee -a "$log"
