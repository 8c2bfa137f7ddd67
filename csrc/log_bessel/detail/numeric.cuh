// Small numeric helpers shared by the log-Bessel branches, for float and double,
// on the host and on the device: precision constants, lgamma, digamma, asinh(v/x).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

#if !defined(__CUDA_ARCH__)
#include <math.h>  // lgamma_r: std::lgamma writes the global signgam, a race under OpenMP
#endif

namespace diffkern {
namespace log_bessel {

// Smallest order for which the Debye expansion, summed to at most debye::kNumTerms terms,
// reaches double precision for every x (max|U_19| / 20^19 < 2e-19). Below it, every
// branch choice is a "small order" one (series, Hankel, recurrences, trapezoid).
constexpr double kDebyeMinOrder = 20.0;

template <class T>
struct Precision;

template <>
struct Precision<double> {
  static constexpr double eps = 1.1102230246251565e-16;  // unit roundoff 2^-53
  static constexpr double ln2 = 0.69314718055994530942;
  static constexpr double half_log_two_pi = 0.91893853320467274178;
  static constexpr double log_pi_over_two = 0.45158270528945486473;  // log(pi/2)
  // Trapezoid step for K at small orders (see trapezoid.cuh): h <= h0 - slope log(1+v)
  // keeps the strip error below e^-41, h <= scale / sqrt(hypot(x, v)) resolves the peak.
  static constexpr double trapezoid_h0 = 0.2407;
  static constexpr double trapezoid_h_slope = 0.0397;
  static constexpr double trapezoid_h_scale = 0.40;
};

template <>
struct Precision<float> {
  static constexpr float eps = 5.9604645e-8f;  // 2^-24
  static constexpr float ln2 = 0.69314718f;
  static constexpr float half_log_two_pi = 0.91893853f;
  static constexpr float log_pi_over_two = 0.45158270f;
  static constexpr float trapezoid_h0 = 0.4486f;  // strip error below e^-22
  static constexpr float trapezoid_h_slope = 0.093f;
  static constexpr float trapezoid_h_scale = 0.55f;
};

// (The <cmath> macros rather than numeric_limits: those are host-only constexpr for nvcc.)
template <class T>
DK_HOST_DEVICE T quiet_nan() {
  return T(NAN);
}

template <class T>
DK_HOST_DEVICE T infinity() {
  return T(INFINITY);
}

// log Gamma(z) for z > 0.
DK_HOST_DEVICE double log_gamma(double z) {
#if defined(__CUDA_ARCH__)
  return ::lgamma(z);
#else
  int sign;
  return ::lgamma_r(z, &sign);
#endif
}

DK_HOST_DEVICE float log_gamma(float z) {
#if defined(__CUDA_ARCH__)
  return ::lgammaf(z);
#else
  int sign;
  return ::lgammaf_r(z, &sign);
#endif
}

// log Gamma(z) for z >= 21 by Stirling's series: (z - 1/2) log z - z + log(2 pi)/2 +
// sum_k B_2k / (2k (2k-1) z^(2k-1)); five terms leave < 1e-17 relative there, and the
// result (> 40) carries no cancellation. About three times cheaper than lgamma_r.
template <class T>
DK_HOST_DEVICE T log_gamma_large(T z) {
  const T r = T(1) / z, r2 = r * r;
  const T series =
      r * (T(1.0 / 12) - r2 * (T(1.0 / 360) - r2 * (T(1.0 / 1260) - r2 * (T(1.0 / 1680) -
      r2 * T(1.0 / 1188)))));
  return (z - T(0.5)) * std::log(z) - z + Precision<T>::half_log_two_pi + series;
}

// Gamma(z) for z > 0. On the host the float version goes through double: glibc's
// tgammaf was measured 2.6e-6 off at z = 16.87 (some 40 ulps).
DK_HOST_DEVICE double gamma_function(double z) { return ::tgamma(z); }

DK_HOST_DEVICE float gamma_function(float z) {
#if defined(__CUDA_ARCH__)
  return ::tgammaf(z);
#else
  return static_cast<float>(::tgamma(static_cast<double>(z)));
#endif
}

#if !defined(__CUDA_ARCH__)
// Host only: 1 / Gamma(1 + v) for 0 <= v < 20 (double), in place of glibc's tgamma
// (~40-70 ns) in the series branch (~15 ns; as log(1/Gamma) it lost to lgamma_r).
// With v = n + f (n integer, 0 <= f < 1): 1/Gamma(1+v) = R(f) / prod_{j=1..n} (j + f),
// where R(f) = 1/Gamma(1+f)
// is a degree-16 polynomial in t = f - 1/2 (1/Gamma is entire, so it converges fast;
// fitted by interpolation at Chebyshev nodes in mpmath, 1.35e-16 relative in double
// including rounding). The factors j + f are exact; the product adds n roundings.
inline double inv_gamma_1p_host(double v) {
  static constexpr double c[17] = {
      1.1283791670955126,      -0.0411745264452831,     -0.5266544355255445,
      0.17510202604393435,     0.050966860247706136,    -0.04215516936852384,
      0.006612897826820958,    0.0021207314422774662,   -0.0011107302545151887,
      0.00015235762470316286,  2.535520386106474e-05,   -1.3896835437533617e-05,
      2.1562113294434155e-06,  5.8070298070884785e-08,  -8.917014541433564e-08,
      1.6813402437575466e-08,  -8.521820446681207e-10};
  const int n = static_cast<int>(v);
  const double f = v - n;
  const double t = f - 0.5;
  // Estrin's scheme and a branch-free product tree: short dependency chains.
  const double t2 = t * t, t4 = t2 * t2, t8 = t4 * t4, t16 = t8 * t8;
  const double c01 = c[0] + t * c[1], c23 = c[2] + t * c[3], c45 = c[4] + t * c[5],
               c67 = c[6] + t * c[7], c89 = c[8] + t * c[9], cab = c[10] + t * c[11],
               ccd = c[12] + t * c[13], cef = c[14] + t * c[15];
  const double r = ((c01 + t2 * c23) + t4 * (c45 + t2 * c67)) +
                   t8 * ((c89 + t2 * cab) + t4 * (ccd + t2 * cef)) + t16 * c[16];
  double a[20];
  // a[j] = j + 1 + f for j < n, else 1 (exact either way: j + f is exact).
  for (int j = 0; j < 20; ++j) a[j] = 1.0 + double(j < n) * (j + f);
  for (int j = 0; j < 10; ++j) a[j] *= a[j + 10];
  for (int j = 0; j < 5; ++j) a[j] *= a[j + 5];
  const double prod = ((a[0] * a[1]) * (a[2] * a[3])) * a[4];
  return r / prod;
}
#endif

// Digamma psi(z) for z >= 1 (all the log-Bessel code needs): recurrence up to z >= 10,
// then the asymptotic series, whose first neglected term is below 1e-17 there.
template <class T>
DK_HOST_DEVICE T digamma_ge1(T z) {
  T shift = T(0);
  while (z < T(10)) {
    shift -= T(1) / z;
    z += T(1);
  }
  const T r = T(1) / (z * z);
  // Bernoulli terms B_2n / (2n z^2n), n = 1..7, by Horner in 1/z^2.
  const T series =
      r * (T(1) / 12 -
           r * (T(1) / 120 -
                r * (T(1) / 252 -
                     r * (T(1) / 240 - r * (T(1) / 132 - r * (T(691) / 32760 - r * (T(1) / 12)))))));
  return shift + std::log(z) - T(0.5) / z - series;
}

// sqrt(a^2 + b^2) for a, b >= 0: a plain sqrt where the squares cannot overflow or
// underflow harmfully (std::hypot is several times slower on the host), else hypot.
template <class T>
DK_HOST_DEVICE T hypot_fast(T a, T b) {
  const T big = T(sizeof(T) == 8 ? 1e150 : 1e18);
  const T m = a > b ? a : b;
  if (m < big && m > T(1) / big) return std::sqrt(a * a + b * b);
  return std::hypot(a, b);
}

// asinh(v / x) for v >= 0, x > 0 without overflowing v / x when x is tiny, given
// s = sqrt(v^2 + x^2): asinh(u) = log1p(u + u^2 / (1 + sqrt(1 + u^2))) with u = v/x is
// log1p(u (1 + v / (x + s))), one log1p and no square root (glibc's asinh does both).
template <class T>
DK_HOST_DEVICE T asinh_ratio(T v, T x, T s) {
  // Past 1/sqrt(eps), asinh(y) = log(2y) to working precision.
  const T big = T(1) / std::sqrt(Precision<T>::eps);
  if (v > big * x) return Precision<T>::ln2 + std::log(v) - std::log(x);
  // x + s overflows for x near the largest number: there v / (x + s) = p / (1 + x/s).
  const T v_over_x_plus_s =
      x < T(sizeof(T) == 8 ? 1e300 : 1e36) ? v / (x + s) : (v / s) / (T(1) + x / s);
  return std::log1p(v / x * (T(1) + v_over_x_plus_s));
}

template <class T>
DK_HOST_DEVICE T asinh_ratio(T v, T x) {
  return asinh_ratio(v, x, hypot_fast(v, x));
}

}  // namespace log_bessel
}  // namespace diffkern
