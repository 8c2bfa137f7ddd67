#!/usr/bin/env bash
# GPU check on an offline CUDA machine (H100/H200): build in place (no isolation, no
# downloads), run the CUDA tests, compute-sanitizer (memcheck + racecheck), every C++ CUDA
# benchmark, the self-check and every family's Python benchmarks. A failing step does not
# stop the others; the exit status is non-zero if any failed. A summary table is printed last.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Nothing here names a family. The Python benchmarks come from each family's
# diffkern/checks/<family>.py (GPU_BENCHMARKS, listed by `python -m diffkern
# --list-families --json -`); the C++ benchmarks are every built
# build/gpu/bench/cpp/bench_<family>_cuda; the sanitizer runs scripts/sanitizer_smoke.py,
# which loops over the families itself.
#
# OUTDIR gets 5 files (the device tool returns at most 8): build.log pytest.log
# sanitizer.log run.log, and results.tar.gz with every JSON and plot (selfcheck.json,
# bench_cpp_<family>.json, and what the families' benchmarks write, e.g. bench_ot.json).
#
# GPU_CHECK_SOAK_SECONDS (default 60; 0: skip) sets the CUDA soak's length.
# GPU_CHECK_OT_SWEEP_PROBLEMS (default 10000; 0: skip), GPU_CHECK_OT_SWEEP_WORKERS (3 per
# GPU), GPU_CHECK_OT_SWEEP_SECONDS (240) and GPU_CHECK_OT_SWEEP_FIRST (0: the first problem's
# index, for a sweep run as slices over several calls; bench/soak_ot.py --merge joins them),
# GPU_CHECK_OT_SWEEP_CAP (2000: soak_ot's --sinkhorn-cap, 0: Sinkhorn always in full)
# set the CUDA float32 OT sweep (bench/soak_ot.py). GPU_CHECK_OT_SWEEP_BACKGROUND=1 with 2 or
# more GPUs runs the sweep on the last GPU, in the background from the start, while every
# other step runs on the others (CUDA_VISIBLE_DEVICES); its log is sweep.log.
# GPU_CHECK_BENCH="sinkhorn log_bessel" (families or aliases such as "ot"; default: all;
# "none": no benchmarks) limits the Python and C++ benchmarks; DK_SANITIZE_FAMILIES (same
# names) the families the sanitizer exercises; GPU_CHECK_BENCH_ONLY=1 skips the tests and the
# sanitizer (a benchmark rerun of code that a full check already passed);
# GPU_CHECK_OT_DEVICE=cuda (default: all) skips the CPU half of bench/ot.py (read by
# diffkern/checks/sinkhorn.py). GPU_CHECK_STEPS (default "all") names the step groups to run,
# from: tests sanitizer bench-cpp selfcheck soak ot-sweep multi-gpu benchmarks (e.g.
# "ot-sweep multi-gpu" for a partial run; the build always runs). GPU_CHECK_ARGS_<step> (the
# step's name with - as _, e.g. GPU_CHECK_ARGS_bench_zo="--parts e") appends arguments to a
# family benchmark's command. The multi-gpu group runs where 2 or more GPUs are visible:
# scripts/zo_distributed_check.py under torchrun, one process per GPU. DRY_RUN=1 builds nothing and runs nothing: it prints each
# step it would run (the benchmark list comes from the installed diffkern, so PYTHON must
# import one) and still prints the summary.
#
# Peers that the machine lacks (TensorFlow Probability for JAX) travel as wheels in .whl/
# (see bench/README.md); when that folder exists they are installed to a private folder.
# Target: < 9 minutes.
set -uo pipefail  # no -e: every step runs; failures are collected instead

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES="$OUT/results"   # packed into results.tar.gz at the end
mkdir -p "$RES"
BENCHES=${GPU_CHECK_BENCH:-all}
DRY=${DRY_RUN:-0}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$(date +%s)
NAMES=(); STATES=(); SECS=()
STEPS=" ${GPU_CHECK_STEPS:-all} "
# wanted GROUP: is this step group selected (GPU_CHECK_STEPS)?
wanted() { [ "$STEPS" = " all " ] || [[ "$STEPS" == *" $1 "* ]]; }

