// log I_v(x) and log K_v(x) for large orders (v >= kDebyeMinOrder) from the uniform
// asymptotic expansion (DLMF 10.41.3-4), with s = sqrt(v^2 + x^2), p = v / s:
//
//   log I_v(x) =  E - log(2 pi s) / 2 + log A_+(p, s),
//   log K_v(x) = -E + log(pi / (2 s)) / 2 + log A_-(p, s),
//   E = v eta(x / v) = s - v asinh(v / x).
//
// E is the difference of two numbers of size ~v. Where E itself is small (x / v near
// the zero z0 of eta) that difference would lose all digits for large v, so there E
// is summed from the Taylor series of eta about z0, in w = x/v - z0 obtained with one
// fma from a double-double z0.
//
// Derivatives (d/dx E = s / x, d/dv E = -asinh(v / x)):
//   d/dx log I = s/x - x/(2 s^2) + d/dx log A_+,  I_{v+1}/I_v = d/dx log I - v/x
//              = x/(s+v) - x/(2 s^2) + d/dx log A_+   (no cancellation)
//   d/dv log I = -asinh(v/x) - p/(2 s) + d/dv log A_+, and for K the signs of E flip.
// Second derivatives in x (d/dx (s/x) = -v^2 / (s x^2), d/dx (x / (2 s^2)) =
// (p^2 - (x/s)^2) / (2 s^2)):
//   d2/dx2 log I = -p v / x^2 - (p^2 - (x/s)^2) / (2 s^2) + d2/dx2 log A_+,
//   d/dx (I_{v+1}/I_v) = p / (s (1 + p)) - (p^2 - (x/s)^2) / (2 s^2) + d2/dx2 log A_+,
//   d2/dx2 log K = +p v / x^2 - (p^2 - (x/s)^2) / (2 s^2) + d2/dx2 log A_-,
// whose leading terms have one sign at both ends (x << v and x >> v).
// Every quantity is formed from x/s, v/s and 1/s, never from v^2, x^2 or v x, so that
// nothing overflows for v or x up to the largest double.
#pragma once
#include <cmath>

#include "log_bessel/detail/debye_sum.cuh"
#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

// Taylor coefficients of eta(z) = sqrt(1 + z^2) - asinh(1/z) about its zero z0
// (computed with mpmath at 60 digits); used for |w| <= kEtaTaylorRadius.
constexpr double kEtaZeroHi = 0.6627434193491816;
constexpr double kEtaZeroLo = 8.155323790501267e-18;
constexpr float kEtaZeroHiF = 0.6627434f;
constexpr float kEtaZeroLoF = 2.9742706e-08f;
constexpr double kEtaTaylorRadius = 0.12;
constexpr int kEtaTaylorTerms = 24;

DK_HOST_DEVICE double eta_taylor_coefficient(int n) {
  // Index n = 1..24; a switch keeps the table usable on host and device alike.
  switch (n) {
    case 1: return 1.8101705806989772745;
    case 2: return -0.9488864162568370515;
    case 3: return 1.1001528948506503179;
    case 4: return -1.2953006779860538264;
    case 5: return 1.5715455665619724959;
    case 6: return -1.9710295801345065657;
    case 7: return 2.5442226725502084901;
    case 8: return -3.3574176889619281024;
    case 9: return 4.5036397450391532152;
    case 10: return -6.1169161541708536195;
    case 11: return 8.3911147120913043561;
    case 12: return -11.606012767320622318;
    case 13: return 16.164725435894190674;
    case 14: return -22.648266391101255529;
    case 15: return 31.895268490233819134;
    case 16: return -45.118315882584096177;
    case 17: return 64.073574799752204257;
    case 18: return -91.308245500944501845;
    case 19: return 130.52190238409394525;
    case 20: return -187.09471362813002477;
    case 21: return 268.86036338219910898;
    case 22: return -387.2380100873396064;
    case 23: return 558.89137636476149907;
    case 24: return -808.16228865812587638;
  }
  return 0.0;
}

