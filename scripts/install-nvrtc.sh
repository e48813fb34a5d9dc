#!/usr/bin/env bash
# Install NVRTC 13.0 (+ CUDA runtime and CCCL headers) from the pip wheels into DIR,
# with no GPU, no CUDA toolkit and no nvcc, then print the lines to export.
#
#   scripts/install-nvrtc.sh DIR            # installs, prints export lines
#   eval "$(scripts/install-nvrtc.sh DIR)"  # installs and exports
#   SWITCHYARD_REQUIRE_NVRTC=1 cargo test --test kernels_compile
#
# Stay on 13.0.x: the GPU hosts run driver 580 (CUDA 13.0) and cannot load newer PTX ISA.
set -euo pipefail
dir="${1:?usage: install-nvrtc.sh DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
py="${PYTHON:-python3}"
if ! ls "$dir"/site/nvidia/cu13/lib/libnvrtc.so.13 >/dev/null 2>&1; then
    "$py" -m pip install --quiet --disable-pip-version-check --target "$dir/site" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
lib="$(dirname "$(find "$dir/site" -name 'libnvrtc.so.13' -print -quit)")"
[ -n "$lib" ] && [ -f "$lib/libnvrtc.so.13" ] || { echo "libnvrtc.so.13 not found under $dir/site" >&2; exit 1; }
# cudarc asks for libnvrtc.so, libnvrtc.so.13, ...: the wheel has .so.13; add the plain name too.
ln -sf libnvrtc.so.13 "$lib/libnvrtc.so"
inc="$(find "$dir/site/nvidia" -maxdepth 3 -type d -name include -print | sort | tr '\n' ':' | sed 's/:$//')"
[ -d "${inc%%:*}/cccl" ] && inc="$inc:${inc%%:*}/cccl"
echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export SWITCHYARD_CUDA_INCLUDE=\"$inc\""
