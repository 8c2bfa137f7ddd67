// The CPU inner loop of every Sinkhorn sweep: L = LSE_k(log_plan(own, other_k, M_k)) over
// one row, in two vectorizable passes (values + max, then sum of exp) instead of the
// branchy running form. exp is our own polynomial: libm's exp is a scalar call the
// compiler cannot vectorize without -ffast-math, which would also break the -inf
// potentials of zero-mass entries.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sinkhorn/sinkhorn_math.cuh"

namespace diffkern {
namespace sinkhorn_detail {

// exp(x) for x <= 0, relative error ~2e-16 (degree-12 Taylor on |r| <= ln2/2 after
// x = k ln2 + r). Inputs below -700 (including -inf) give ~1e-304: against the row's largest
// term, which is 1, that is an exact zero at double precision.
inline double exp_nonpositive(double x) {
  x = x < -700.0 ? -700.0 : x;
  const double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double t = x * 1.4426950408889634 + kShift;
  const double kf = t - kShift;
  double r = x - kf * 0.6931471805599453;    // ln2, high part (exact product for |k| < 2^11)
  r = r - kf * 2.3190468138462996e-17;      // ln2, low part
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);                     // low bits hold k
  const int64_t scale_bits = (bits + 1023) << 52;         // 2^k, k in [-1010, 0]
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// `buf` has room for K doubles.
template <class T>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
double row_lse(const T* row, const double* other, double own, int64_t K, double inv_eps,
               double* buf) {
  double mx = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    const double x = log_plan(own, other[k], static_cast<double>(row[k]), inv_eps);
    buf[k] = x;
    mx = x > mx ? x : mx;
  }
  if (mx == -INFINITY) {
    // Every term -inf (zero mass), or NaN (which `x > mx` skipped): NaN must come out.
    for (int64_t k = 0; k < K; ++k)
      if (buf[k] != buf[k]) return buf[k];
    return -INFINITY;
  }
  double s = 0;  // a NaN term after a finite maximum makes s NaN by itself
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += exp_nonpositive(buf[k] - mx);
  return mx + std::log(s);
}

}  // namespace sinkhorn_detail
}  // namespace diffkern
