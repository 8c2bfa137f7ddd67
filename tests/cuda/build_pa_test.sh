#!/bin/bash
# builds tests/cuda/libpa_test.so from the family's .cu files + the C ABI (sm_90)
set -e
cd "$(dirname "$0")/../.."
out=${1:-build/pa_test}
mkdir -p $out
pids=()
for f in csrc/prefix_attention/*.cu tests/cuda/pa_capi.cu; do
  nvcc -c -std=c++17 -O3 -I csrc -arch=sm_90 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
    -o $out/$(basename $f).o $f &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
nvcc -shared -arch=sm_90 -cudart static -o $out/libpa_test.so $out/*.o
echo built $out/libpa_test.so
