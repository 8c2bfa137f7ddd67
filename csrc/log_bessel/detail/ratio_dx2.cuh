// The second x-derivative of the ratio R = I_{v+1}(x) / I_v(x), for autograd's double
// backward of d/dx R (so the second derivative of bessel_iv_ratio), from each branch's own
// sums. The Bessel equation's form R'' = (2v+1) (R/x - R') / x - 2 R R' cancels: for
// small x its terms are ~1 and R'' ~ x (all digits gone below x ~ 1e-8, NaN below
// ~1e-154), for large x they are ~1/x^2 and R'' ~ 1/x^3. In double only (as the other
// second-derivative ops).
//
// Series (v < 20, x <= 4). With q = x^2/4, u_k = t_k / q as in series.cuh,
// D = 1 + sum_{k>=1} q u_k (= sum_k t_k) and N = sum_{k>=1} k u_k, R = sqrt(q) g(q),
// g = N / D. Since d/dx = sqrt(q) d/dq,
//   R'' = sqrt(q) (3 g'/2 + q g''),
//   g' = N1/D - (N/D)^2,  g'' = N2/D - 3 (N/D)(N1/D) + 2 (N/D)^3,
// with dD/dq = N, N1 = dN/dq = sum_{k>=1} k u_k / (v+k+1) and
// N2 = d2N/dq2 = sum_{k>=1} k u_k / ((v+k+1)(v+k+2)) (u_{k+1}/q and u_{k+2}/q^2 written
// through u_k, so nothing is divided by q, which underflows below x ~ 1e-154). g' and g''
// are cumulant-like: for small q their terms cancel to about 1/(v+2) and 1/(v+3) of their
// size (a few digits below order 20; from order 20 on Debye serves), and for large q
// 3g'/2 + q g'' ~ q^-2 is left of terms ~q^-1: measured against mpmath, 6e-15 at x <= 4
// but 1e-13 at x = 10 and 1e-10 at x = 35, so the series stops at x = 4.
//
// Hankel (x >= 30, x >= v^2/2): with S = sum_k c_k x^-k and m_j the means of k, k(k+1),
// k(k+1)(k+2) under the weights c_k x^-k / S,
//   R = 1 - (v + 1/2)/x + (log S)',   R'' = (-(2v+1) - m_3 + 3 m_1 m_2 - 2 m_1^3) / x^3,
// where the m_j are ~v^2/x or smaller: no cancellation.
//
// Debye (v >= 20): the sum A = sum_k sign^k U_k(p) / v^k depends on x only through
// p = v/s (s = sqrt(v^2+x^2)), so with P_m = p^m A^(m)(p) / A (from the U_k's coefficients
// times falling factorials of their exponents) and a_m = p^(m)(x) / p,
//   a_1 = -c/s,  a_2 = (2c^2 - p^2)/s^2,  a_3 = c (9p^2 - 6c^2)/s^3,  c = x/s,
//   (log A)'   = P_1 a_1,
//   (log A)''  = (P_2 - P_1^2) a_1^2 + P_1 a_2,
//   (log A)''' = (P_3 - 3 P_1 P_2 + 2 P_1^3) a_1^3 + 3 (P_2 - P_1^2) a_1 a_2 + P_1 a_3,
// and R = x/(s+v) - x/(2s^2) + (log A)' gives
//   R'  = p / (s (1+p)) - (p^2 - c^2) / (2 s^2) + (log A)'',
//   R'' = -p c (2+p) / (s^2 (1+p)^2) + c (3p^2 - c^2) / s^3 + (log A)''',
// whose leading terms have one sign at both ends (x << v and x >> v).
//
// Shifted order (v < 20, x > 4, no Hankel): Debye at mu = v + n >= 20, then the backward
// recurrence r_k = 1 / (a_k + r_{k+1}), a_k = 2 (v+k+1) / x, differentiated twice:
//   r_k'  = (a_k / x - r_{k+1}') r_k^2,
//   r_k'' = -(2 a_k / x^2 + r_{k+1}'') r_k^2 + 2 r_k'^2 / r_k
// (errors in r_{k+1}'' are multiplied by r_k^2 < 1: they do not grow; measured <= 2e-14
// from x = 3 on, but 1e-9 at x = 0.01 with v near 20, where 2 r_k'^2 / r_k cancels).
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "log_bessel/detail/debye_sum.cuh"
#include "log_bessel/detail/hankel.cuh"
#include "log_bessel/detail/numeric.cuh"

