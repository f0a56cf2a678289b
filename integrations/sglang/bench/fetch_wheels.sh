#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI), from anywhere in the repository. Downloads every wheel the
# GPU machine (image 'cuda': Python 3.12, torch 2.11.0+cu130, triton 3.6.0, no registry) needs for
# bench/e2e_h100.sh and packs them into ONE carry folder, .whl/p1 (git-ignored), small enough to travel with
# the working tree in a single device call (64 MiB in all).
#
# The set: sglang 0.5.23 (the plugin's pin: plugins + paged experts) with sglang-kernel 0.4.5, the last
# sglang-kernel built against torch 2.11 (sglang 0.5.16/0.5.17 pin it with torch==2.11.0). 0.4.6 and later
# link torch >= 2.13 symbols (0.4.10: c10::cuda::CUDAErrorLogCapture, new torch::Library::_def overloads);
# 0.4.5's libraries link only symbols torch 2.11.0+cu130 exports. Its op schemas equal 0.4.10's for every op
# sglang 0.5.23 calls, except two host-cache ops (get_device_accessible_ptr, transfer_embedding_ranges_direct)
# that the run does not use. sglang 0.5.23 asserts sglang-kernel >= 0.4.9 at start-up unless
# SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 (e2e_h100.sh sets it).
#
# Stripped (bench/strip_wheel.py, RECORD rewritten), none of it on the run's path:
#   sglang-kernel: flash_ops (FA3, 1.1 GB; --attention-backend triton), sm100/* (Blackwell), infllm_ops and
#                  flashmla_ops (InfLLM-V2 / MLA attention; both loaded lazily)
#   sglang:        srt/rust_extensions/_{server,grpc,multimodal,bench} (SGLANG_RUST_SERVER, gRPC ports,
#                  multimodal processors and bench clients only; loaded on use) and multimodal_gen (the
#                  diffusion server; `sglang serve` imports it only for diffusion models, under ImportError)
# transformers is left out: the image's 5.17.0 serves the run (gpu-wheels.txt says where that was checked).
# flashinfer is left out on purpose: without it sglang takes its non-flashinfer paths (triton attention,
# pytorch sampling) instead of JIT-compiling flashinfer kernels at start-up.
# Needs: python3 with pip. Downloads are cached in $WHEEL_CACHE (default /tmp/tiermem-wheel-cache).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
here=integrations/sglang/bench
cache=${WHEEL_CACHE:-/tmp/tiermem-wheel-cache}
carry_limit=$((64 * 1024 * 1024))
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_39_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
requirements=(sglang==0.5.23 sglang-kernel==0.4.5 $(grep -v '^#' "$here/gpu-wheels.txt"))
mkdir -p "$cache"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache" "${requirements[@]}"
rm -rf .whl/all .whl/p[0-9]* && mkdir -p .whl/all .whl/p1
# Exactly the pinned wheels, copied out of the cache (which may hold other versions).
python3 -m pip download -q --no-deps --no-index --find-links "$cache" "${plat[@]}" -d .whl/all "${requirements[@]}"
python3 "$here/strip_wheel.py" .whl/all/sglang_kernel-0.4.5-*.whl \
  'sgl_kernel/flash_ops.abi3.so' 'sgl_kernel/sm100/*' 'sgl_kernel/infllm_ops*.so' 'sgl_kernel/flashmla_ops.abi3.so'
python3 "$here/strip_wheel.py" .whl/all/sglang-0.5.23-*.whl \
  'sglang/srt/rust_extensions/_server.*.so' 'sglang/srt/rust_extensions/_grpc.*.so' \
  'sglang/srt/rust_extensions/_multimodal.*.so' 'sglang/srt/rust_extensions/_bench.*.so' 'sglang/multimodal_gen/*'
mv .whl/all/*.whl .whl/p1/ && rmdir .whl/all

wheels=$(du -cb .whl/p1/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
shared=$( [[ -d shared ]] && du -sb shared | cut -f1 || echo 0)
total=$((wheels + tree + shared))
printf '.whl/p1: %d wheels, %.1f MiB; working tree %.1f MiB; shared/ %.1f MiB; one call carries %.1f of 64 MiB\n' \
  "$(ls .whl/p1 | wc -l)" "$(bc -l <<<"$wheels/1048576")" "$(bc -l <<<"$tree/1048576")" \
  "$(bc -l <<<"$shared/1048576")" "$(bc -l <<<"$total/1048576")"
if (( total > carry_limit )); then
  echo "too large for one device call: drop a wheel the image already has, or strip more" >&2
  exit 1
fi
echo 'device call (kind nvidia-h100-x1, timeout_s 600): carry [".whl/p1"], command: bash integrations/sglang/bench/e2e_h100.sh'
