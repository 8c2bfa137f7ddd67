// log I_v(x) for small orders (v < kDebyeMinOrder) outside the series range: evaluate
// the Debye expansion at mu = v + n >= kDebyeMinOrder, then step the ratio
// r_k = I_{v+k+1}(x) / I_{v+k}(x) down with the backward recurrence
//
//   1 / r_k = 2 (v + k + 1) / x + r_{k+1},     k = n-1, ..., 0,
//
// which only adds positive numbers (stable, and errors in r_n shrink as they go).
// Then log I_v = log I_mu - log(r_0 r_1 ... r_{n-1}) and I_{v+1}/I_v = r_0.
// For d/dv each r_k carries its derivative: r_k' = -(2/x + r_{k+1}') r_k^2; for d/dx,
// r_k' = (2 (v+k+1) / x^2 - r_{k+1}') r_k^2, where r_{k+1}' ~ (2 (v+k+1) + 1) / (2 x^2)
// is at most about half the first term (x > 35 here; from x = 4 on for the second-derivative
// ops, see log_iv_for_second): errors do not grow.
#pragma once
#include <cmath>

#include "log_bessel/detail/debye.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_iv_shifted_order(T v, T x, Want want) {
  const int n = static_cast<int>(std::ceil(T(kDebyeMinOrder) - v));
  const T mu = v + T(n);
  Want at_mu = want;
  at_mu.dx = true;  // the recurrence starts from the ratio at mu
  DebyeResult<T> top = want.dv || want.dx2 ? log_bessel_debye<T, 2>(mu, x, true, at_mu)
                                           : log_bessel_debye<T, 1>(mu, x, true, at_mu);
  T r = top.value.ratio;
  T dr = want.dv ? top.ratio_dv : T(0);
  T dr_dx = want.dx2 ? top.value.ratio_dx : T(0);
  const T inv_x2 = T(1) / x / x;
  T product = T(1);
  T sum_dlog_r = T(0);
  const T two_over_x = T(2) / x;
  for (int k = n - 1; k >= 0; --k) {
    const T r_next = T(1) / (two_over_x * (v + T(k + 1)) + r);
    if (want.dv) {
      dr = -(two_over_x + dr) * r_next * r_next;
      sum_dlog_r += dr / r_next;
    }
    if (want.dx2) dr_dx = (T(2) * (v + T(k + 1)) * inv_x2 - dr_dx) * r_next * r_next;
    r = r_next;
    product *= r;
  }
  LogBesselValue<T> out;
  out.log_value = top.value.log_value - std::log(product);
  out.ratio = r;
  out.dlog_dx = r + v / x;
  out.dlog_dv = top.value.dlog_dv - sum_dlog_r;
  if (want.dx2) {
    out.ratio_dx = dr_dx;
    out.d2log_dx2 = dr_dx - v * inv_x2;
  }
  return out;
}

}  // namespace log_bessel
}  // namespace diffkern