# step NAME TIMEOUT_S LOGFILE CMD...: runs CMD under a timeout, appending to LOGFILE.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s) rc
  if [ "$DRY" = 1 ]; then
    echo "=== $name (limit ${limit}s, log ${log##*/}): $*"
    NAMES+=("$name"); STATES+=("dry-run"); SECS+=(0)
    return 0
  fi
  echo "=== [$(( t - T0 ))s] $name: $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  local state=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="TIMEOUT(${limit}s)"
  elif [ $rc -ne 0 ]; then state="FAIL(rc=$rc)"; fi
  echo "=== $name: $state in $(( $(date +%s) - t ))s" | tee -a "$log"
  NAMES+=("$name"); STATES+=("$state"); SECS+=($(( $(date +%s) - t )))
}
skip() { NAMES+=("$1"); STATES+=("skip: $2"); SECS+=(0); echo "=== $1: skipped ($2)"; }
fail() { NAMES+=("$1"); STATES+=("FAIL($2)"); SECS+=(0); echo "=== $1: FAIL ($2)"; }

summary() {
  tar -czf "$OUT/results.tar.gz" -C "$RES" . && rm -rf "$RES"
  local failed=0 i
  echo
  echo "gpu_check summary ($(( $(date +%s) - T0 ))s total, logs in $OUT)"
  printf '%-20s %-30s %6s\n' step status seconds
  printf '%-20s %-30s %6s\n' -------------------- ------------------------------ ------
  for i in "${!NAMES[@]}"; do
    printf '%-20s %-30s %6s\n' "${NAMES[$i]}" "${STATES[$i]}" "${SECS[$i]}"
    # A missing sanitizer or benchmark is reported but is not a failure of the code.
    case "${STATES[$i]}" in ok|skip*|dry-run) ;; *) failed=1 ;; esac
  done
  exit $failed
}

# The families' benchmarks as lines "B<TAB>family<TAB>step<TAB>timeout<TAB>shell-quoted argv",
# after one line "F<TAB>family" per selected family; {results} becomes $RES.
bench_plan() {
  "$PY" -m diffkern --list-families --families "$BENCHES" --json - | "$PY" -c '
import json, shlex, sys
text = sys.stdin.read()
if not text:  # the CLI failed and said why on stderr
    sys.exit(1)
for f in json.loads(text)["families"]:
    print("F", f["name"], sep="\t")
    for b in f["gpu_benchmarks"]:
        argv = [a.replace("{results}", sys.argv[1]) for a in b["argv"]]
        print("B", f["name"], b["name"], b["timeout_s"], shlex.join(argv), sep="\t")
' "$RES"
}

SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

# 0. Is there a GPU at all? Without one every later step would fail for the same reason.
if nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
     >"$OUT/run.log" 2>&1 && [ -s "$OUT/run.log" ]; then
  echo "=== GPU: $(head -1 "$OUT/run.log")"
elif [ "$DRY" = 1 ]; then
  echo "=== no GPU found (nvidia-smi: $(head -1 "$OUT/run.log" 2>/dev/null)); dry run goes on"
else
  echo "=== nvidia-smi: $(head -1 "$OUT/run.log")"
  fail gpu "no GPU"
  for s in build pytest-cuda memcheck racecheck synccheck bench-cpp selfcheck benchmarks; do
    skip "$s" "no GPU"
  done
  summary
fi

# 1. Build + install; the same CMake build also compiles the C++ benchmarks (one nvcc pass).
#    GPU_CHECK_WHEEL=path installs a wheel built elsewhere instead (device time is scarce:
#    the build is ~160 s of it), and GPU_CHECK_BENCH_DIR names where its C++ benchmark
#    binaries are (scripts/build_gpu_wheel.sh makes both on a machine without a GPU).
#    GPU_CHECK_OVERLAY=1: see below.
if [ -n "${GPU_CHECK_WHEEL:-}" ]; then
  step build 120 "$OUT/build.log" \
    "$PY" -m pip install --no-deps --no-index --force-reinstall -v "$GPU_CHECK_WHEEL"
else
  step build 420 "$OUT/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
    -Cbuild-dir=build/gpu \
    -Ccmake.define.DIFFKERN_CUDA=ON \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
    -Ccmake.define.DIFFKERN_BUILD_BENCH=ON
