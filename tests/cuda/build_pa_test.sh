#!/bin/bash
# Builds libpa_test.so (the family's .cu files + pa_capi.cu, sm_90) for
# prefix_attention_gpu.py:  build_pa_test.sh OUT_DIR [extra nvcc flags, e.g. -DDK_PA_FWD_MT=1]
set -e
cd "$(dirname "$0")/../.."
out=${1:-build/pa_test}
shift || true
mkdir -p "$out"
pids=()
for f in csrc/prefix_attention/*.cu tests/cuda/pa_capi.cu; do
  nvcc -c -std=c++17 -O3 -I csrc -arch=sm_90 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
    "$@" -o "$out/$(basename "$f").o" "$f" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nvcc -shared -arch=sm_90 -cudart static -o "$out/libpa_test.so" "$out"/*.o
echo "built $out/libpa_test.so"
