// Carving the caller's workspace into the solver's arrays. One layout for CPU and CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "sinkhorn/sinkhorn.h"

namespace diffkern {
namespace sinkhorn_detail {

// Per-batch scalars of the solver's state machine (read and written by kernels, so that
// decisions need no host round trip).
struct BatchScalars {
  double* err;        // L1 marginal error at (f, g)
  double* phi;        // semi-dual objective <f, a> + <g, b> at (f, g)
  double* phi_scale;  // sum |f_i a_i| + |g_j b_j|: the objective's rounding scale
  double* phi_trial;  // objective at the line-search trial point
  double* slope;      // (b - c) . dg: directional derivative along the Newton direction
  double* step;       // current line-search step t
  double* log_delta;  // log of the sparsification mass tolerance
  double* delta_shift;  // added to log_delta: lowered after each failed Newton round
  double* rz[2];      // CG: r . z, double-buffered by iteration parity
  double* rz0;        // CG: r . z at the start (for the relative stopping rule)
  double* pq;         // CG: p . (S p)
  double* cg_tol2;    // CG: squared relative tolerance
  double* mass;       // sum of a
  double* err_prev;   // err before the current Newton step
  double* floor;      // |sum a - sum b|: no plan has a smaller L1 marginal error
  double* b_scale;    // sum a / sum b: Newton aims at b scaled to the plan's mass
  double* gain;       // Phi gain of the accepted Newton step
  double* sk_gain;    // eps KL(b || c) before the step: what one Sinkhorn iteration gains at least
  int* active;        // 1 while the element still iterates
  int* newton;        // 1: the element takes a Newton step this round
  int* searching;     // line search: 1 while no step has been accepted
  int* rejected;      // 1: the line search accepted no trial of this round's Newton step
  int* cg_active;     // CG: 1 while the residual is above tolerance
  int* fallback;      // 1: Sinkhorn phase (sk_left > 0): Sinkhorn iterations, no Newton step
  int* reverted;      // 1: the accepted Newton step did not lower the error and was undone
  int* by_slack;      // 1: the accepted step's gain in Phi is not above rounding
  int* sk_left;       // Sinkhorn iterations to run before the next Newton step
  int* backoff;       // length of the Sinkhorn phase after the next failed Newton step
  int* ascent;        // 1: this round steps along the scaled gradient (Newton's direction was no ascent)
  int* shift;         // 1: the element runs the block shift search (ShiftDirection) this round
  int* shifted;       // 1: a block shift was searched since the last Newton round
  int* shift_off;     // 1: a search failed (rejected, or the error did not fall): none for the rest of the solve
  int* shift_open;    // 1: some candidate column's bracket is still wider than kShiftPrecision eps
  int* cg_live;       // 2 counters: elements still in CG, by iteration parity (fused CG)
  double* report;     // (B, kReportFields): what a tolerance-mode check reads, one copy
};

// The fields of one element's check report (read by the host in one copy per check).
enum ReportField : int { kReportErr = 0, kReportActive, kReportIterations, kReportFallback,
                         kReportShift, kReportFields };

struct Workspace {
  BatchScalars s;
  double* c;         // (B, m) column sums of the plan
  double* row_buf;   // (B, n) per-row terms before a per-batch reduction
  double* col_buf;   // (B, m)
  double* f_trial;   // (B, n)
  double* g_trial;   // (B, m)
  double* f_prev;    // (B, n) state before the Newton step, to undo it
  double* g_prev;    // (B, m)
  double* log_a_n;   // (B, n) log(a_i / m): sparsification threshold terms
  double* log_c_m;   // (B, m) log(c_j / n)
  double* inv_a;     // (B, n) 1 / a_i (0 where a_i = 0)
  double* precond;   // (B, m) inverse diagonal of the Schur complement (0 where unused)
  // Newton direction and CG vectors, (B, m); tmp is (B, n).
  double *x, *r, *z, *p, *q, *tmp, *diag;
  // Sparse plan: rows (P_s) and columns (P_s^T); row r of a (R, K) matrix keeps its
  // cnt_r entries at [r*K, r*K + cnt_r): CSR with implicit row starts.
  int64_t *row_cnt, *col_cnt;  // (B, n), (B, m)
  int32_t *row_idx, *col_idx;  // (B, n*m)
  float *row_val, *col_val;    // (B, n*m)
};

// Lays out (or, with base == nullptr, only measures) the workspace. Returns bytes used.
inline size_t layout_workspace(const SinkhornProblem& p, const SinkhornOptions& o, void* base,
                               Workspace* w) {
  const int64_t B = p.batch, n = p.n, m = p.m;
  const bool sns = o.method == SinkhornMethod::sns;
  size_t off = 0;
  auto take = [&](auto*& ptr, int64_t count) {
    using T = std::remove_reference_t<decltype(*ptr)>;
    off = (off + 15) & ~size_t(15);
    ptr = base ? reinterpret_cast<T*>(static_cast<char*>(base) + off) : nullptr;
    off += sizeof(T) * static_cast<size_t>(count);
  };
  Workspace tmp;
  Workspace& ws = w ? *w : tmp;
  BatchScalars& s = ws.s;
  for (double** d : {&s.err, &s.phi, &s.phi_scale, &s.phi_trial, &s.slope, &s.step, &s.log_delta,
                     &s.delta_shift,
                     &s.rz[0], &s.rz[1], &s.rz0, &s.pq, &s.cg_tol2, &s.mass, &s.err_prev,
                     &s.floor, &s.b_scale, &s.gain, &s.sk_gain})
    take(*d, B);
  for (int** i : {&s.active, &s.newton, &s.searching, &s.rejected, &s.cg_active, &s.fallback,
                  &s.reverted, &s.by_slack, &s.sk_left, &s.backoff, &s.ascent, &s.shift, &s.shifted,
                  &s.shift_off, &s.shift_open})
    take(*i, B);
  take(s.cg_live, 2);
  take(s.report, B * kReportFields);
  take(ws.c, B * m);
  take(ws.row_buf, B * n);
  take(ws.col_buf, B * m);
  const int64_t vec_m = sns ? B * m : 0, vec_n = sns ? B * n : 0, nnz = sns ? B * n * m : 0;
  take(ws.f_trial, vec_n);
  take(ws.g_trial, vec_m);
  take(ws.f_prev, vec_n);
  take(ws.g_prev, vec_m);
  take(ws.log_a_n, vec_n);
  take(ws.log_c_m, vec_m);
  take(ws.inv_a, vec_n);
  take(ws.precond, vec_m);
  for (double** d : {&ws.x, &ws.r, &ws.z, &ws.p, &ws.q, &ws.diag}) take(*d, vec_m);
  take(ws.tmp, vec_n);
  take(ws.row_cnt, vec_n);
  take(ws.col_cnt, vec_m);
  take(ws.row_idx, nnz);
  take(ws.col_idx, nnz);
  take(ws.row_val, nnz);
  take(ws.col_val, nnz);
  return off + 16;
}

}  // namespace sinkhorn_detail
}  // namespace diffkern
