// log K_v(x) for small orders (v < kDebyeMinOrder) from the integral
//
//   K_v(x) = int_0^inf exp(-g(t)) dt,   g(t) = x cosh t - log cosh(v t),
//
// by the trapezoid rule on nodes t_j = j h. The integrand is even, smooth and decays
// double-exponentially, and for such integrands the rule converges geometrically in
// 1/h (error about exp(-2 pi d / h), d the half-width of the strip of analyticity):
// a fixed h near 0.25 gives double precision. The nodes are summed outward from the
// peak of the integrand until the terms no longer matter, with weights
// exp(-(g(t_j) - g(t_c))) formed from differences that never cancel badly. The
// derivatives are weighted means over the same nodes:
//   d/dx log K = -<cosh t>,   d/dv log K = <t tanh(v t)>.
#pragma once
#include <cmath>

#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

// x * sinh(a) or x * cosh(a) for a >= 0 without overflow when x is tiny and a large.
template <class T>
DK_HOST_DEVICE T x_times_hyperbolic(T x, T log_x, T a, bool is_cosh) {
  const T big = T(sizeof(T) == 8 ? 700 : 85);
  if (a < big) return x * (is_cosh ? std::cosh(a) : std::sinh(a));
  return T(0.5) * std::exp(log_x + a);
}

// log cosh(y) for y >= 0.
template <class T>
DK_HOST_DEVICE T log_cosh(T y) {
  return y + std::log1p(std::exp(T(-2) * y)) - Precision<T>::ln2;
}

