// log I_v(x) from the power series, for small orders or small x:
//
//   I_v(x) = (x/2)^v / Gamma(v+1) * sum_k t_k,   t_0 = 1,  t_k = t_{k-1} q / (k (v + k)),
//   q = x^2 / 4.
//
// All terms are positive, so the sum is accurate to a few roundings; the log is
// taken of the prefactor analytically. Derivatives follow from the same terms:
//   d/dx log I = (v + 2 sum k t_k / sum t_k) / x,
//   d/dv log I = log(x/2) - psi(v+1) - sum t_k H_k / sum t_k,  H_k = sum_{j<=k} 1/(v+j).
// With M and V the mean and variance of k under the weights t_k, I_{v+1}/I_v = 2 M / x
// and its derivative is 2 (2 V - M) / x^2 (dt_k/dx = 2 k t_k / x): for small x this is
// ~ 1 / (2 (v+1)) with no cancellation, where the Bessel equation's form
// 1 - (2v+1) R / x - R^2 subtracts numbers of size 1 (and is 0/0 at x = 0).
#pragma once
#include <cmath>

#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

// Branch limits, chosen by measured error (bench/NOTES-log_bessel.md):
//  - below order 20 the series serves every x up to 35 (at most ~70 terms); beyond it
//    the shifted-order branch is accurate, below it that branch would subtract two
//    logs of size ~v log(v/x);
//  - from order 20 on the Debye branch is accurate everywhere, and the series is kept
//    only for small q / (v+1), where it needs fewer than ~10 terms.
constexpr double kSeriesMaxXSmallOrder = 35.0;
constexpr double kSeriesMaxQOverV = 0.05;

template <class T>
DK_HOST_DEVICE bool series_applies(T v, T x) {
  if (v < T(kDebyeMinOrder)) return x <= T(kSeriesMaxXSmallOrder);
  return x * x <= T(4 * kSeriesMaxQOverV) * (v + T(1));
}

// (x/2)^v / Gamma(v+1) as a number, when it and its factors are normal numbers. Then
// the log of the whole product is taken once: pow and Gamma are accurate to a few ulps,
// so the log has an absolute error of a few ulps even where v log(x/2) and
// log Gamma(v+1) nearly cancel (around x ~ 2v/e). Returns false when out of range.
template <class T>
DK_HOST_DEVICE bool series_prefactor_linear(T v, T x, T log_half_x, T& prefactor) {
  // Gamma(v+1) < e^43 below order 20, so |v log(x/2)| < max_exponent keeps the power,
  // the quotient and its product with the sum (< e^35) normal (double: e^+-708,
  // float: e^+-87).
  // For x <= 2 both logs have one sign (log Gamma(v+1) >= -0.13), so the cheaper log
  // form cannot cancel there; pow and tgamma are only paid for x > 2.
  const T max_exponent = T(sizeof(T) == 8 ? 600 : 40);
  if (!(v < T(kDebyeMinOrder) && x > T(2) && v * log_half_x < max_exponent)) return false;
#if !defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8) {
    prefactor = v == T(0) ? T(1) : std::pow(T(0.5) * x, v) * inv_gamma_1p_host(v);
    return true;
  }
#endif
  // Gamma(v+1) as v Gamma(v): v + 1 would be rounded (badly so in float). Below
  // v = 1e-300 (1e-30 in float) Gamma(v) = 1/v overflows (it made log I_v(27) -inf on the
  // GPU at every subnormal double order; found by scripts/soak.py on CUDA), and there
  // Gamma(v+1) = 1 - 0.577 v rounds to 1.
  const T v_gamma_v = v < T(sizeof(T) == 8 ? 1e-300 : 1e-30) ? T(1) : v * gamma_function(v);
  prefactor = v == T(0) ? T(1) : std::pow(T(0.5) * x, v) / v_gamma_v;
  return true;
}

// log((x/2)^v / Gamma(v+1)) from logs, where the two terms differ by far; in double for
// float inputs all the same (two double operations).
template <class T>
DK_HOST_DEVICE T series_log_prefactor(T v, T log_half_x) {
  if (v == T(0)) return T(0);
  const double vd = v;
  if (vd > 1e300) {
    // Past ~1e305 both terms overflow (inf - inf); with Stirling's log Gamma(z), z = v+1,
    // the difference is v log(x / (2z)) - log(z)/2 + z - log(2 pi)/2 (- O(1/z)).
    const double z = vd + 1.0;
    return T(vd * (double(log_half_x) - std::log(z)) - 0.5 * std::log(z) + z -
             Precision<double>::half_log_two_pi);
  }
  return T(vd * double(log_half_x) - (vd >= 20.0 ? log_gamma_large(vd + 1.0)
                                                 : log_gamma(vd + 1.0)));
}

