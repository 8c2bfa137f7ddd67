// Inputs shared by the CPU and CUDA microbenchmarks, so both time the same mix of regimes.
// Orders v ~ U[0.05, 100] and arguments x log-uniform in [1e-3, 1e3]: every algorithm branch
// (series, asymptotic, uniform expansion) is hit, and no value is ever 0 (special-cased
// fast paths would flatter the timings).
#pragma once
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "log_bessel/log_bessel.h"

namespace diffkern {
namespace bench {

template <class T>
void make_inputs(int64_t n, std::vector<T>& v, std::vector<T>& x, uint64_t seed = 1234) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> order(0.05, 100.0);
  std::uniform_real_distribution<double> log10_arg(-3.0, 3.0);
  v.resize(static_cast<size_t>(n));
  x.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    v[static_cast<size_t>(i)] = static_cast<T>(order(rng));
    x[static_cast<size_t>(i)] = static_cast<T>(std::pow(10.0, log10_arg(rng)));
  }
}

// Same-shape contiguous 1-D inputs: the geometry the bindings produce after coalescing.
inline BinaryBroadcast flat_geometry(int64_t n) {
  BinaryBroadcast g;
  g.ndim = 1;
  g.sizes[0] = n;
  g.a_strides[0] = 1;
  g.b_strides[0] = 1;
  return g;
}

}  // namespace bench
}  // namespace diffkern
