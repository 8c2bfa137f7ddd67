// The small steps of the solver, as functors the backends run where the data lives:
// per-batch decisions (f(b)), per-element vector updates (f(b, k)), reduction terms
// (t(b, k) returns the term; it may also write vector outputs, which saves a launch) and
// reduction epilogues (f(b, sum, sum of |terms|)). Shared by the CPU loops and the CUDA kernels; the control
// flow that strings them together is sinkhorn_driver.h.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "sinkhorn/workspace.h"

namespace diffkern {
namespace sinkhorn_detail {

// ------------------------------------------------------------------ per-batch functors
// Reduction epilogues get (b, sum, sum of |terms|).

struct SetErr {
  double* err;
  const int* mask;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    if (mask[b]) err[b] = sum;
  }
};

struct SetAddPhi {  // first the row part (assign), then the column part (add)
  double* phi;
  double* scale;
  bool add;
  const int* mask;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double abs_sum) const {
    if (!mask[b]) return;
    phi[b] = add ? phi[b] + sum : sum;
    scale[b] = add ? scale[b] + abs_sum : abs_sum;
  }
};

struct SetSum {
  double* out;
  const int* mask;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    if (mask[b]) out[b] = sum;
  }
};

struct StartCg {  // rz0 = r.z; CG runs while rz > tol2 * rz0
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    s.rz[0][b] = sum;
    s.rz0[b] = sum;
    s.cg_active[b] = s.active[b] && sum > 0;
  }
};

// Armijo test on the semi-dual. The slack admits steps whose gain is below the objective's
// rounding error: near the solution a Newton step's gain (~err^2/eps) is smaller than the
// rounding of Phi, and rejecting it there would stall the quadratic phase.
struct LineSearchTest {
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double abs_sum) const {
    if (!s.searching[b]) return;
    const double phi_t = s.phi_trial[b] + sum;
    const double slack = 1e-13 * (s.phi_scale[b] + abs_sum);
    const double wanted = s.phi[b] + 1e-4 * s.step[b] * s.slope[b];
    if (phi_t >= wanted - slack) {
      s.searching[b] = 0;
      s.fallback[b] = 0;
      s.by_slack[b] = !(phi_t - s.phi[b] > slack);  // gain not above rounding: unproven
    } else {
      s.step[b] *= 0.25;
    }
  }
};

struct ResetBatch {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.active[b] = 1;
    s.fallback[b] = 0;
    s.searching[b] = 0;
    s.cg_active[b] = 0;
    s.reverted[b] = 0;
    s.by_slack[b] = 0;
    iterations[b] = 0;
    newton_steps[b] = 0;
  }
};

struct CountIterations {
  int64_t* iterations;
  const int* mask;
  int64_t k;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (mask[b]) iterations[b] += k;
  }
};

// Tolerance-mode check: deactivate converged elements, then pack what the host reads
// (error, active, iterations, fallback) into one report row, so a check is one copy.
struct UpdateActive {
  BatchScalars s;
  const int64_t* iterations;
  double tol;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (s.active[b] && !(s.err[b] > tol)) s.active[b] = 0;  // NaN err stays active (reported)
    if (!s.active[b]) s.fallback[b] = 0;  // finished elements take no fallback iterations
    double* row = s.report + b * kReportFields;
    row[kReportErr] = s.err[b];
    row[kReportActive] = s.active[b];
    row[kReportIterations] = static_cast<double>(iterations[b]);
    row[kReportFallback] = s.fallback[b];
  }
};

struct StartNewton {  // sparsification tolerance, CG tolerance, line-search state
  BatchScalars s;
  const double* mass;  // (B) sum of a; null: 1
  DK_HOST_DEVICE void operator()(int64_t b) const {
    const double rel = s.err[b] / (mass ? mass[b] : 1.0);
    const double delta = fmin(1e-3, fmax(1e-5, rel));
    s.log_delta[b] = log(delta);
    const double eta = fmin(0.1, fmax(rel, 1e-10));
    s.cg_tol2[b] = eta * eta;
    s.step[b] = 1.0;
    s.searching[b] = s.active[b];
    s.fallback[b] = s.active[b];  // cleared when a step is accepted
    s.by_slack[b] = 0;
  }
};

// A step whose gain in Phi is not above the rounding slack (no measurable gain in
// Phi) must lower the marginal error, or it is undone and the element falls back to
// Sinkhorn. Near the solution the semi-dual is flat to rounding (a step that moves the error
// from 1e-16 to 1e-9 changes Phi by ~1e-17), so the Armijo test cannot judge such a step;
// steps with a real gain are kept even when the error grows (the damped phase needs them).
struct RevertIfWorse {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.reverted[b] = 0;
    if (!s.active[b] || s.fallback[b] || !s.by_slack[b]) return;
    if (!(s.err[b] <= s.err_prev[b])) {
      s.reverted[b] = 1;
      s.fallback[b] = 1;
      s.err[b] = s.err_prev[b];
      iterations[b] -= 1;
      newton_steps[b] -= 1;
    }
  }
};