// v >= 0, x > 0 finite.
template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_iv_series(T v, T x, Want want) {
  const T eps = Precision<T>::eps;
  const T q = T(0.25) * x * x;
  // Terms are kept divided by q so that x^2 may underflow without losing the ratio:
  // u_k = t_k / q.
  T u = T(1) / (v + T(1));  // u_1
  T sum = T(0);             // sum_{k>=1} t_k
  T sum_k_u = T(0);         // sum_{k>=1} k u_k
  T sum_k2_u = T(0);        // sum_{k>=1} k^2 u_k (second derivatives only)
  T sum_h = T(0);           // sum_{k>=1} t_k H_k
  T harmonic = T(0);        // H_k
#if !defined(__CUDA_ARCH__)
  const bool paired = sizeof(T) == 8 && !want.dx && !want.dx2 && !want.dv && x > T(2) && v < T(kDebyeMinOrder);
  if (paired) {
    // Host, double, value, 2 < x <= 35 (30-70 terms, q > 1): two terms per divide.
    // u_{k+2} = u_k q (q / (a_{k+1} a_{k+2})), a_j = j (v + j), and t_{k+1} = u_{k+2} a_{k+2}:
    // as many roundings per term as one at a time, but half the divides (the loop was
    // bound by their throughput) and half the multiplies on the chain in u.
    const T tol = eps * T(0.05);
    for (int k = 1; k < 400; k += 2) {
      const T a1 = T(k + 1) * (v + T(k + 1)), a2 = T(k + 2) * (v + T(k + 2));
      const T u2 = u * (q * (q / (a1 * a2)));
      sum += u * q + u2 * a2;
      if (q < a2 && u2 * q <= tol * (T(1) + sum)) break;
      u = u2;
    }
  } else {
#endif
  for (int k = 1; k < 400; ++k) {
    const T t = u * q;
    sum += t;
    if (want.dx) sum_k_u += T(k) * u;
    if (want.dx2) sum_k2_u += T(k) * T(k) * u;
    if (want.dv) {
      harmonic += T(1) / (v + T(k));
      sum_h += t * harmonic;
    }
    // Terms decrease once q < k (v + k); stop when the next cannot matter to any of
    // the sums asked for (each relative to its own size: for tiny x the derivative
    // sums are much smaller than the value's sum 1 + S).
    const T next_ratio = q / (T(k + 1) * (v + T(k + 1)));
    const T tol = eps * T(0.05);
    if (next_ratio < T(1) && t * next_ratio <= tol * (T(1) + sum) &&
        (!want.dx || T(k + 1) * u * next_ratio <= tol * sum_k_u) &&
        (!want.dx2 || T(k + 1) * T(k + 1) * u * next_ratio <= tol * sum_k2_u) &&
        (!want.dv || t * next_ratio * (harmonic + T(1) / (v + T(k + 1))) <= tol * sum_h)) {
      break;
    }
    u *= next_ratio;
  }
#if !defined(__CUDA_ARCH__)
  }
#endif
#if !defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8) {
    // Host, double, v >= 20 (x^2 <= 0.2 (v+1)), value (and d/dx): with Stirling's series
    // for log Gamma(z), z = v + 1, the prefactor and log1p(S) take two logs instead of
    // three: v log(x / (2z)) + log((1+S) / sqrt z) + z - log(2 pi)/2 - series(1/z).
    // x / (2z) < 0.05, where it is a normal number; the result (< -40) carries no
    // cancellation.
    const T z = v + T(1), rz = T(1) / z;
    const T half_x_over_z = x * (T(0.5) * rz);
    if (!want.dv && !want.dx2 && v >= T(kDebyeMinOrder) && half_x_over_z > T(1e-300)) {
      const T r2 = rz * rz;
      const T series =
          rz * (T(1.0 / 12) - r2 * (T(1.0 / 360) - r2 * (T(1.0 / 1260) - r2 * (T(1.0 / 1680) -
          r2 * T(1.0 / 1188)))));
      const T tail = z - Precision<T>::half_log_two_pi - series;
      LogBesselValue<T> r;
      r.log_value = v * std::log(half_x_over_z) +
                    (std::log((T(1) + sum) / std::sqrt(z)) + (want.scaled ? tail - x : tail));
      if (want.dx) {
        r.ratio = x * sum_k_u / (T(2) * (T(1) + sum));
        r.dlog_dx = v / x + r.ratio;
      }
      return r;
    }
  }
#endif
  const T log_half_x = std::log(x) - Precision<T>::ln2;  // x/2 would lose a bit if subnormal
  LogBesselValue<T> r;
  T prefactor;
  if (series_prefactor_linear(v, x, log_half_x, prefactor)) {
    // One log of the product; the scaled form multiplies by e^-x instead of subtracting
    // x from a log of similar size.
    r.log_value = std::log(prefactor * (T(1) + sum) * (want.scaled ? std::exp(-x) : T(1)));
  } else {
    r.log_value = series_log_prefactor(v, log_half_x) + std::log1p(sum);
    if (want.scaled) r.log_value -= x;
  }
  if (want.dx) {
    // ratio = 2 sum k t_k / (x sum t) = (x/2) sum k u_k / (1 + sum)
    r.ratio = x * sum_k_u / (T(2) * (T(1) + sum));
    r.dlog_dx = v / x + r.ratio;
  }
  if (want.dv) r.dlog_dv = log_half_x - digamma_ge1(v + T(1)) - sum_h / (T(1) + sum);
  if (want.dx2) {
    // 2 (2V - M) / x^2 = (2 <k^2>_u - <k>_u - 2 q <k>_u^2) / 2, <.>_u = sum . u_k / (1+S):
    // q = x^2/4 cancels against 1/x^2 before anything can underflow.
    const T total = T(1) + sum;
    const T m1 = sum_k_u / total, m2 = sum_k2_u / total;
    r.ratio_dx = T(0.5) * ((T(2) * m2 - m1) - T(2) * q * m1 * m1);
    r.d2log_dx2 = r.ratio_dx - v / x / x;
  }
  return r;
}

}  // namespace log_bessel
}  // namespace diffkern
