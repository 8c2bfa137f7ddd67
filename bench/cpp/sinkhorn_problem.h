// A squared-Euclidean OT problem (uniform points in [0,1]^2, cost normalized to max 1,
// uniform weights) for the C++ Sinkhorn benchmarks, built on the host.
#pragma once
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace diffkern {
namespace bench {

template <class T>
struct HostProblem {
  int64_t n = 0;
  std::vector<T> cost, cost_t;  // (n, n) and its transpose
  std::vector<double> a, b;     // uniform weights
};

template <class T>
HostProblem<T> make_point_cloud_problem(int64_t n, unsigned seed = 7) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<double> x(2 * n), y(2 * n);
  for (auto& v : x) v = u(rng);
  for (auto& v : y) v = u(rng);
  std::vector<double> c(static_cast<size_t>(n * n));
  double mx = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double dx = x[2 * i] - y[2 * j], dy = x[2 * i + 1] - y[2 * j + 1];
      c[i * n + j] = dx * dx + dy * dy;
      mx = std::max(mx, c[i * n + j]);
    }
  HostProblem<T> p;
  p.n = n;
  p.cost.resize(c.size());
  p.cost_t.resize(c.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      p.cost[i * n + j] = static_cast<T>(c[i * n + j] / mx);
      p.cost_t[j * n + i] = static_cast<T>(c[i * n + j] / mx);
    }
  p.a.assign(static_cast<size_t>(n), 1.0 / n);
  p.b.assign(static_cast<size_t>(n), 1.0 / n);
  return p;
}

}  // namespace bench
}  // namespace diffkern