fi
if [ "${STATES[-1]}" != ok ] && [ "${STATES[-1]}" != dry-run ]; then
  for s in pytest-cuda memcheck racecheck synccheck bench-cpp selfcheck benchmarks; do
    skip "$s" "build failed (see build.log)"
  done
  summary
fi
# GPU_CHECK_OVERLAY=1 (with GPU_CHECK_WHEEL): the working tree's Python files replace the
# wheel's, for Python-only changes made after the wheel was built (the compiled extension
# stays the wheel's). build.log says which files were copied.
if [ -n "${GPU_CHECK_WHEEL:-}" ] && [ "${GPU_CHECK_OVERLAY:-0}" = 1 ] && [ "$DRY" != 1 ]; then
  SITE=$("$PY" -c "import os, diffkern; print(os.path.dirname(diffkern.__file__))")
  echo "=== overlay: python/diffkern/*.py -> $SITE" >>"$OUT/build.log"
  (cd python/diffkern && find . -name '*.py' -print -exec install -D -m 644 {} "$SITE/{}" \;) \
    >>"$OUT/build.log" 2>&1
fi

# Peers and test-only dependencies the offline machine lacks (POT, OTT-JAX, TFP) travel as
# wheels in .whl/ (bench/README.md); installed before the tests, which compare with POT.
if [ "$DRY" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dk_peers .whl/*.whl \
    >>"$OUT/run.log" 2>&1 && export PYTHONPATH=/tmp/dk_peers${PYTHONPATH:+:$PYTHONPATH}
fi

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${NGPU:-0}" -ge 1 ] || NGPU=1
OT_SWEEP_N=${GPU_CHECK_OT_SWEEP_PROBLEMS:-10000}
OT_SWEEP_S=${GPU_CHECK_OT_SWEEP_SECONDS:-240}
# ot_sweep_cmd WORKERS: the sweep's command line (6b below).
ot_sweep_cmd() {
  echo "$PY" bench/soak_ot.py --device cuda --dtypes float32 --problems "$OT_SWEEP_N" \
    --first "${GPU_CHECK_OT_SWEEP_FIRST:-0}" --workers "$1" --time-budget "$OT_SWEEP_S" \
    --timeout 60 --progress 1000 --out "$RES/ot_sweep" --json "$RES/ot_sweep/report.json" \
    --records "$RES/ot_sweep/records.jsonl" --sinkhorn-cap "${GPU_CHECK_OT_SWEEP_CAP:-2000}"
}
SWEEP_PID=""
if [ "$OT_SWEEP_N" -gt 0 ] && [ "${GPU_CHECK_BENCH_ONLY:-0}" != 1 ] && wanted ot-sweep \
   && [ "${GPU_CHECK_OT_SWEEP_BACKGROUND:-0}" = 1 ] && [ "$NGPU" -ge 2 ] && [ "$DRY" != 1 ]; then
  # The sweep on the last GPU, the rest of the check on the others (see the header).
  mkdir -p "$RES/ot_sweep"
  SWEEP_GPU=$(( NGPU - 1 ))
  SWEEP_T0=$(date +%s)
  echo "=== [$(( SWEEP_T0 - T0 ))s] ot-sweep-cuda (background, GPU $SWEEP_GPU)" | tee -a "$OUT/sweep.log"
  # shellcheck disable=SC2046
  CUDA_VISIBLE_DEVICES=$SWEEP_GPU timeout --kill-after=10 $(( OT_SWEEP_S + 120 )) \
    $(ot_sweep_cmd "${GPU_CHECK_OT_SWEEP_WORKERS:-1}") >>"$OUT/sweep.log" 2>&1 </dev/null &
  SWEEP_PID=$!
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( NGPU - 2 )))
fi

# 2. CUDA tests (the cpu half of the suite runs in CI).
if [ "${GPU_CHECK_BENCH_ONLY:-0}" = 1 ]; then
  skip pytest-cuda "GPU_CHECK_BENCH_ONLY=1"
elif ! wanted tests; then
  skip pytest-cuda "GPU_CHECK_STEPS"
else
  # GPU_CHECK_PYTEST_PATHS (default "tests"): a partial run's test files
  read -r -a PYTEST_PATHS <<<"${GPU_CHECK_PYTEST_PATHS:-tests}"
  step pytest-cuda 300 "$OUT/pytest.log" "$PY" -m pytest -q -m cuda "${PYTEST_PATHS[@]}" -rs
fi

# 3. compute-sanitizer on every family's small workload. No caching allocator under
#    memcheck, so out-of-bounds accesses hit unallocated memory instead of a neighbour's block.
if [ "${GPU_CHECK_BENCH_ONLY:-0}" = 1 ]; then
  skip memcheck "GPU_CHECK_BENCH_ONLY=1"; skip racecheck "GPU_CHECK_BENCH_ONLY=1"
  skip synccheck "GPU_CHECK_BENCH_ONLY=1"
elif ! wanted sanitizer; then
  skip memcheck "GPU_CHECK_STEPS"; skip racecheck "GPU_CHECK_STEPS"; skip synccheck "GPU_CHECK_STEPS"
elif [ -n "$SAN" ] || [ "$DRY" = 1 ]; then
  SAN=${SAN:-compute-sanitizer}
  step memcheck 240 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$PY" scripts/sanitizer_smoke.py
  step racecheck 240 "$OUT/sanitizer.log" \
    "$SAN" --tool racecheck --error-exitcode 1 "$PY" scripts/sanitizer_smoke.py
  # Barrier misuse (a block-wide state one thread writes for the others, e.g. the attention
  # backward's query walk in shared memory).
  step synccheck 240 "$OUT/sanitizer.log" \
    "$SAN" --tool synccheck --error-exitcode 1 "$PY" scripts/sanitizer_smoke.py
else
  skip memcheck "compute-sanitizer not found"; skip racecheck "compute-sanitizer not found"
  skip synccheck "compute-sanitizer not found"
fi

# Which families' benchmarks run (GPU_CHECK_BENCH), and their Python benchmark commands.
if PLAN_TEXT=$(bench_plan 2>>"$OUT/run.log"); then
  mapfile -t PLAN <<<"$PLAN_TEXT"
  SELECTED=" $(printf '%s\n' "${PLAN[@]}" | awk -F'\t' '$1 == "F" {printf "%s ", $2}')"
  echo "=== benchmarks of families:${SELECTED% }"
else
  fail bench-plan "GPU_CHECK_BENCH=$BENCHES, see run.log"
  PLAN=(); SELECTED=" "
fi

# 4. C++ CUDA microbenchmarks: every binary the build made, bench_<family>_cuda.
shopt -s nullglob
CPP=("${GPU_CHECK_BENCH_DIR:-build/gpu/bench/cpp}"/bench_*_cuda)
if [ ${#CPP[@]} -eq 0 ]; then
  skip bench-cpp "none built"
fi
for BENCH in "${CPP[@]}"; do
  FAM=${BENCH##*/bench_}; FAM=${FAM%_cuda}
  if ! wanted bench-cpp; then
    skip "bench-cpp-$FAM" "GPU_CHECK_STEPS"
  elif [ "$BENCHES" = all ] || [[ "$SELECTED" == *" $FAM "* ]]; then
    step "bench-cpp-$FAM" 120 "$OUT/run.log" "$BENCH" --json "$RES/bench_cpp_$FAM.json"
  else
    skip "bench-cpp-$FAM" "GPU_CHECK_BENCH=$BENCHES"
  fi
