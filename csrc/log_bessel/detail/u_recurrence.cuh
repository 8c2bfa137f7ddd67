// K_mu(x) and K_{mu+1}(x)/K_mu(x) for |mu| <= 1/2 and moderate x (x >= 1.5), from the
// confluent hypergeometric function: K_mu(x) = sqrt(pi) (2x)^mu e^-x z_0 with
// z_n = U(mu + 1/2 + n, 2 mu + 1, 2x) (DLMF 10.39.6, 13.3.7). The z_n satisfy
//
//   z_{n-1} = 2 (n + x) z_n - a_n z_{n+1},   a_n = (n + 1/2)^2 - mu^2,
//
// of which z_n is the minimal solution, so running the recurrence backward from
// z_{N+1} = 0, z_N = 1 gives the ratios z_n / z_0 (Miller's algorithm). Temme's
// normalization sum_n C_n z_n = (2x)^(-mu-1/2), C_0 = 1, C_n = C_{n-1} a_{n-1} / n
// (all terms positive for |mu| <= 1/2), then gives
//
//   K_mu(x) = sqrt(pi / (2x)) e^-x / S,   S = sum_n C_n z_n / z_0,
//   K_{mu+1}(x) / K_mu(x) = (mu + 1/2 + x + (mu^2 - 1/4) z_1 / z_0) / x.
//
// Only arithmetic per step, against two to four exponentials per trapezoid node.
// N = 25 + 150/x reaches double precision from x = 1.5 (measured against mpmath: the
// normalization sum converges more slowly than the ratio, 5e-16 at x = 2 with N = 80).
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace diffkern {
namespace log_bessel {

constexpr double kURecurrenceMinX = 1.5;

// log(K_mu(x) e^x) and x K_{mu+1}(x) / K_mu(x), |mu| <= 1/2, x >= kURecurrenceMinX.
DK_HOST_DEVICE void u_recurrence_k(double mu, double x, double& log_k_mu_scaled,
                                   double& x_ratio) {
  const int n_start = static_cast<int>(25.0 + 150.0 / x);
  const double mu2 = mu * mu;
  // S = z_0 + (a_0/1) (z_1 + (a_1/2) (z_2 + ...)) by Horner from the inside, in the same
  // downward pass that makes the z_n: sum = z_n + (a_n / (n+1)) sum.
  double z_next = 0.0, z = 1.0;  // z_{n+1}, z_n (arbitrary common scale)
  double sum = z;
  for (int n = n_start; n >= 1; --n) {
    const double a_n = (n + 0.5) * (n + 0.5) - mu2;
    const double z_prev = 2.0 * (n + x) * z - a_n * z_next;
    z_next = z;
    z = z_prev;
    const double a_prev = (n - 0.5) * (n - 0.5) - mu2;  // a_{n-1}
    sum = z + (a_prev / n) * sum;
    if (z > 1e200) {  // the dominant direction grows: rescale everything alike
      z *= 1e-200;
      z_next *= 1e-200;
      sum *= 1e-200;
    }
  }
  // z = z_0, z_next = z_1 (common scale).
  log_k_mu_scaled = 0.5 * std::log(3.14159265358979323846 / (2.0 * x)) - std::log(sum / z);
  x_ratio = mu + 0.5 + x + (mu2 - 0.25) * (z_next / z);
}

}  // namespace log_bessel
}  // namespace diffkern