template <class T>
DK_HOST_DEVICE void eta_zero(T& hi, T& lo);
template <>
DK_HOST_DEVICE void eta_zero<double>(double& hi, double& lo) {
  hi = kEtaZeroHi;
  lo = kEtaZeroLo;
}
template <>
DK_HOST_DEVICE void eta_zero<float>(float& hi, float& lo) {
  hi = kEtaZeroHiF;
  lo = kEtaZeroLoF;
}

// E = s - v asinh(v/x) (scaled: E - x), accurate also where it nearly cancels.
template <class T>
DK_HOST_DEVICE T debye_exponent(T v, T x, T s, bool scaled) {
  if (scaled && v < T(0.05) * x) {
    // E - x = v phi(u), u = v/x, phi(u) = (sqrt(1+u^2) - 1)/u - asinh(u): the two terms
    // cancel to a third for small u, so sum phi's Taylor series instead.
    const T u = v / x, u2 = u * u;
    const T phi = u * (T(-0.5) + u2 * (T(1.0 / 24) + u2 * (T(-1.0 / 80) + u2 * (T(5.0 / 896) +
                  u2 * (T(-7.0 / 2304) + u2 * (T(21.0 / 11264) + u2 * (T(-33.0 / 26624) +
                  u2 * T(143.0 / 163840))))))));
    return v * phi;
  }
  if (scaled) {
    // v^2 / (s + x) = s - x. For v past ~1e154 v^2 overflows (and s + x past ~9e307):
    // there v (p / (1 + x/s)) instead, not everywhere (one divide more, and it was
    // measured a little less accurate: bench/NOTES-log_bessel.md item 15).
    const T big = T(sizeof(T) == 8 ? 1e150 : 1e18);
    const T v2_over = s < big ? v * v / (s + x) : v * ((v / s) / (T(1) + x / s));
    return v2_over - v * asinh_ratio(v, x, s);
  }
  T z0_hi, z0_lo;
  eta_zero<T>(z0_hi, z0_lo);
  const T w = (std::fma(-z0_hi, v, x) - z0_lo * v) / v;
  if (std::fabs(w) <= T(kEtaTaylorRadius)) {
    T eta = T(0);
    for (int n = kEtaTaylorTerms; n >= 1; --n) eta = (eta + T(eta_taylor_coefficient(n))) * w;
    return v * eta;
  }
  return s - v * asinh_ratio(v, x, s);
}

// The pieces of one Debye evaluation that the shifted-order branch reuses.
template <class T>
struct DebyeResult {
  LogBesselValue<T> value;
  T ratio_dv;  // I only, when second derivatives were asked: d/dv (I_{v+1}/I_v)
};

// is_i: I (true) or K (false). kDerivs as in debye_sum: 0 value, 1 first derivatives,
// 2 also d/dv of the ratio (for the recurrence that starts from this order).
template <class T, int kDerivs>
DK_HOST_DEVICE DebyeResult<T> log_bessel_debye(T v, T x, bool is_i, Want want) {
  const T s = hypot_fast(v, x);
  const T p = v / s;
  const T sign = is_i ? T(1) : T(-1);
  const DebyeSum<T> A = debye_sum<T, kDerivs>(v, p, s, sign);
#if !defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8 && kDerivs == 0) {
    // Host, double, value only: s serves as the double s (the same sqrt), and for I
    // log(A sqrt(1/s)): 1/s is debye_sum's, the sqrt overlaps with the sum, and a multiply
    // instead of a divide follows A. (K keeps A / sqrt(s): there the rms error against
    // mpmath rose 1.91e-16 -> 1.98e-16. Also measured and dropped: v^2/(s+x) as
    // v (v/(x+s)), one divide less, ~-2.5 ns; log_ive's max error rose 7.1e-16 -> 8.2e-16.)
    const T e = debye_exponent<double>(v, x, s, want.scaled);
    DebyeResult<T> out;
    out.value.log_value =
        is_i ? (e - Precision<double>::half_log_two_pi) + std::log(A.a * std::sqrt(T(1) / s))
             : (-e + 0.5 * Precision<double>::log_pi_over_two) + std::log(A.a / std::sqrt(s));
    return out;
  }
