#!/usr/bin/env bash
# GPU check on an offline CUDA machine (H100): build in place (no isolation, no downloads),
# run the CUDA tests, compute-sanitizer (memcheck + racecheck), the C++ CUDA benchmark, the
# self-check and the Python benchmark. A failing step does not stop the others; the exit
# status is non-zero if any failed. A summary table is printed last.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# OUTDIR gets 5 files (the device tool returns at most 8): build.log pytest.log
# sanitizer.log run.log, and results.tar.gz with every JSON and plot (selfcheck.json,
# bench_log_bessel.json, bench_vmf.json, bench_cpp_cuda.json, bench_cpp_sinkhorn.json,
# bench_ot.json, ot.png).
#
# GPU_CHECK_BENCH="ot log_bessel vmf" (default: all) limits which Python benchmarks run;
# DK_SANITIZE_FAMILIES="ot" (default: all) which families the sanitizer exercises;
# GPU_CHECK_BENCH_ONLY=1 skips the tests and the sanitizer (a benchmark rerun of code that
# a full check already passed); GPU_CHECK_OT_DEVICE=cuda (default: all) skips the CPU half
# of bench/ot.py.
#
# Peers that the machine lacks (TensorFlow Probability for JAX) travel as wheels in .whl/
# (see bench/README.md); when that folder exists they are installed to a private folder. Target: < 9 minutes.
set -uo pipefail  # no -e: every step runs; failures are collected instead

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES="$OUT/results"   # packed into results.tar.gz at the end
mkdir -p "$RES"
BENCHES=${GPU_CHECK_BENCH:-"ot log_bessel vmf"}
want() { case " $BENCHES " in *" $1 "*) return 0 ;; esac; return 1; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$(date +%s)
NAMES=(); STATES=(); SECS=()

# step NAME TIMEOUT_S LOGFILE CMD...: runs CMD under a timeout, appending to LOGFILE.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s) rc
  echo "=== [$(( t - T0 ))s] $name: $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local state=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="TIMEOUT(${limit}s)"
  elif [ $rc -ne 0 ]; then state="FAIL(rc=$rc)"; fi
  echo "=== $name: $state in $(( $(date +%s) - t ))s" | tee -a "$log"
  NAMES+=("$name"); STATES+=("$state"); SECS+=($(( $(date +%s) - t )))
}
skip() { NAMES+=("$1"); STATES+=("skip: $2"); SECS+=(0); echo "=== $1: skipped ($2)"; }

SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/run.log" 2>&1

# 1. Build + install; the same CMake build also compiles the C++ benchmarks (one nvcc pass).
step build 420 "$OUT/build.log" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -Cbuild-dir=build/gpu \
  -Ccmake.define.DIFFKERN_CUDA=ON \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  -Ccmake.define.DIFFKERN_BUILD_BENCH=ON
BUILD_OK=$([ "${STATES[-1]}" = ok ] && echo 1 || echo 0)

if [ "$BUILD_OK" = 1 ]; then
  # Peers and test-only dependencies the offline machine lacks (POT, OTT-JAX, TFP) travel as
  # wheels in .whl/ (bench/README.md); installed before the tests, which compare with POT.
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dk_peers .whl/*.whl \
      >>"$OUT/run.log" 2>&1 && export PYTHONPATH=/tmp/dk_peers${PYTHONPATH:+:$PYTHONPATH}
  fi
  # 2. CUDA tests (the cpu half of the suite runs in CI).
  if [ "${GPU_CHECK_BENCH_ONLY:-0}" = 1 ]; then
    skip pytest-cuda "GPU_CHECK_BENCH_ONLY=1"
  else
    step pytest-cuda 300 "$OUT/pytest.log" \
      "$PY" -m pytest -q -m cuda tests -rs
  fi

  # 3. compute-sanitizer on a small workload. No caching allocator under memcheck, so
  #    out-of-bounds accesses hit unallocated memory instead of a neighbour's block.
  if [ "${GPU_CHECK_BENCH_ONLY:-0}" = 1 ]; then
    skip memcheck "GPU_CHECK_BENCH_ONLY=1"; skip racecheck "GPU_CHECK_BENCH_ONLY=1"
  elif [ -n "$SAN" ]; then
    step memcheck 240 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$PY" scripts/sanitizer_smoke.py
    step racecheck 240 "$OUT/sanitizer.log" \
      "$SAN" --tool racecheck --error-exitcode 1 "$PY" scripts/sanitizer_smoke.py
  else
    skip memcheck "compute-sanitizer not found"; skip racecheck "compute-sanitizer not found"
  fi

  # 4. C++ CUDA microbenchmark (built above when nvcc was found).
  BENCH=build/gpu/bench/cpp/bench_log_bessel_cuda
  if [ -x "$BENCH" ]; then
    want log_bessel && step bench-cpp-cuda 120 "$OUT/run.log" "$BENCH" --json "$RES/bench_cpp_cuda.json"
  else
    skip bench-cpp-cuda "$BENCH not built"
  fi
  BENCH=build/gpu/bench/cpp/bench_sinkhorn_cuda
  if [ -x "$BENCH" ]; then
    want ot && step bench-cpp-sinkhorn 120 "$OUT/run.log" "$BENCH" --json "$RES/bench_cpp_sinkhorn.json"
  else
    skip bench-cpp-sinkhorn "$BENCH not built"
  fi

  # 5. Self-check of every family, then the Python benchmark against peers.
  step selfcheck 180 "$OUT/run.log" "$PY" -m diffkern --json "$RES/selfcheck.json"
  # JAX (the TFP and OTT peers) must not grab 75% of the GPU up front: torch shares it.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  want ot && step bench-ot 420 "$OUT/run.log" "$PY" bench/ot.py \
    --device "${GPU_CHECK_OT_DEVICE:-all}" --repeats 11 \
    --json "$RES/bench_ot.json" --plot "$RES/ot.png"
  if want ot; then  # where the time of a solve goes (kernel table per problem)
    for args in "--n 1000 --eps 1e-2" "--n 1000 --eps 1e-3" "--n 256 --batch 64 --eps 1e-3"; do
      step profile-ot 120 "$OUT/run.log" "$PY" bench/ot_profile.py $args
    done
  fi
  want log_bessel && step bench-log-bessel 300 "$OUT/run.log" "$PY" bench/log_bessel.py \
    --device all --json "$RES/bench_log_bessel.json"
  want vmf && step bench-vmf 180 "$OUT/run.log" "$PY" bench/vmf.py --device all \
    --json "$RES/bench_vmf.json"
else
  for s in pytest-cuda memcheck racecheck bench-cpp-cuda bench-cpp-sinkhorn selfcheck bench-ot \
           bench-log-bessel bench-vmf; do
    skip "$s" "build failed (see build.log)"
  done
fi

tar -czf "$OUT/results.tar.gz" -C "$RES" . && rm -rf "$RES"

FAILED=0
echo
echo "gpu_check summary ($(( $(date +%s) - T0 ))s total, logs in $OUT)"
printf '%-18s %-22s %6s\n' step status seconds
printf '%-18s %-22s %6s\n' ------------------ ---------------------- ------
for i in "${!NAMES[@]}"; do
  printf '%-18s %-22s %6s\n' "${NAMES[$i]}" "${STATES[$i]}" "${SECS[$i]}"
  case "${STATES[$i]}" in ok|skip*) ;; *) FAILED=1 ;; esac
done
# A missing sanitizer or benchmark is reported but is not a failure of the code.
exit $FAILED