// 0 <= v, x > 0 finite.
template <class T>
DK_HOST_DEVICE_LARGE LogBesselValue<T> log_kv_trapezoid(T v, T x, Want want) {
  const T log_x = std::log(x);
  // Centre: the peak of the integrand, at 0 when v^2 <= x (then g' >= (x - v^2) t >= 0),
  // else near asinh(v/x); a few Newton steps on g'(t) = x sinh t - v tanh(v t).
  T tc = T(0);
  if (v * v > x) {
    tc = asinh_ratio(v, x);
    for (int it = 0; it < 4; ++it) {
      const T th = std::tanh(v * tc);
      const T g1 = x_times_hyperbolic(x, log_x, tc, false) - v * th;
      const T g2 = x_times_hyperbolic(x, log_x, tc, true) - v * v * (T(1) - th * th);
      if (!(g2 > T(0))) break;
      const T next = tc - g1 / g2;
      if (!(next > T(0)) || !std::isfinite(next)) break;
      tc = next;
    }
  }
  // Step, the smaller of two limits (with a 0.92 safety factor):
  //  - strip: in the strip |Im t| < d the integrand grows by up to (1/cos d)^v, so the
  //    error is min over d of (1/cos d)^v exp(-2 pi d / h); h0 - slope*log(1+v) fits
  //    the h that keeps it below e^-41 (double) for 0 <= v <= 20 from below;
  //  - peak: the peak is about 1/sqrt(g'') wide, and g''(tc) is close to hypot(x, v).
  const T h_strip = Precision<T>::trapezoid_h0 - Precision<T>::trapezoid_h_slope * std::log1p(v);
  const T h_peak = Precision<T>::trapezoid_h_scale / std::sqrt(hypot_fast(x, v));
  const T h = T(0.92) * std::fmin(h_strip, h_peak);
  // Per node, g(t) - g(tc) = 2 x sinh((t+tc)/2) sinh((t-tc)/2) - (log cosh(vt) - log cosh(v tc))
  // is formed from F = e^{t/2} and one expm1 near the peak (or one exp far from it), and
  // log cosh(y) = y + log1p(e^{-2y}) - log 2, whose log1p term vanishes past 2y > 40.
  // That is two to four transcendental calls per node instead of six.
  const T big = T(sizeof(T) == 8 ? 700 : 85);  // e^big still fits in T
  const T fc = tc < big ? std::exp(T(0.5) * tc) : T(0);
  const T l_c = T(2) * v * tc < T(40) ? std::log1p(std::exp(T(-2) * v * tc)) : T(0);
  const T tol = Precision<T>::eps * T(0.05);
  T sum = T(0), sum_xcosh = T(0), sum_ttanh = T(0);
  auto add = [&](long j) -> T {
    const T t = T(j) * h;
    const T d = T(0.5) * (t - tc);
    const T half_sum = T(0.5) * (t + tc);
    // sinh(d) and F = e^{t/2}.
    T sinh_d, f;
    if (std::fabs(d) < T(1) && tc < big) {
      const T m = std::expm1(d);
      sinh_d = m * (m + T(2)) / (T(2) * (m + T(1)));
      f = fc * (m + T(1));
    } else {
      f = T(0.5) * t < big ? std::exp(T(0.5) * t) : T(0);
      sinh_d = std::sinh(d);
    }
    // x sinh((t+tc)/2) without overflow when x is tiny and t, tc huge.
    T x_sinh_sum;
    if (half_sum < big && f != T(0) && fc != T(0)) {
      const T prod = f * fc;
      x_sinh_sum = x * T(0.5) * (prod - T(1) / prod);
    } else {
      x_sinh_sum = x_times_hyperbolic(x, log_x, half_sum, false);
    }
    const T two_vt = T(2) * v * t;
    const T e2 = two_vt < T(40) ? std::exp(-two_vt) : T(0);  // e^{-2vt}
    const T l_t = e2 != T(0) ? std::log1p(e2) : T(0);
    const T dg = T(2) * x_sinh_sum * sinh_d - (T(2) * v * d + l_t - l_c);
    T w = std::exp(-dg);
    if (j == 0) w *= T(0.5);
    sum += w;
    if (want.dx) {
      const T x_cosh = t < big && f != T(0) ? x * T(0.5) * (f * f + T(1) / (f * f))
                                           : x_times_hyperbolic(x, log_x, t, true);
      sum_xcosh += w * x_cosh;
    }
    if (want.dv) sum_ttanh += w * t * ((T(1) - e2) / (T(1) + e2));  // t tanh(vt)
    return w;
  };
  const long jc = static_cast<long>(std::floor(tc / h + T(0.5)));
  constexpr long kMaxNodes = 1L << 16;  // ~ t up to 16000: far beyond any double input
  for (long j = jc; j < jc + kMaxNodes; ++j) {
    const T w = add(j);
    if (j > jc && w <= tol * sum) break;
  }
  for (long j = jc - 1; j >= 0; --j) {
    const T w = add(j);
    if (w <= tol * sum) break;
  }
  // g(tc) (scaled: g(tc) - x = 2 x sinh^2(tc/2) - log cosh(v tc), no subtraction of x).
  // Its two terms are of size ~v and nearly cancel where K_v(x) ~ 1, so they are formed
  // in double even for float inputs, with both products exact (fma) and the difference
  // taken before the small parts are added: what rounding is left is that of cosh(tc).
  const double xd = x, vd = v, tcd = tc, log_xd = std::log(xd);
  double hyper;  // cosh(tc), or 2 sinh^2(tc/2) for the scaled form
  double x_hyper_hi, x_hyper_lo;
  if (0.5 * tcd < 700.0) {
    const double sh = std::sinh(0.5 * tcd);
    hyper = want.scaled ? 2.0 * sh * sh : std::cosh(tcd);
    x_hyper_hi = xd * hyper;
    x_hyper_lo = std::fma(xd, hyper, -x_hyper_hi);
  } else {  // tiny x, huge tc: x e^tc / 2 without overflow (x cosh tc >> 1 here anyway)
    x_hyper_hi = 0.5 * std::exp(log_xd + tcd);
    x_hyper_lo = 0.0;
  }
  const double y_hi = vd * tcd, y_lo = std::fma(vd, tcd, -y_hi);
  const double log1p_tail = y_hi < 20.0 ? std::log1p(std::exp(-2.0 * y_hi)) : 0.0;
  constexpr double kLn2Hi = 0.69314718055994528623, kLn2Lo = 2.3190468138462996e-17;
  // g = x*hyper - (y - ln2 + log1p(e^-2y))
  const double g_c = (x_hyper_hi - y_hi) + (x_hyper_lo - y_lo - log1p_tail + kLn2Hi + kLn2Lo);
  LogBesselValue<T> r;
  r.log_value = T(-g_c) + std::log(h * sum);
  if (want.dx) r.dlog_dx = -(sum_xcosh / sum) / x;
  if (want.dv) r.dlog_dv = sum_ttanh / sum;
  return r;
}

}  // namespace log_bessel
}  // namespace diffkern
