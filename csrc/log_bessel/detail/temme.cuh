// log K_v(x) for small orders and small x (v < 20, x <= 2) by Temme's series
// (N. M. Temme, J. Comput. Phys. 19, 1975) for K_mu and K_{mu+1}, |mu| <= 1/2, followed
// by the forward recurrence K_{nu+1} = K_{nu-1} + (2 nu / x) K_nu, which only adds
// positive numbers (stable upward). With c_k = (x^2/4)^k / k!:
//
//   K_mu(x)     = sum_k c_k f_k,          K_{mu+1}(x) = (2/x) sum_k c_k (p_k - k f_k),
//   f_k = (k f_{k-1} + p_{k-1} + q_{k-1}) / (k^2 - mu^2),
//   p_k = p_{k-1} / (k - mu),  q_k = q_{k-1} / (k + mu),
//   p_0 = e^sigma Gamma(1+mu) / 2,  q_0 = e^-sigma Gamma(1-mu) / 2,  sigma = mu log(2/x),
//   f_0 = Gamma(1+mu) Gamma(1-mu) [cosh(sigma) G1(mu) + sinh(sigma)/sigma log(2/x) G2(mu)],
//   G1 = (1/Gamma(1-mu) - 1/Gamma(1+mu)) / (2 mu),  G2 = (1/Gamma(1-mu) + 1/Gamma(1+mu)) / 2,
//
// G1 and G2 taken from the Taylor series of 1/Gamma(1+z) (no cancellation as mu -> 0).
#pragma once
#include <cmath>

#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"

namespace diffkern {
namespace log_bessel {

constexpr double kTemmeMaxX = 1.0;

// Taylor coefficients of 1/Gamma(1+z) about 0 (mpmath, 40 digits), index = power.
DK_HOST_DEVICE double inv_gamma_taylor(int n) {
  switch (n) {
    case 0: return 1.0;
    case 1: return 0.57721566490153286061;
    case 2: return -0.65587807152025388108;
    case 3: return -0.042002635034095235529;
    case 4: return 0.1665386113822914895;
    case 5: return -0.042197734555544336748;
    case 6: return -0.0096219715278769735621;
    case 7: return 0.0072189432466630995424;
    case 8: return -0.0011651675918590651121;
    case 9: return -0.00021524167411495097282;
    case 10: return 0.00012805028238811618615;
    case 11: return -0.000020134854780788238656;
    case 12: return -1.2504934821426706573e-6;
    case 13: return 1.1330272319816958824e-6;
    case 14: return -2.0563384169776071035e-7;
    case 15: return 6.1160951044814158179e-9;
    case 16: return 5.0020076444692229301e-9;
    case 17: return -1.1812745704870201446e-9;
    case 18: return 1.0434267116911005105e-10;
    case 19: return 7.782263439905071254e-12;
    case 20: return -3.6968056186422057082e-12;
    case 21: return 5.100370287454475979e-13;
    case 22: return -2.0583260535665067832e-14;
  }
  return 0.0;
}

// K_mu(x) and x K_{mu+1}(x) / K_mu(x) (scaled by x: the ratio alone overflows for the
// tiniest x) for |mu| <= 1/2, 0 < x <= kTemmeMaxX.
template <class T>
DK_HOST_DEVICE void temme_k(T mu, T x, T& k_mu, T& x_ratio) {
  // G2 = even part, G1 = -(odd part)/mu of 1/Gamma(1+mu), by Horner in mu^2.
  const T mu2 = mu * mu;
  T g2 = T(0), g1 = T(0);
  for (int n = 22; n >= 0; n -= 2) g2 = g2 * mu2 + T(inv_gamma_taylor(n));
  for (int n = 21; n >= 1; n -= 2) g1 = g1 * mu2 - T(inv_gamma_taylor(n));
  const T inv_gamma_plus = g2 - mu * g1;   // 1/Gamma(1+mu)
  const T inv_gamma_minus = g2 + mu * g1;  // 1/Gamma(1-mu)
  const T log_2_over_x = Precision<T>::ln2 - std::log(x);
  const T sigma = mu * log_2_over_x;
  const T sinh_sigma_over_sigma =
      std::fabs(sigma) < T(1e-3) ? T(1) + sigma * sigma * (T(1) / 6 + sigma * sigma / 120)
                                 : std::sinh(sigma) / sigma;
  const T e_sigma = std::exp(sigma);
  T f = (std::cosh(sigma) * g1 + sinh_sigma_over_sigma * log_2_over_x * g2) /
        (inv_gamma_plus * inv_gamma_minus);
  T p = T(0.5) * e_sigma / inv_gamma_plus;
  T q = T(0.5) / (e_sigma * inv_gamma_minus);
  const T quarter_x2 = T(0.25) * x * x;
  T c = T(1);
  T sum_f = f, sum_h = p;
  const T tol = Precision<T>::eps * T(0.05);
  for (int k = 1; k < 100; ++k) {
    const T kk = T(k);
    f = (kk * f + p + q) / (kk * kk - mu2);
    p /= kk - mu;
    q /= kk + mu;
    c *= quarter_x2 / kk;
    const T tf = c * f, th = c * (p - kk * f);
    sum_f += tf;
    sum_h += th;
    if (std::fabs(tf) <= tol * sum_f && std::fabs(th) <= tol * std::fabs(sum_h)) break;
  }
  k_mu = sum_f;
  x_ratio = T(2) * sum_h / sum_f;
}

}  // namespace log_bessel
}  // namespace diffkern
