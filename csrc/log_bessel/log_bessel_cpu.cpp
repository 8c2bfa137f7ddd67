// CPU kernels of the log-Bessel family: one OpenMP loop over output elements.
#include <cstdint>

#include "log_bessel/log_bessel.h"
#include "log_bessel/log_bessel_math.cuh"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace diffkern {
namespace {

// kContiguous: inputs laid out like the output, no per-element offset arithmetic.
template <class T, bool kContiguous>
void run(LogBesselOp op, const T* v, const T* x, T* out, const BinaryBroadcast& g,
         int num_threads) {
  const int64_t n = g.numel();
#if defined(_OPENMP)
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  // Elements cost from ~50 ns to a few us depending on the branch: dynamic chunks
  // keep threads busy when one region is expensive.
#pragma omp parallel for schedule(dynamic, 1024) num_threads(num_threads) if (n > 2048)
#endif
  for (int64_t i = 0; i < n; ++i) {
    int64_t v_off = i, x_off = i;
    if (!kContiguous) g.offsets(i, v_off, x_off);
    out[i] = log_bessel::evaluate<T>(op, v[v_off], x[x_off]);
  }
}

}  // namespace

Status log_bessel_cpu(LogBesselOp op, DType dtype, const void* v, const void* x, void* out,
                      const BinaryBroadcast& geometry, int num_threads) {
  if (static_cast<int>(op) < 0 || static_cast<int>(op) >= kNumLogBesselOps) {
    return Status::invalid_argument;
  }
  if (geometry.numel() == 0) return Status::ok;
  if (v == nullptr || x == nullptr || out == nullptr) return Status::invalid_argument;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* vp = static_cast<const T*>(v);
    const auto* xp = static_cast<const T*>(x);
    auto* op_out = static_cast<T*>(out);
    if (geometry.inputs_match_output()) {
      run<T, true>(op, vp, xp, op_out, geometry, num_threads);
    } else {
      run<T, false>(op, vp, xp, op_out, geometry, num_threads);
    }
    return 0;
  });
  return Status::ok;
}

}  // namespace diffkern
