// log I_v(x) and log K_v(x) for large x and small orders from Hankel's expansion
// (DLMF 10.40.1-2), with a_k(v) = prod_{j<=k} (4v^2 - (2j-1)^2) / (k! 8^k):
//
//   log I_v(x) =  x - log(2 pi x)/2 + log sum_k (-1)^k a_k(v) / x^k   (+ O(e^-2x))
//   log K_v(x) = -x + log(pi/(2x))/2 + log sum_k a_k(v) / x^k
//
// The series is asymptotic: its terms shrink, reach a minimum, then grow. It is used
// only where the terms fall below rounding before that minimum (checked as it is
// summed: if they turn upward first, the caller falls back to another branch), and
// for I only where e^-2x is far below rounding. Derivatives come from the same terms;
// with the sum S = sum_k c_k / x^k, d/dx log S = -<k> / x and
// d2/dx2 log S = (<k (k+1)> - <k>^2) / x^2 (<f> = sum f c_k / x^k / S), both ~1/x^2 or
// smaller, so d2/dx2 log I = 1/(2 x^2) + d2/dx2 log S carries no cancellation for large x
// (the Bessel equation's form subtracts numbers of size 1 to get ~1/x^2).
#pragma once
#include <cmath>

#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

// Used for x >= kHankelMinX (the minimal term, ~e^-2x, and the neglected e^-2x part of
// I are then below rounding) and x >= v^2 / 2 (terms start shrinking at once).
constexpr double kHankelMinX = 20.0;

template <class T>
DK_HOST_DEVICE bool hankel_applies(T v, T x) {
  return x >= T(kHankelMinX) && T(2) * x >= v * v;
}

#if !defined(__CUDA_ARCH__)
// 1/k, k = 0..60 (host only: the loop below multiplies by it in double).
static constexpr double kHankelInvK[61] = {
    0.0, 1.0 / 1, 1.0 / 2, 1.0 / 3, 1.0 / 4, 1.0 / 5, 1.0 / 6, 1.0 / 7, 1.0 / 8, 1.0 / 9,
    1.0 / 10, 1.0 / 11, 1.0 / 12, 1.0 / 13, 1.0 / 14, 1.0 / 15, 1.0 / 16, 1.0 / 17, 1.0 / 18,
    1.0 / 19, 1.0 / 20, 1.0 / 21, 1.0 / 22, 1.0 / 23, 1.0 / 24, 1.0 / 25, 1.0 / 26, 1.0 / 27,
    1.0 / 28, 1.0 / 29, 1.0 / 30, 1.0 / 31, 1.0 / 32, 1.0 / 33, 1.0 / 34, 1.0 / 35, 1.0 / 36,
    1.0 / 37, 1.0 / 38, 1.0 / 39, 1.0 / 40, 1.0 / 41, 1.0 / 42, 1.0 / 43, 1.0 / 44, 1.0 / 45,
    1.0 / 46, 1.0 / 47, 1.0 / 48, 1.0 / 49, 1.0 / 50, 1.0 / 51, 1.0 / 52, 1.0 / 53, 1.0 / 54,
    1.0 / 55, 1.0 / 56, 1.0 / 57, 1.0 / 58, 1.0 / 59, 1.0 / 60};
#endif

