// Entropic optimal transport, batched: log-domain Sinkhorn and Sinkhorn-Newton-Sparse (SNS).
//
//   minimize <C, P> + eps * sum P log P   subject to  P 1 = a,  P^T 1 = b,
//   with P_ij = exp((f_i + g_j - C_ij) / eps) at the optimum (POT's convention).
//
// The core works on raw, C-contiguous arrays of one device and never allocates: the caller
// passes a workspace of sinkhorn_workspace_bytes(). Potentials and weights are float64 even
// for float32 costs: a float32 potential's rounding (6e-8) is a 6e-8/eps relative error in
// the plan, which at eps = 1e-3 alone exceeds a 1e-6 marginal-error target.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace diffkern {

enum class SinkhornMethod : int { sinkhorn = 0, sns = 1 };

struct SinkhornProblem {
  int64_t batch = 1, n = 0, m = 0;
  DType cost_dtype = DType::float64;
  const void* cost = nullptr;    // (batch, n, m)
  const void* cost_t = nullptr;  // (batch, m, n): the transpose, so every half-step is a row sweep
  const double* a = nullptr;     // (batch, n) weights >= 0; zero entries allowed
  const double* b = nullptr;     // (batch, m)
  double eps = 0;                // entropic regularization, > 0
};

struct SinkhornOptions {
  SinkhornMethod method = SinkhornMethod::sns;
  double tol = 1e-6;          // stop when sum|P1 - a| + sum|P^T 1 - b| <= tol
  int64_t max_iter = 1000;    // cap on Sinkhorn iterations + Newton steps, per batch element
  int64_t check_every = 10;   // Sinkhorn iterations between two marginal-error checks
  bool fixed_iterations = false;  // exactly max_iter iterations, no host synchronization
  int64_t newton_warmup = 20;     // SNS: Sinkhorn iterations before the first Newton step
  bool warm_start = false;        // g holds a warm start: skip eps-scaling, warm up 2 iterations
  int64_t cg_max_iter = 400;      // SNS: conjugate-gradient iterations per Newton step
  int verbose = 0;                // > 0: one progress line per check / Newton step on stderr
};

// Outputs (and warm-start inputs), on the problem's device.
struct SinkhornState {
  double* f = nullptr;               // (batch, n): in = initial potential, out = solution
  double* g = nullptr;               // (batch, m)
  double* marginal_error = nullptr;  // (batch,): L1 marginal error of the returned (f, g)
  int64_t* iterations = nullptr;     // (batch,): Sinkhorn iterations + Newton steps
  int64_t* newton_steps = nullptr;   // (batch,): accepted Newton steps
  // Optional, HOST memory: how many elements were still above tol (or NaN) at the last
  // check, so the caller can warn without another device synchronization; -1 when no check
  // ran (fixed_iterations).
  int64_t* unconverged = nullptr;
};

// Bytes of scratch memory solve_* needs (8-byte aligned base required).
size_t sinkhorn_workspace_bytes(const SinkhornProblem& p, const SinkhornOptions& o);

Status sinkhorn_solve_cpu(const SinkhornProblem& p, const SinkhornOptions& o,
                          const SinkhornState& s, void* workspace, int num_threads);
// Enqueues on `stream` (cudaStream_t). Synchronizes with the host only to read the marginal
// error at checks, and never when o.fixed_iterations is set (CUDA-graph capturable).
Status sinkhorn_solve_cuda(const SinkhornProblem& p, const SinkhornOptions& o,
                           const SinkhornState& s, void* workspace, void* stream);

}  // namespace diffkern