done

# 5. Self-check of every family, then each family's Python benchmarks against peers.
if wanted selfcheck; then
  step selfcheck 180 "$OUT/run.log" "$PY" -m diffkern --full --json "$RES/selfcheck.json"
else
  skip selfcheck "GPU_CHECK_STEPS"
fi
# 6. Soak on CUDA (issue 9): random problems per public op and the OT sweep (float32 and
#    float64) for GPU_CHECK_SOAK_SECONDS (default 60; 0 skips), each under a wall-clock
#    guard; report.json and any reproducers come back in results.tar.gz.
SOAK_S=${GPU_CHECK_SOAK_SECONDS:-60}
if [ "$SOAK_S" -gt 0 ] && [ "${GPU_CHECK_BENCH_ONLY:-0}" != 1 ] && wanted soak; then
  step soak-cuda $(( SOAK_S + 60 )) "$OUT/run.log" "$PY" scripts/soak.py --device cuda \
    --seconds "$SOAK_S" --out "$RES/soak"
else
  skip soak-cuda "GPU_CHECK_SOAK_SECONDS=$SOAK_S, GPU_CHECK_BENCH_ONLY or GPU_CHECK_STEPS"
fi
# 6b. The OT sweep of issue 9 on CUDA: GPU_CHECK_OT_SWEEP_PROBLEMS (default 10000; 0 skips)
#     random float32 problems, SNS against method="sinkhorn", over GPU_CHECK_OT_SWEEP_WORKERS
#     (default 3 per GPU) processes spread over the visible GPUs (a few per GPU: tiny problems
#     are host-bound, but many contexts time-slicing one GPU make single timings noisy),
#     stopped after GPU_CHECK_OT_SWEEP_SECONDS (default 240; the report says how many were
#     done); every problem's record comes back in ot_sweep/records.jsonl.
if [ -n "$SWEEP_PID" ]; then
  : # running in the background; waited for before the multi-GPU step
