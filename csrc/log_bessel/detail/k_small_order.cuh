// log K_v(x) for small orders (0 <= v < 20) from K_mu and K_{mu+1}, |mu| <= 1/2, and the
// forward recurrence K_{nu+1} = K_{nu-1} + (2 nu / x) K_nu, which only adds positive
// numbers (stable upward). K_mu comes from Temme's series (x <= 1, temme.cuh) or from the
// U-function recurrence (x >= 1.5, u_recurrence.cuh). Value, d/dx and d2/dx2; d/dv is left to
// the trapezoid rule. Done in double also for float inputs: the ratios reach ~(2/x)^2,
// past float's range for the tiniest x, and the loops are short.
#pragma once
#include <cmath>

#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"
#include "log_bessel/detail/temme.cuh"
#include "log_bessel/detail/u_recurrence.cuh"

namespace diffkern {
namespace log_bessel {

// The U recurrence runs in double (up to ~125 steps with a divide each): for float inputs
// the float trapezoid rule was measured faster on the H100 (log_kve 1.05e9 against 6.8e8
// evaluations/s), so float uses it for x > 1.
template <class T>
DK_HOST_DEVICE bool k_small_order_applies(T v, T x) {
  return v < T(kDebyeMinOrder) &&
         (x <= T(kTemmeMaxX) || (sizeof(T) == 8 && x >= T(kURecurrenceMinX)));
}

// log K_mu(x) e^x and x K_{mu+1}(x) / K_mu(x) by whichever method serves this x.
DK_HOST_DEVICE void k_low_order(double mu, double x, double& log_k_scaled, double& x_ratio) {
  if (x <= kTemmeMaxX) {
    double k_mu;
    temme_k(mu, x, k_mu, x_ratio);
    log_k_scaled = std::log(k_mu) + x;
  } else {
    u_recurrence_k(mu, x, log_k_scaled, x_ratio);
  }
}

// d2/dx2 log K_v(x) from y = x K_{v-1}(x) / K_v(x) (so d/dx log K_v = -(v + y) / x): the
// Bessel equation gives 1 + (v - y (y + 2v - 1)) / x^2. For small x, where d/dx log K ~ -v/x
// and the equation's form 1 + v^2/x^2 - D/x - D^2 cancels v^2/x^2 against D^2 (and turns
// into inf - inf below x ~ 1e-154), y is small and nothing cancels; the cancellation left
// for large x (~2 x^2 ulps) is bounded: this serves x < 200 (Hankel's expansion beyond).
DK_HOST_DEVICE double log_k_second_derivative(double v, double x, double y) {
  return 1.0 + ((v - y * (y + (2.0 * v - 1.0))) / x) / x;
}

template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_kv_small_order(T v_in, T x_in, Want want) {
  const double v = v_in, x = x_in;
  double log_k_scaled, x_ratio, dlog_dx, y;
  if (v <= 0.5) {
    // Order -v (K is even in the order): the ratio is then K_{1-v} / K_v, which is
    // K_{v-1} / K_v as d/dx needs, with no subtraction.
    k_low_order(-v, x, log_k_scaled, x_ratio);
    dlog_dx = -(x_ratio + v) / x;
    y = x_ratio;
  } else {
    const int n = static_cast<int>(std::floor(v + 0.5));
    const double mu = v - double(n);
    k_low_order(mu, x, log_k_scaled, x_ratio);
    // r_k = K_{mu+k+1} / K_{mu+k} = 2 (mu+k) / x + 1 / r_{k-1}, and
    // log K_v = log K_mu + sum_{k<n} log r_k, the product taken in chunks so that it never
    // overflows. For x < 1 the ratios are carried times x, s_k = x r_k (r_k alone
    // overflows for the tiniest x), and n log x is taken off once; for x >= 1 that would
    // subtract two sums of size n log x, so the plain ratios are used there.
    const bool carry_x = x < 1.0;
    const double step = carry_x ? 2.0 : 2.0 / x, feedback = carry_x ? x * x : 1.0;
    double product = 1.0, s_k = carry_x ? x_ratio : x_ratio / x;
    if (carry_x) log_k_scaled -= double(n) * std::log(x);
    for (int k = 0; k < n; ++k) {
      if (k > 0) s_k = step * (mu + double(k)) + feedback / s_k;
      product *= s_k;
      if (product > 1e250) {
        log_k_scaled += std::log(product);
        product = 1.0;
      }
    }
    log_k_scaled += std::log(product);
    if (!carry_x) s_k *= x;  // back to x K_v / K_{v-1}
    dlog_dx = -x / s_k - v / x;  // K_{v-1}/K_v = x / s_{n-1}
    y = x * (x / s_k);
  }
  LogBesselValue<T> r;
  r.log_value = T(want.scaled ? log_k_scaled : log_k_scaled - x);
  if (want.dx) r.dlog_dx = T(dlog_dx);
  if (want.dx2) r.d2log_dx2 = T(log_k_second_derivative(v, x, y));
  return r;
}

}  // namespace log_bessel
}  // namespace diffkern
