#!/usr/bin/env bash
# Builds, on a machine with nvcc but no GPU, what scripts/gpu_check.sh would otherwise
# compile on the GPU machine: a CPython 3.12 wheel with the CUDA kernels for sm_90a and the
# C++ CUDA microbenchmarks (static CUDA runtime). Then:
#   GPU_CHECK_WHEEL=<dir>/diffkern-*.whl GPU_CHECK_BENCH_DIR=<dir>/bench bash scripts/gpu_check.sh OUT
# usage: scripts/build_gpu_wheel.sh OUTDIR [PYTHON3.12]
set -euo pipefail
OUTDIR=${1:?usage: scripts/build_gpu_wheel.sh OUTDIR [python3.12]}
PY=${2:-python3.12}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR/bench"
rm -f "$OUTDIR"/diffkern-*.whl
"$PY" -m pip wheel --no-deps -w "$OUTDIR" -Cbuild-dir=build/gpu-wheel \
  -Ccmake.define.DIFFKERN_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a .
cmake -S . -B build/gpu-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DDIFFKERN_BUILD_BENCH=ON \
  -DDIFFKERN_BUILD_PYTHON=OFF -DDIFFKERN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real >/dev/null
cmake --build build/gpu-bench -j "$(nproc)"
cp build/gpu-bench/bench/cpp/bench_*_cuda "$OUTDIR/bench/"
ls -la "$OUTDIR" "$OUTDIR/bench"
