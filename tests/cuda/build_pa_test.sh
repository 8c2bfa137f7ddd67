#!/bin/bash
# Builds libpa_test.so (the family's .cu files + pa_capi.cu, sm_90a) for
# prefix_attention_gpu.py:  build_pa_test.sh OUT_DIR [extra nvcc flags, e.g. -DDK_PA_FWD_MT=1]
set -e
cd "$(dirname "$0")/../.."
out=${1:-build/pa_test}
shift || true
mkdir -p "$out"
pids=()
for f in csrc/prefix_attention/*.cu tests/cuda/pa_capi.cu; do
  nvcc -c -std=c++17 -O3 -I csrc -arch=sm_90a -DDIFFKERN_PA_SM90A=1 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
    "$@" -o "$out/$(basename "$f").o" "$f" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nvcc -shared -arch=sm_90a -cudart static -o "$out/libpa_test.so" "$out"/*.o
# The Hopper forward's wgmma building blocks alone (prints each product's error).
nvcc -std=c++17 -O2 -arch=sm_90a -I csrc -o "$out/wgmma_probe" tests/cuda/wgmma_probe.cu
echo "built $out/libpa_test.so and $out/wgmma_probe"
