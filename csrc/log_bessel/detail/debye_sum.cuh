// The sum of the Debye (uniform asymptotic) expansion and its partial derivatives.
//
// With s = sqrt(v^2 + x^2) and p = v / s, the k-th term of the expansion of I_v(x)
// (sign = +1) or K_v(x) (sign = -1) is sign^k U_k(p) / v^k = sign^k Q_k(p^2) / s^k.
// Writing the sum A(p, s), the derivatives in x and v come from the chain rule on
// (p, s) -- no separate polynomial tables are needed for them.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "log_bessel/debye_tables.h"
#include "log_bessel/detail/numeric.cuh"

namespace diffkern {
namespace log_bessel {

// The tables live once in constant memory for the device and once as constexpr
// arrays for the host; the same code reads whichever its compiler pass can see.
constexpr double kDebyeUHost[] = {DK_DEBYE_U_COEFFS};
constexpr double kDebyeQMaxHost[] = {DK_DEBYE_QMAX};
constexpr double kDebyeUMaxHost[] = {DK_DEBYE_UMAX};
#if defined(__CUDACC__)
static __constant__ double kDebyeUDevice[] = {DK_DEBYE_U_COEFFS};
static __constant__ double kDebyeQMaxDevice[] = {DK_DEBYE_QMAX};
static __constant__ double kDebyeUMaxDevice[] = {DK_DEBYE_UMAX};
#endif
#if defined(__CUDA_ARCH__)
#define DK_DEBYE_TABLE(name) kDebye##name##Device
#else
#define DK_DEBYE_TABLE(name) kDebye##name##Host
#endif

template <class T>
struct DebyeSum {
  T a = T(0);     // A
  T a_p = T(0);   // dA/dp
  T a_s = T(0);   // dA/ds
  T a_pp = T(0);  // second derivatives, only when asked
  T a_ps = T(0);
  T a_ss = T(0);
};

#if !defined(__CUDA_ARCH__)
// Host only, A alone (kDerivs = 0): the same terms and stopping rule as debye_sum below,
// evaluated with short dependency chains. The bounds max|Q_k| / s^k and max|U_k| / v^k
// fall with k for s, v >= 20 (the table ratios max|Q_k+1| / max|Q_k| and
// max|U_k+1| / max|U_k| stay below 9.1), so the first kDebyeHostHead terms are always
// summed (those a point does not need lie below rounding), and the rest only where the
// bound at kDebyeHostHead says so. Each Q_k is an unrolled Horner polynomial (they are
// independent), and the head is summed by pairs in w = sign/s and w^2. The loop below
// is latency-bound on the host: k variable-length Horner chains in a row, a
// data-dependent trip count (mispredicted) and an fmin library call per term.
constexpr int kDebyeHostHead = 8;
static_assert(debye::kNumTerms == 20, "debye_sum_value_host unrolls 20 terms");

template <class T, int N>
inline __attribute__((always_inline)) T power_host(T a) {
  if constexpr (N == 1) return a;
  else if constexpr (N % 2 == 0) { const T h = power_host<T, N / 2>(a); return h * h; }
  else return power_host<T, N - 1>(a) * a;
}

// Q_k(y), Horner unrolled (highest coefficient first, as in debye_sum).
template <class T, int K>
inline __attribute__((always_inline)) T debye_q_host(T y) {
  constexpr int row = K * (K + 1) / 2;
  T q = T(kDebyeUHost[row + K]);
#if !defined(__CUDACC__)  // (nvcc's host pass does not know the pragma)
#pragma GCC unroll 20
#endif
  for (int j = K - 1; j >= 0; --j) q = q * y + T(kDebyeUHost[row + j]);
  return q;
}

template <class T>
inline __attribute__((always_inline)) T debye_sum_value_host(T v, T p, T s, T sign) {
  constexpr int head = kDebyeHostHead;
  const T tol = Precision<T>::eps * T(0.01);
  const T inv_s = T(1) / s;
  const T inv_v = T(1) / v;
  const T y = p * p;
  const T w = sign * inv_s;
  T a = T(0);
  T bound_s = power_host<T, head>(inv_s), bound_v = power_host<T, head>(inv_v);
  if (T(kDebyeQMaxHost[head]) * bound_s >= tol && T(kDebyeUMaxHost[head]) * bound_v >= tol) {
    // Rare (large terms: v and s near 20): n terms in all, k = 0 .. n-1.
    int n = head + 1;
    while (n < debye::kNumTerms) {
      bound_s *= inv_s;
      bound_v *= inv_v;
      const T qb = T(kDebyeQMaxHost[n]) * bound_s, ub = T(kDebyeUMaxHost[n]) * bound_v;
      if ((qb < ub ? qb : ub) < tol) break;
      ++n;
    }
    switch (n) {
#define DK_DEBYE_CASE(k) \
  case k + 1: if (k >= head) a = a * w + debye_q_host<T, k>(y); [[fallthrough]];
      DK_DEBYE_CASE(19) DK_DEBYE_CASE(18) DK_DEBYE_CASE(17) DK_DEBYE_CASE(16)
      DK_DEBYE_CASE(15) DK_DEBYE_CASE(14) DK_DEBYE_CASE(13) DK_DEBYE_CASE(12)
      DK_DEBYE_CASE(11) DK_DEBYE_CASE(10) DK_DEBYE_CASE(9) DK_DEBYE_CASE(8)
      DK_DEBYE_CASE(7) DK_DEBYE_CASE(6) DK_DEBYE_CASE(5)
#undef DK_DEBYE_CASE
      default: break;
    }
  }
  // The head by pairs in w and w^2: a short dependency chain, since the
  // Q_k are independent of each other.
  static_assert(head == 8, "the head is written out for 8 terms");
  const T w2 = w * w, w4 = w2 * w2;
  const T q01 = debye_q_host<T, 0>(y) + w * debye_q_host<T, 1>(y);
  const T q23 = debye_q_host<T, 2>(y) + w * debye_q_host<T, 3>(y);
  const T q45 = debye_q_host<T, 4>(y) + w * debye_q_host<T, 5>(y);
  const T q67 = debye_q_host<T, 6>(y) + w * debye_q_host<T, 7>(y);
  a = (q01 + w2 * q23) + w4 * ((q45 + w2 * q67) + w4 * a);
  return a;
}
#endif

// kDerivs: 0 = A only, 1 = first derivatives, 2 = second derivatives too.
template <class T, int kDerivs>
DK_HOST_DEVICE DebyeSum<T> debye_sum(T v, T p, T s, T sign) {
#if !defined(__CUDA_ARCH__)
  if constexpr (kDerivs == 0) {
    DebyeSum<T> r;
    r.a = debye_sum_value_host(v, p, s, sign);
    return r;
  }
#endif
  const T tol = Precision<T>::eps * T(0.01);
  const T y = p * p;
  const T inv_s = T(1) / s;
  const T inv_v = T(1) / v;
  DebyeSum<T> r;
  T w = T(1);       // sign^k / s^k
  T bound_s = T(1); // 1 / s^k
  T bound_v = T(1); // 1 / v^k
  int row = 0;
  for (int k = 0; k < debye::kNumTerms; ++k) {
    // Q_k(y), Q_k'(y), Q_k''(y) by Horner, highest coefficient first.
    T q = T(0), dq = T(0), ddq = T(0);
    for (int j = k; j >= 0; --j) {
      if (kDerivs >= 2) ddq = ddq * y + T(2) * dq;
      if (kDerivs >= 1) dq = dq * y + q;
      q = q * y + T(DK_DEBYE_TABLE(U)[row + j]);
    }
    row += k + 1;
    const T kk = T(k);
    r.a += w * q;
    if (kDerivs >= 1) {
      r.a_p += w * T(2) * p * dq;
      r.a_s -= kk * w * q * inv_s;
    }
    if (kDerivs >= 2) {
      r.a_pp += w * (T(2) * dq + T(4) * y * ddq);
      r.a_ps -= kk * w * T(2) * p * dq * inv_s;
      r.a_ss += kk * (kk + T(1)) * w * q * inv_s * inv_s;
    }
    w *= sign * inv_s;
    bound_s *= inv_s;
    bound_v *= inv_v;
    if (k + 1 < debye::kNumTerms) {
      const T next = fmin(T(DK_DEBYE_TABLE(QMax)[k + 1]) * bound_s,
                          T(DK_DEBYE_TABLE(UMax)[k + 1]) * bound_v);
      if (next < tol) break;
    }
  }
  return r;
}

}  // namespace log_bessel
}  // namespace diffkern
