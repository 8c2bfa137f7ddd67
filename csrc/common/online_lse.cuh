// Online (streaming) log-sum-exp with merge, for the CPU and CUDA builds alike.
// Sinkhorn's row sweeps and attention's online softmax are the same idea: keep the running
// maximum m and the sum s of exp(x - m); when the maximum moves, rescale s once.
// value() = m + log(s). Partial results of disjoint ranges merge exactly (merge()), so a
// row can be split over lanes, warps or threads and combined in any fixed order.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace diffkern {

// exp evaluated in the precision of T: float for float32 data (its ~1e-7 relative error
// is below what a float32 input resolves), double otherwise. The result is double.
template <class T>
DK_HOST_DEVICE double exp_as(double x) {
  if constexpr (sizeof(T) == 4) {
    return static_cast<double>(expf(static_cast<float>(x)));
  } else {
    return exp(x);
  }
}

// NaN propagates: a NaN term makes the value NaN (`x > mx` is false for NaN, so a plain
// running form would drop it, and a set of only NaN and -inf terms would come out -inf).
struct OnlineLogSumExp {
  double mx = -INFINITY;
  double sum = 0.0;

  // Adds exp(x); x = -inf adds nothing. One exp per element unless the maximum moves.
  template <class T = double>
  DK_HOST_DEVICE void add(double x) {
    if (x > mx) {  // also the first finite x: exp(-inf) = 0 clears the empty sum
      sum = sum * exp_as<T>(mx - x) + 1.0;
      mx = x;
    } else if (x != -INFINITY) {  // NaN poisons the sum
      sum += x == x ? exp_as<T>(x - mx) : x;
    }
  }
  // Adds another partial result (its running maximum and scaled sum).
  DK_HOST_DEVICE void merge(double o_mx, double o_sum) {
    if (o_mx == -INFINITY) {
      if (o_sum != o_sum) sum = o_sum;  // a part of only NaN terms
      return;
    }
    if (o_mx <= mx) {
      sum += o_sum * exp(o_mx - mx);
    } else {
      sum = sum * exp(mx - o_mx) + o_sum;
      mx = o_mx;
    }
  }
  DK_HOST_DEVICE void merge(const OnlineLogSumExp& o) { merge(o.mx, o.sum); }
  // log(sum of exp(x)); -inf for an empty (or all -inf) set; NaN when a NaN came in.
  DK_HOST_DEVICE double value() const {
    return sum != sum ? sum : (mx == -INFINITY ? -INFINITY : mx + log(sum));
  }
};

}  // namespace diffkern
