// Scalar math shared by the CPU and CUDA sweeps of the Sinkhorn family.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace diffkern {
namespace sinkhorn_detail {

// log P_ij = (f_i + g_j - C_ij) / eps. The same expression (same operation order) serves the
// row pass over C and the column pass over C^T, so both sparsification passes make
// bit-identical keep/drop decisions and the sparse Hessian stays symmetric.
DK_HOST_DEVICE double log_plan(double own, double other, double cost, double inv_eps) {
  return ((own + other) - cost) * inv_eps;
}

// Entries below exp(-80) are never kept: their float value would be denormal or zero.
constexpr double kMinLogKept = -80.0;

// Running log-sum-exp: value = mx + log(sum). One exp per element except when the
// maximum moves. exp runs in float for float32 costs (the sum stays double): its 1e-7
// relative error is below what a float32 cost can resolve.
template <class T>
DK_HOST_DEVICE double exp_as(double x) {
  if constexpr (sizeof(T) == 4) {
    return static_cast<double>(expf(static_cast<float>(x)));
  } else {
    return exp(x);
  }
}

// NaN propagates (a NaN term makes the value NaN): a NaN potential or cost must show up as a
// NaN marginal error, not vanish from the sum (`x > mx` is false for NaN, so the plain
// running form dropped it, and a row whose terms were all NaN or -inf came out -inf: zero
// mass, a finite error of exactly the missing weight).
struct LogSumExp {
  double mx = -INFINITY;
  double sum = 0.0;

  template <class T>
  DK_HOST_DEVICE void add(double x) {
    if (x > mx) {  // also the first finite x: exp(-inf) = 0 clears the empty sum
      sum = sum * exp_as<T>(mx - x) + 1.0;
      mx = x;
    } else if (x != -INFINITY) {  // -inf (a zero-mass partner) adds nothing; NaN poisons
      sum += x == x ? exp_as<T>(x - mx) : x;
    }
  }
  DK_HOST_DEVICE void merge(double o_mx, double o_sum) {
    if (o_mx == -INFINITY) {
      if (o_sum != o_sum) sum = o_sum;  // an all-NaN part
      return;
    }
    if (o_mx <= mx) {
      sum += o_sum * exp(o_mx - mx);
    } else {
      sum = sum * exp(mx - o_mx) + o_sum;
      mx = o_mx;
    }
  }
  // -inf for an empty (or all -inf) sum; NaN when a NaN term came in.
  DK_HOST_DEVICE double value() const {
    return sum != sum ? sum : (mx == -INFINITY ? -INFINITY : mx + log(sum));
  }
};

enum class SweepMode : int {
  // New potential of the swept side: out_pot = eps (log w - L); out_term = out_pot * w.
  // L = LSE_k((other_k - M_rk) / eps): the swept side's own potential is not read.
  update = 0,
  // Marginal of the swept side at the current potentials: out_sum = exp(L) with
  // L = LSE_k(log_plan(own_r, other_k, M_rk)); out_term = |out_sum - w|.
  measure = 1,
};

DK_HOST_DEVICE void finish_row(SweepMode mode, double L, double w, double eps, double* out_pot,
                               double* out_sum, double* out_term) {
  if (mode == SweepMode::update) {
    const double pot = w > 0 ? eps * (log(w) - L) : -INFINITY;
    *out_pot = pot;
    *out_term = w > 0 ? pot * w : 0.0;
  } else {
    const double s = exp(L);
    if (out_sum) *out_sum = s;
    *out_term = fabs(s - w);
  }
}

}  // namespace sinkhorn_detail
}  // namespace diffkern