elif [ "$OT_SWEEP_N" -gt 0 ] && [ "${GPU_CHECK_BENCH_ONLY:-0}" != 1 ] && wanted ot-sweep; then
  mkdir -p "$RES/ot_sweep"
  # shellcheck disable=SC2046
  step ot-sweep-cuda $(( OT_SWEEP_S + 90 )) "$OUT/run.log" \
    $(ot_sweep_cmd "${GPU_CHECK_OT_SWEEP_WORKERS:-$(( 3 * NGPU ))}")
else
  skip ot-sweep-cuda "GPU_CHECK_OT_SWEEP_PROBLEMS=$OT_SWEEP_N, GPU_CHECK_BENCH_ONLY or GPU_CHECK_STEPS"
fi
# JAX (the TFP and OTT peers) must not grab 75% of the GPU up front: torch shares it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for LINE in "${PLAN[@]}"; do
  IFS=$'\t' read -r KIND FAM NAME LIMIT CMD <<<"$LINE"
  [ "$KIND" = B ] || continue
  if ! wanted benchmarks; then
    skip "$NAME" "GPU_CHECK_STEPS"
    continue
  fi
  eval "ARGV=($CMD)"  # CMD was written by shlex.join from the family's argv list
  EXTRA_VAR="GPU_CHECK_ARGS_${NAME//-/_}"
  EXTRA=()
  [ -n "${!EXTRA_VAR:-}" ] && read -r -a EXTRA <<<"${!EXTRA_VAR}"
  step "$NAME" "$LIMIT" "$OUT/run.log" "$PY" "${ARGV[@]}" "${EXTRA[@]}"
done

# The background sweep ends here, after every single-GPU step (the multi-GPU step needs every
# GPU).
if [ -n "$SWEEP_PID" ]; then
  wait "$SWEEP_PID"
  rc=$?
  state=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="TIMEOUT($(( OT_SWEEP_S + 120 ))s)"
  elif [ $rc -ne 0 ]; then state="FAIL(rc=$rc)"; fi
  echo "=== ot-sweep-cuda (background): $state in $(( $(date +%s) - SWEEP_T0 ))s" | tee -a "$OUT/sweep.log"
  NAMES+=("ot-sweep-cuda"); STATES+=("$state"); SECS+=($(( $(date +%s) - SWEEP_T0 )))
  unset CUDA_VISIBLE_DEVICES
fi
# 6c. Several GPUs (issue 10): ZOSGD with its directions split over one process per GPU
#     (NCCL; NVLink multicast stays off, as the machine's environment sets it): replicas
#     bit-identical to each other and to one GPU running the same seeds, and the speedup.
if ! wanted multi-gpu; then
  skip zo-distributed "GPU_CHECK_STEPS"
elif [ "$NGPU" -lt 2 ]; then
  skip zo-distributed "$NGPU GPU visible"
else
  step zo-distributed 300 "$OUT/run.log" env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    scripts/zo_distributed_check.py --out "$RES/zo_distributed.json"
fi

summary