// Before a Newton step: keep (f, g) and the error, to undo the step. Over k < max(n, m).
struct SaveState {
  BatchScalars s;
  const double *f, *g;
  double *f_prev, *g_prev;
  int64_t n, m;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t k) const {
    if (k < n) f_prev[b * n + k] = f[b * n + k];
    if (k < m) g_prev[b * m + k] = g[b * m + k];
    if (k == 0) s.err_prev[b] = s.err[b];
  }
};

// (f, g) = (f_src, g_src) where flag[b] (undo a step; accept a trial). Over k < max(n, m).
struct CopyPairWhere {
  const int* flag;
  const double *f_src, *g_src;
  double *f, *g;
  int64_t n, m;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t k) const {
    if (!flag[b]) return;
    if (k < n) f[b * n + k] = f_src[b * n + k];
    if (k < m) g[b * m + k] = g_src[b * m + k];
  }
};

struct FinishNewton {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.searching[b] = 0;
    if (s.active[b] && !s.fallback[b]) {
      iterations[b] += 1;
      newton_steps[b] += 1;
    }
  }
};

// ---------------------------------------------------------------- per-element functors
// Called as f(b, k) for k in [0, len) of a (B, len) array.

// ------------------------------------------------------------------ reduction terms

struct ArrayTerm {  // the entries of a (B, len) array
  const double* x;
  int64_t len;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t k) const { return x[b * len + k]; }
};

struct PotentialTerm {  // f_i a_i (0 where a_i = 0): one part of Phi
  const double *f, *a;
  int64_t n;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t i) const {
    const int64_t k = b * n + i;
    return a[k] > 0 ? f[k] * a[k] : 0.0;
  }
};

struct RowThresholds {  // log(a_i / m) and 1 / a_i
  const double* a;
  double *log_a_n, *inv_a;
  int64_t n;
  double log_m;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t i) const {
    const int64_t k = b * n + i;
    log_a_n[k] = a[k] > 0 ? log(a[k]) - log_m : -INFINITY;
    inv_a[k] = a[k] > 0 ? 1.0 / a[k] : 0.0;
  }
};

struct ColThresholds {
  const double* c;
  double* log_c_m;
  int64_t m;
  double log_n;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    log_c_m[k] = c[k] > 0 ? log(c[k]) - log_n : -INFINITY;
  }
};

// diag_j = c_j - sum_i P_s,ij^2 / a_i arrives in `diag` as the sparse sum; finish the
// preconditioner and start CG: x = 0, r = eps (b - c), z = M r, p = z; the term is r.z.
struct StartCgVectors {
  const double *b_w, *c;
  double *diag, *precond, *x, *r, *z, *p;
  const int* mask;
  int64_t m;
  double eps;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    if (!mask[b]) return 0.0;
    const double d = c[k] - diag[k];
    // Guard: a column whose kept mass is all its mass has d ~ 0 (up to rounding); such a
    // column is still coupled through its rows, so precondition with c_j instead.
    const double dd = d > 1e-12 * c[k] ? d : c[k];
    precond[k] = (b_w[k] > 0 && c[k] > 0) ? 1.0 / dd : 0.0;
    x[k] = 0;
    r[k] = (b_w[k] > 0) ? eps * (b_w[k] - c[k]) : 0.0;
    z[k] = precond[k] * r[k];
    p[k] = z[k];
    return r[k] * z[k];
  }
};

struct SlopeTerm {  // (b - c) . x
  const double *b_w, *c, *x;
  int64_t m;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    return (b_w[k] > 0) ? (b_w[k] - c[k]) * x[k] : 0.0;
  }
};

struct TrialPoint {  // g' = g + t x; the term is g'_j b_j
  BatchScalars s;
  const double *g, *x, *b_w;
  double* g_trial;
  int64_t m;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    if (!s.searching[b]) return 0.0;
    const double gt = g[k] + s.step[b] * x[k];  // -inf stays -inf (x = 0 there)
    g_trial[k] = gt;
    return b_w[k] > 0 ? gt * b_w[k] : 0.0;
  }
};

// (f, g) = the trial point where the element accepted its step. Over k < max(n, m).
struct AcceptTrials {
  BatchScalars s;
  const double *f_trial, *g_trial;
  double *f, *g;
  int64_t n, m;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t k) const {
    if (!s.active[b] || s.fallback[b]) return;
    if (k < n) f[b * n + k] = f_trial[b * n + k];
    if (k < m) g[b * m + k] = g_trial[b * m + k];
  }
};

}  // namespace sinkhorn_detail
}  // namespace diffkern