namespace diffkern {
namespace log_bessel {

// The series serves the second-derivative ops of I below order 20 up to x = 4 only (this
// one, and through log_iv_for_second in log_bessel_math.cuh d/dx R and d2/dx2 log I, whose
// sums cancel the same way for large q: 1.8e-12 and 1.2e-11 at x ~ 32-34); above, the
// shifted-order recurrence.
constexpr double kSecondSeriesMaxX = 4.0;
// Hankel's expansion leaves out the e^-2x part of I, ~8 x^3 e^-2x relative to R'' ~ 1/x^3
// (1.4e-13 at x = 20): for R'' it starts at x = 30 (the shifted order serves below).
constexpr double kRatioDx2HankelMinX = 30.0;

// v >= 0, 0 < x <= kSecondSeriesMaxX.
DK_HOST_DEVICE_LARGE double series_ratio_dx2(double v, double x) {
  const double tol = Precision<double>::eps * 0.05;
  const double q = 0.25 * x * x;
  double u = 1.0 / (v + 1.0);  // u_1
  double sum = 0.0, n0 = 0.0, n1 = 0.0, n2 = 0.0;
  for (int k = 1; k < 400; ++k) {
    const double a1 = v + double(k + 1);
    const double ku = double(k) * u;
    sum += u * q;
    n0 += ku;
    const double ku_a1 = ku / a1;
    n1 += ku_a1;
    n2 += ku_a1 / (a1 + 1.0);
    // As in log_iv_series: stop once the next terms cannot matter. N1's and N2's weights
    // fall with k, so their tails are (relatively) below N's.
    const double next_ratio = q / (double(k + 1) * a1);
    if (next_ratio < 1.0 && u * q * next_ratio <= tol * (1.0 + sum) &&
        double(k + 1) * u * next_ratio <= tol * n0) {
      break;
    }
    u *= next_ratio;
  }
  const double d = 1.0 + sum;
  const double g0 = n0 / d, g1 = n1 / d, g2 = n2 / d;
  const double dg = g1 - g0 * g0;
  const double ddg = g2 - g0 * (3.0 * g1 - 2.0 * g0 * g0);
  return 0.5 * x * (1.5 * dg + q * ddg);
}

// Hankel's expansion for I (x >= kRatioDx2HankelMinX, 2x >= v^2). Returns false if its terms turn
// upward before they fall below rounding (the caller then uses another branch).
DK_HOST_DEVICE_LARGE bool hankel_ratio_dx2(double v, double x, double& out) {
  const double tol = Precision<double>::eps * 0.05;
  const double four_v2 = 4.0 * v * v;
  const double inv_8x = 1.0 / (8.0 * x);
  double term = 1.0, sum = 1.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (int k = 1; k <= 60; ++k) {
    const double odd = double(2 * k - 1);
    const double previous = term;
    term *= -(four_v2 - odd * odd) * inv_8x / double(k);
    const double kk = double(k);
    sum += term;
    s1 += kk * term;
    s2 += kk * (kk + 1.0) * term;
    s3 += kk * (kk + 1.0) * (kk + 2.0) * term;
    const double t3 = std::fabs(kk * (kk + 1.0) * (kk + 2.0) * term);
    if (term == 0.0 || (std::fabs(term) <= tol * std::fabs(sum) &&
                        std::fabs(kk * term) <= tol * (std::fabs(s1) + tol) &&
                        t3 <= tol * (std::fabs(s3) + tol))) {
      const double m1 = s1 / sum, m2 = s2 / sum, m3 = s3 / sum;
      // (In this order: x^3 would overflow for x past ~5e102.)
      out = ((-(2.0 * v + 1.0) - m3 + m1 * (3.0 * m2 - 2.0 * m1 * m1)) / x) / x / x;
      return true;
    }
    if (double(2 * k + 1) > 2.0 * v && std::fabs(term) > std::fabs(previous)) return false;
  }
  return false;
}

// R, R' and R'' at v >= kDebyeMinOrder (any x > 0), from the Debye expansion.
DK_HOST_DEVICE_LARGE void debye_ratio_derivatives(double v, double x, double& r, double& r1,
                                                  double& r2) {
  const double s = hypot_fast(v, x);
  const double p = v / s, c = x / s, y = p * p;
  const double inv_s = 1.0 / s, inv_v = 1.0 / v;
  const double tol = Precision<double>::eps * 0.01;
  // b_m = sum_k s^-k sum_j c_kj (k+2j)_m y^j = p^m A^(m)(p), A^(m) at fixed v
  // (U_k(p) / v^k = Q_k(p^2) / s^k).
  double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0;
  double w = 1.0, bound_s = 1.0, bound_v = 1.0;
  int row = 0;
  for (int k = 0; k < debye::kNumTerms; ++k) {
    double q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0;
    for (int j = k; j >= 0; --j) {
      const double coef = DK_DEBYE_TABLE(U)[row + j];
      const double e = double(k + 2 * j);
      const double ce1 = coef * e, ce2 = ce1 * (e - 1.0);
      q0 = q0 * y + coef;
      q1 = q1 * y + ce1;
      q2 = q2 * y + ce2;
      q3 = q3 * y + ce2 * (e - 2.0);
    }
    row += k + 1;
    b0 += w * q0;
    b1 += w * q1;
    b2 += w * q2;
    b3 += w * q3;
    w *= inv_s;  // (I: sign +1)
    bound_s *= inv_s;
    bound_v *= inv_v;
    if (k + 1 < debye::kNumTerms) {
      const double next = fmin(DK_DEBYE_TABLE(QMax)[k + 1] * bound_s,
                               DK_DEBYE_TABLE(UMax)[k + 1] * bound_v);
      if (next < tol) break;
    }
  }
  const double p1 = b1 / b0, p2 = b2 / b0, p3 = b3 / b0;
  // a_m = (d^m p / dx^m) / p, each formed without s^2 or s^3 (no overflow).
  const double c_s = c * inv_s;
  const double a1 = -c_s;
  const double a2 = (2.0 * c * c - y) * inv_s * inv_s;
  const double a3 = c_s * (9.0 * y - 6.0 * c * c) * inv_s * inv_s;
  const double k2 = p2 - p1 * p1;
  const double log_a1 = p1 * a1;
  const double log_a2 = k2 * a1 * a1 + p1 * a2;
  const double log_a3 = (p3 - p1 * (3.0 * p2 - 2.0 * p1 * p1)) * a1 * a1 * a1 +
                        3.0 * k2 * a1 * a2 + p1 * a3;
  const double p_s = p * inv_s;
  // x / (s + v); past s ~ 1e150 as c / (1 + p), since s + v can overflow.
  r = (s < 1e150 ? x / (s + v) : c / (1.0 + p)) - 0.5 * c_s + log_a1;
  r1 = p_s / (1.0 + p) - 0.5 * (y - c * c) * inv_s * inv_s + log_a2;
  r2 = -p_s * c_s * (2.0 + p) / ((1.0 + p) * (1.0 + p)) +
       c_s * (3.0 * y - c * c) * inv_s * inv_s + log_a3;
}

// v < kDebyeMinOrder, x > kSecondSeriesMaxX.
DK_HOST_DEVICE_LARGE double shifted_order_ratio_dx2(double v, double x) {
  const int n = static_cast<int>(std::ceil(kDebyeMinOrder - v));
  double r, r1, r2;
  debye_ratio_derivatives(v + double(n), x, r, r1, r2);
  const double inv_x = 1.0 / x;
  for (int k = n - 1; k >= 0; --k) {
    const double a = 2.0 * (v + double(k + 1)) * inv_x;
    const double r_new = 1.0 / (a + r);
    const double r1_new = (a * inv_x - r1) * r_new * r_new;
    r2 = -(2.0 * a * inv_x * inv_x + r2) * r_new * r_new + 2.0 * r1_new * r1_new / r_new;
    r1 = r1_new;
    r = r_new;
  }
  return r2;
}

// d2/dx2 (I_{v+1}(x) / I_v(x)) for v >= 0 (NaN for other v) and x >= 0, with its limits:
// 0 at x = 0 (R is odd in x), at x = inf and at v = inf.
DK_HOST_DEVICE_LARGE double iv_ratio_dx2(double v, double x) {
  if (std::isnan(v) || std::isnan(x) || x < 0.0 || v < 0.0 || (std::isinf(v) && std::isinf(x))) {
    return quiet_nan<double>();
  }
  if (x == 0.0 || std::isinf(x) || std::isinf(v)) return 0.0;
  if (v >= kDebyeMinOrder) {
    double r, r1, r2;
    debye_ratio_derivatives(v, x, r, r1, r2);
    return r2;
  }
  if (x <= kSecondSeriesMaxX) return series_ratio_dx2(v, x);
  double out;
  if (x >= kRatioDx2HankelMinX && hankel_applies(v, x) && hankel_ratio_dx2(v, x, out)) {
    return out;
  }
  return shifted_order_ratio_dx2(v, x);
}

}  // namespace log_bessel
}  // namespace diffkern
