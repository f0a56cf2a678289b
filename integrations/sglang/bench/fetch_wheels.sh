#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI), from the repository root. Downloads every wheel the GPU
# machine needs for the end-to-end run (cp312, manylinux x86-64), strips sglang-kernel of its FA3 library
# (flash_ops.abi3.so: 326 of its 356 MiB compressed; the run uses --attention-backend triton) and of its
# sm100 build, and packs them into carry folders of at most 60 MiB: .whl/p1, .whl/p2, ... (ignored by git).
# Prints the device calls to make. Needs: python3 with pip, zip, unzip.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
here=integrations/sglang/bench
rm -rf .whl && mkdir -p .whl/all
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_39_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl/all sglang==0.5.23 sglang-kernel==0.4.10
grep -v '^#' "$here/gpu-wheels.txt" | xargs python3 -m pip download -q --no-deps "${plat[@]}" -d .whl/all

# sglang-kernel without flash_ops (FA3) and sm100 (Blackwell) libraries; RECORD rewritten to match.
kernel=$(ls .whl/all/sglang_kernel-0.4.10-*.whl)
work=$(mktemp -d)
unzip -q "$kernel" -d "$work"
rm -f "$work"/sgl_kernel/flash_ops.abi3.so "$work"/sgl_kernel/sm100/*.so
record=$(ls "$work"/sglang_kernel-0.4.10.dist-info/RECORD)
grep -v -e 'sgl_kernel/flash_ops.abi3.so' -e 'sgl_kernel/sm100/.*\.so' "$record" > "$record.new" && mv "$record.new" "$record"
rm "$kernel"
(cd "$work" && zip -q -r -X "$OLDPWD/$kernel" .)
rm -rf "$work"

# Pack into carry folders of at most 60 MiB each (a wheel larger than that cannot travel).
limit=$((60 * 1024 * 1024)); part=1; used=0; mkdir -p .whl/p1
for wheel in $(ls -S .whl/all/*.whl); do
  size=$(stat -c %s "$wheel")
  if (( size > limit )); then echo "too large to carry: $wheel ($size bytes)" >&2; exit 1; fi
  if (( used + size > limit )); then part=$((part + 1)); used=0; mkdir -p ".whl/p$part"; fi
  mv "$wheel" ".whl/p$part/"; used=$((used + size))
done
rmdir .whl/all
du -sh .whl/p*
echo "device calls (kind nvidia-h100-x1), each ≤ 64 MiB with the working tree:"
for p in $(seq 1 $((part - 1))); do echo "  carry [\".whl/p$p\"]  command: ls .whl/p$p"; done
echo "  carry [\".whl/p$part\"]  command: bash integrations/sglang/bench/e2e_h100.sh"
