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

// kDerivs: 0 = A only, 1 = first derivatives, 2 = second derivatives too.
template <class T, int kDerivs>
DK_HOST_DEVICE DebyeSum<T> debye_sum(T v, T p, T s, T sign) {
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