#endif
  // The exponent and log s are of size ~v and nearly cancel where the result is small:
  // they are assembled in double even for float inputs (a few double operations per
  // element; the sum A, the costly part, stays in T).
  const double vd = v, xd = x, sd = hypot_fast(vd, xd);
  const double e = debye_exponent<double>(vd, xd, sd, want.scaled);
  DebyeResult<T> out;
  LogBesselValue<T>& r = out.value;
  // In double, log(A / sqrt(s)) saves a log; float keeps log s in double (see above).
  const T log_a_over_root_s = sizeof(T) == 8 ? T(std::log(double(A.a) / std::sqrt(sd))) : T(0);
  if (is_i) {
    r.log_value = sizeof(T) == 8
        ? T(e - Precision<double>::half_log_two_pi) + log_a_over_root_s
        : T(e - Precision<double>::half_log_two_pi - 0.5 * std::log(sd)) + std::log(A.a);
  } else {
    r.log_value = sizeof(T) == 8
        ? T(-e + 0.5 * Precision<double>::log_pi_over_two) + log_a_over_root_s
        : T(-e + 0.5 * (Precision<double>::log_pi_over_two - std::log(sd))) + std::log(A.a);
  }
  if (kDerivs >= 1) {
    const T x_s = x / s;
    const T p_x = -p * x_s / s, s_x = x_s;        // dp/dx, ds/dx
    const T p_v = x_s * x_s / s, s_v = p;         // dp/dv, ds/dv
    const T g = (A.a_p * p_x + A.a_s * s_x) / A.a;  // d/dx log A
    const T half_x_s2 = T(0.5) * x_s / s;            // x / (2 s^2)
    if (want.dx) {
      if (is_i) {
        // x / (s + v); past s ~ 1e150 as (x/s) / (1 + p), since s + v can overflow.
        const T x_over_s_plus_v =
            s < T(sizeof(T) == 8 ? 1e150 : 1e18) ? x / (s + v) : x_s / (T(1) + p);
        r.ratio = x_over_s_plus_v - half_x_s2 + g;
        r.dlog_dx = s / x - half_x_s2 + g;
      } else {
        r.dlog_dx = -s / x - half_x_s2 + g;
      }
    }
    if (want.dv) {
      const T dlog_a_dv = (A.a_p * p_v + A.a_s * s_v) / A.a;
      const T asinh_vx = asinh_ratio(v, x, s);
      r.dlog_dv = sign * -asinh_vx - T(0.5) * p / s + dlog_a_dv;
      if (kDerivs >= 2) {
        // d/dv of ratio = x/(s+v) - x/(2 s^2) + g.
        const T p_xv = x_s * (T(3) * p * p - T(1)) / (s * s);
        const T s_xv = -x_s * p / s;
        const T dg_dv = ((A.a_pp * p_v + A.a_ps * s_v) * p_x + A.a_p * p_xv +
                         (A.a_ps * p_v + A.a_ss * s_v) * s_x + A.a_s * s_xv) / A.a -
                        g * dlog_a_dv;
        // (Only the shifted-order branch asks: v ~ 20, x < ~200, so s + v is small.)
        const T spv = s + v;
        out.ratio_dv = -x * (p + T(1)) / (spv * spv) + x_s * p / (s * s) + dg_dv;
      }
    }
    if (kDerivs >= 2 && want.dx2) {
      const T p_xx = p * (T(2) * x_s * x_s - p * p) / s / s;  // v (2x^2 - v^2) / s^5
      const T s_xx = p * p / s;                               // v^2 / s^3
      const T a_xx = A.a_pp * p_x * p_x + T(2) * A.a_ps * p_x * s_x + A.a_ss * s_x * s_x +
                     A.a_p * p_xx + A.a_s * s_xx;
      const T dg_dx = a_xx / A.a - g * g;  // d2/dx2 log A
      const T common = -(p * p - x_s * x_s) * (T(0.5) / s) / s + dg_dx;
      const T p_v_over_x2 = p * (v / x) / x;  // v^2 / (s x^2); inf only where it is
      if (is_i) {
        r.ratio_dx = p / (s * (T(1) + p)) + common;
        r.d2log_dx2 = -p_v_over_x2 + common;
      } else {
        r.d2log_dx2 = p_v_over_x2 + common;
      }
    }
  }
  return out;
}

}  // namespace log_bessel
}  // namespace diffkern