// Returns false (and leaves `out` unspecified) if the series would not converge.
template <class T>
DK_HOST_DEVICE bool log_bessel_hankel(T v, T x, bool is_i, Want want, LogBesselValue<T>& out) {
  const T tol = Precision<T>::eps * T(0.05);
  const T sign = is_i ? T(-1) : T(1);
  const T four_v2 = T(4) * v * v;
  const T inv_8x = T(1) / (T(8) * x);
  T term = T(1);       // sign^k a_k / x^k
  T dterm_dv = T(0);   // its derivative in v
  T sum = T(1), sum_k = T(0), sum_dv = T(0);
  T sum_kk = T(0);  // sum k (k+1) term_k, second derivatives only
  bool converged = false;
  for (int k = 1; k <= 60; ++k) {
    const T odd = T(2 * k - 1);
#if !defined(__CUDA_ARCH__)
    // Host, double: 1/k from a table instead of a divide per term.
    const T c = sizeof(T) == 8
        ? (four_v2 - odd * odd) * (inv_8x * T(kHankelInvK[k])) * sign
        : (four_v2 - odd * odd) * inv_8x / T(k) * sign;
#else
    const T c = (four_v2 - odd * odd) * inv_8x / T(k) * sign;
#endif
    const T previous = term, previous_dv = dterm_dv;
    if (want.dv) dterm_dv = dterm_dv * c + term * (T(8) * v * inv_8x / T(k) * sign);
    term *= c;
    sum += term;
    if (want.dx) sum_k += T(k) * term;
    if (want.dx2) sum_kk += T(k) * T(k + 1) * term;
    if (want.dv) sum_dv += dterm_dv;
    if (std::fabs(term) <= tol * std::fabs(sum) &&
        (!want.dx || std::fabs(T(k) * term) <= tol * (std::fabs(sum_k) + tol)) &&
        (!want.dx2 || std::fabs(T(k) * T(k + 1) * term) <= tol * (std::fabs(sum_kk) + tol)) &&
        (!want.dv || std::fabs(dterm_dv) <= tol * (std::fabs(sum_dv) + tol))) {
      converged = true;
      break;
    }
    // At half-odd-integer v the series terminates (a factor 4v^2 - (2k-1)^2 is 0), but
    // its derivative in v does not: then only the derivative terms go on.
    if (term == T(0) && !want.dv) {
      converged = true;
      break;
    }
    if (T(2 * k + 1) > T(2) * v &&
        (std::fabs(term) > std::fabs(previous) ||
         (want.dv && k > 1 && std::fabs(dterm_dv) > std::fabs(previous_dv)))) {
      break;  // diverging before reaching rounding level: the caller falls back
    }
  }
  if (!converged) return false;
  const double xd = x;
  // x and log x are assembled in double for float inputs too (they nearly cancel in
  // the scaled forms' neighbours; a couple of double operations).
  // In double, log(sum / sqrt(x)) is one log instead of two.
  const double log_sum_over_root_x =
      sizeof(T) == 8 ? std::log(double(sum) / std::sqrt(xd))
                     : double(std::log(sum)) - 0.5 * std::log(xd);
  if (is_i) {
    const double base = -Precision<double>::half_log_two_pi + log_sum_over_root_x;
    out.log_value = T(want.scaled ? base : xd + base);
  } else {
    const double base = 0.5 * Precision<double>::log_pi_over_two + log_sum_over_root_x;
    out.log_value = T(want.scaled ? base : base - xd);
  }
  if (want.dx) {
    const T dlog_sum_dx = -sum_k / (sum * x);
    const T half_over_x = T(0.5) / x;
    if (is_i) {
      out.ratio = T(1) - (half_over_x + v / x) + dlog_sum_dx;
      out.dlog_dx = T(1) - half_over_x + dlog_sum_dx;
    } else {
      out.dlog_dx = T(-1) - half_over_x + dlog_sum_dx;
    }
  }
  if (want.dv) out.dlog_dv = sum_dv / sum;
  if (want.dx2) {
    const T mean_k = sum_k / sum;
    const T d2_log_sum = (sum_kk / sum - mean_k * mean_k) / x / x;
    const T half_over_x2 = T(0.5) / x / x;
    out.d2log_dx2 = half_over_x2 + d2_log_sum;
    if (is_i) out.ratio_dx = (v + T(0.5)) / x / x + d2_log_sum;  // d2/dx2 log I + v / x^2
  }
  return true;
}

}  // namespace log_bessel
}  // namespace diffkern
