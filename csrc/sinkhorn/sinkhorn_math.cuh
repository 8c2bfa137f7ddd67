// Scalar math shared by the CPU and CUDA sweeps of the Sinkhorn family.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "common/online_lse.cuh"

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

// The running log-sum-exp of the sweeps is the shared one (common/online_lse.cuh); it
// propagates NaN, so a NaN potential or cost shows up as a NaN marginal error.
using LogSumExp = OnlineLogSumExp;

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
