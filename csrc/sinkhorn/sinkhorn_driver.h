// The solver's control flow, written once for both backends (CPU loops, CUDA kernels).
//
// Every decision that differs between batch elements (converged? step accepted? CG done?)
// is taken by a per-batch functor that runs where the data lives, so the host issues the
// same launch sequence for the whole batch. The host reads per-batch flags back only to stop
// early (tolerance mode); with fixed_iterations it reads nothing (graph-capturable).
//
// SNS is Newton's method on the semi-dual  Phi(g) = <T(g), a> + <g, b>, where
// T(g)_i = eps log a_i - eps LSE_j((g_j - C_ij)/eps) is the row update of Sinkhorn; its
// gradient is b - c (c: column sums of the plan) and its Hessian is -(D_c - P^T D_a^-1 P)/eps,
// the Schur complement of the full dual Hessian. P is replaced by P_s, which keeps the
// entries P_ij >= delta * min(a_i/m, c_j/n) (at most a delta fraction of each row's and
// column's mass is dropped; delta shrinks with the marginal error), so the system is solved by
// preconditioned CG with two sparse products per iteration.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "common/host_device.h"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_math.cuh"
#include "sinkhorn/solver_steps.cuh"
#include "sinkhorn/workspace.h"

namespace diffkern {
namespace sinkhorn_detail {

// ----------------------------------------------------------------------------- driver

template <class Backend, class T>
class Driver {
 public:
  Driver(Backend& bk, const SinkhornProblem& p, const SinkhornOptions& o, const SinkhornState& st,
         const Workspace& w)
      : bk_(bk), p_(p), o_(o), st_(st), w_(w), B_(p.batch), n_(p.n), m_(p.m),
        nm_(std::max(p.n, p.m)) {
    cost_ = static_cast<const T*>(p.cost);
    cost_t_ = static_cast<const T*>(p.cost_t);
  }

  Status run() {
    const BatchScalars& s = w_.s;
    bk_.for_batch(ResetBatch{s, st_.iterations, st_.newton_steps});
    bk_.reduce(n_, ArrayTerm{p_.a, n_}, SetSum{s.mass, s.active});
    bk_.reduce(m_, ArrayTerm{p_.b, m_}, SetFloor{s.floor, s.b_scale, s.mass});
    // Rows exact from the start: f = T(g) (g is the warm start, or zeros).
    row_update(st_.g, st_.f, s.active);
    if (o_.method == SinkhornMethod::sinkhorn) {
      run_sinkhorn();
    } else {
      run_sns();
    }
    bk_.copy_device(st_.marginal_error, s.err, sizeof(double) * B_);
    if (st_.unconverged) *st_.unconverged = unconverged_;
    return bk_.status();
  }

 private:
  Backend& bk_;
  const SinkhornProblem& p_;
  const SinkhornOptions& o_;
  const SinkhornState& st_;
  Workspace w_;
  int64_t B_, n_, m_, nm_;  // nm_ = max(n, m): the range of functors over both potentials
  const T* cost_;
  const T* cost_t_;
  std::vector<double> host_report_;
  std::vector<int> host_flags_;
  int64_t min_active_iterations_ = 0;  // tolerance mode: fewest iterations of a live element
  bool any_fallback_ = false;          // tolerance mode: a live element is in its Sinkhorn phase
  bool any_newton_ = false;            // tolerance mode: a live element is due a Newton step
  bool any_shift_ = false;             // tolerance mode: a live element is due a block shift
  int64_t unconverged_ = -1;           // after the last check; -1: never checked (fixed mode)

  void row_update(const double* g, double* f, const int* mask) {
    bk_.sweep(cost_, n_, m_, nullptr, g, p_.a, SweepMode::update, f, nullptr, w_.row_buf, mask);
  }
  // One iteration: g = T'(f), then f = T(g); rows stay exact.
  void sinkhorn_iterations(int64_t k, const int* mask) {
    for (int64_t it = 0; it < k; ++it) {
      bk_.sweep(cost_t_, m_, n_, nullptr, st_.f, p_.b, SweepMode::update, st_.g, nullptr,
                w_.col_buf, mask);
      row_update(st_.g, st_.f, mask);
    }
    if (k > 0) bk_.for_batch(CountIterations{st_.iterations, mask, k});
  }
  // Column sums c and the L1 marginal error at (f, g) (rows are exact, so err = |c - b|_1).
  void measure(const int* mask) {
    bk_.sweep(cost_t_, m_, n_, st_.g, st_.f, p_.b, SweepMode::measure, nullptr, w_.c, w_.col_buf,
              mask);
    bk_.reduce(m_, ArrayTerm{w_.col_buf, m_}, SetErr{w_.s.err, mask});
  }
  // Tolerance mode: deactivate converged elements; returns how many still iterate. One
  // copy to the host (the packed report) per check. after_chunk: the check after a
  // Sinkhorn-phase chunk, which also decides the block shift (any_shift_).
  int64_t check(int64_t iteration, const char* phase, bool after_chunk = false) {
    bk_.for_batch(UpdateActive{w_.s, st_.iterations, o_.tol, after_chunk, o_.max_iter});
    host_report_.resize(B_ * kReportFields);
    bk_.copy_to_host(host_report_.data(), w_.s.report, sizeof(double) * B_ * kReportFields);
    int64_t n_active = 0;
    double worst = 0;
    min_active_iterations_ = o_.max_iter;
    any_fallback_ = false;
    any_newton_ = false;
    any_shift_ = false;
    int64_t above_tol = 0;
    for (int64_t b = 0; b < B_; ++b) {
      const double* row = host_report_.data() + b * kReportFields;
      const double err = row[kReportErr];
      if (row[kReportActive] != 0) {
        n_active += 1;
        const int64_t its = static_cast<int64_t>(row[kReportIterations]);
        min_active_iterations_ = std::min(min_active_iterations_, its);
        const bool fb = row[kReportFallback] != 0;
        any_fallback_ = any_fallback_ || fb;
        any_newton_ = any_newton_ || (!fb && its < o_.max_iter);
        any_shift_ = any_shift_ || row[kReportShift] != 0;
      }
      if (!(err <= o_.tol)) above_tol += 1;  // NaN counts
      worst = std::isnan(err) ? err : std::max(worst, err);
    }
    unconverged_ = above_tol;
    if (o_.verbose > 0) {
      std::fprintf(stderr, "[diffkern.ot] %-9s iteration %6lld  max marginal error %.3e  active %lld/%lld\n",
                   phase, static_cast<long long>(iteration), worst,
                   static_cast<long long>(n_active), static_cast<long long>(B_));
    }
    return n_active;
  }

  void run_sinkhorn() {
    const int* active = w_.s.active;
    if (o_.fixed_iterations) {
      sinkhorn_iterations(o_.max_iter, active);
      measure(active);
      return;
    }
    const int64_t every = std::max<int64_t>(1, o_.check_every);
    int64_t it = 0;
    while (true) {
      measure(active);
      if (check(it, "sinkhorn") == 0 || it >= o_.max_iter) break;
      const int64_t k = std::min(every, o_.max_iter - it);
      sinkhorn_iterations(k, active);
      it += k;
    }
  }

  void run_sns() {
    const int* active = w_.s.active;
    const bool fixed = o_.fixed_iterations;
    // The start may already be converged (a warm start; or a constant cost, or a huge eps,
    // where Sinkhorn returns at its first check and a warm-up would double the time). A warm
    // start also needs no eps-scaling (which would throw away what it knows) and only a
    // short warm-up.
    if (!fixed) {
      measure(active);
      if (check(0, "start") == 0) return;
    }
    const BatchScalars& s = w_.s;
    const int64_t want = o_.warm_start ? std::min<int64_t>(2, o_.newton_warmup) : o_.newton_warmup;
    int64_t it = std::min(std::max<int64_t>(0, want), o_.max_iter);
    bool newton_due = true;  // tolerance mode: some live element is due a Newton step
    if (o_.warm_start || fixed) {
      if (o_.warm_start) {
        sinkhorn_iterations(it, active);
      } else {
        warmup(it, active);
      }
      measure(active);
      if (!fixed && check(it, "sinkhorn") == 0) return;
    } else {
      if (o_.max_iter <= 0) return;
      // The probes (ProbeSinkhorn): elements that Sinkhorn finishes soon skip the warm-up.
      // The first at iteration 2; where a Newton round costs more than the CPU's few
      // iterations (small problems on a GPU), one at every check up to kProbeLastIterations.
      const int every = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, o_.check_every), 1 << 20));
      const double cost = bk_.newton_cost();
      const bool costly_newton = cost > kCpuNewtonCost;
      // No probe where the caller asked for (almost) no warm-up: Newton from the start.
      const int64_t last = it < kProbeIterations ? 0
                           : costly_newton       ? kProbeLastIterations
                                                 : kProbeIterations;
      const double later_horizon = static_cast<double>(it - kProbeSecondIterations) + 2 * cost;
      int64_t done = 0;
      const int* mask = active;
      for (int64_t end = kProbeIterations; end <= last;
           end = end < kProbeSecondIterations ? kProbeSecondIterations : end + every) {
        const int64_t stop = std::min(end, o_.max_iter);
        if (stop <= done) break;
        const bool first = done == 0;
        sinkhorn_iterations(stop - done - 1, mask);
        if (stop - done > 1) measure(mask);
        bk_.for_batch(KeepErr{s, mask});
        sinkhorn_iterations(1, mask);
        measure(mask);
        bk_.for_batch(ProbeSinkhorn{s, mask, o_.tol, first ? kProbeHorizon : later_horizon,
                                    first ? every : std::max(1, static_cast<int>(later_horizon))});
        if (check(stop, "probe") == 0) return;
        done = stop;
        if (!any_newton_) break;
        bk_.for_batch(SelectRound{s, st_.iterations, o_.max_iter});  // s.newton: still probed
        mask = s.newton;
      }
      // The eps-scaled warm-up, for the elements not left to Sinkhorn: 18 iterations after
      // the first probe (20 in all, as the benchmark problems were tuned); none after the
      // later probes, whose plain iterations at eps are the warm-up (scaling eps up from a
      // state 30 iterations into eps throws that progress away: the H200 sweep's worst case,
      // #3091, went from error 5e-3 at iteration 30 to a 3e-2 plateau and 12 Newton steps).
      const int64_t k = done >= kProbeSecondIterations
                            ? 0
                            : std::min(std::max<int64_t>(0, it - done), o_.max_iter - done);
      if (any_newton_ && k > 0) {
        bk_.for_batch(SelectRound{s, st_.iterations, o_.max_iter});
        warmup(k, s.newton);
        measure(active);
        if (check(done + k, "sinkhorn") == 0) return;
      }
      newton_due = any_newton_;
      it = min_active_iterations_;
    }
    // The row side of the sparsification threshold depends on a only: once per solve.
    bk_.for_each(n_, RowThresholds{p_.a, w_.log_a_n, w_.inv_a, n_, std::log(double(m_))});
    // A round: a Newton step for the elements out of their Sinkhorn phase (JudgeNewton), then
    // Sinkhorn iterations for the elements in it. Fixed mode: one iteration per element per
    // round (the Newton step, or one Sinkhorn iteration where it failed or the element is in
    // its phase). Tolerance mode: check_every Sinkhorn iterations, issued only when the check
    // says some element needs them, and the Newton launches only when some element is due
    // one (launches are the cost on small problems). Elements of a batch advance at different
    // rates (a Newton round is one iteration, a chunk check_every), so tolerance mode runs
    // until the slowest live element reaches max_iter, and holds back any element that would
    // pass it (SelectRound, LimitChunk).
    int64_t lo = it;  // tolerance mode: fewest iterations of a live element
    // Bound on rounds: in fixed mode each round is one iteration; in tolerance mode every
    // element at `lo` advances within two rounds (a Newton round counts even a failed
    // attempt; a chunk of k <= max_iter - lo fits it), so this never binds; it is there so
    // the loop provably ends.
    const int64_t max_rounds = 2 * o_.max_iter + 2;
    for (int64_t round = 0; (fixed ? it : lo) < o_.max_iter && round < max_rounds; ++round) {
      bk_.for_batch(SelectRound{s, st_.iterations, o_.max_iter});
      if (fixed || newton_due) {
        bk_.for_each(nm_, SaveState{s, st_.f, st_.g, w_.f_prev, w_.g_prev, n_, m_});
        newton_step();
        measure(s.newton);
        bk_.for_batch(JudgeNewton{s, st_.iterations, st_.newton_steps, !fixed, bk_.newton_cost()});
        bk_.for_each(nm_, CopyPairWhere{s.reverted, w_.f_prev, w_.g_prev, st_.f, st_.g, n_, m_});
        it += 1;
        if (fixed) {
          sinkhorn_iterations(1, s.fallback);
          bk_.for_batch(CountSinkhornPhase{s, 1});
          measure(s.fallback);
          continue;
        }
        if (check(lo + 1, "newton") == 0) return;
        lo = min_active_iterations_;
      }
      // Nobody in a Sinkhorn phase: the next round is a Newton round (some element is live
      // and, not being in its phase, is due one).
      newton_due = true;
      if (!any_fallback_) continue;
      const int64_t k = std::min(std::max<int64_t>(1, o_.check_every), o_.max_iter - lo);
      if (k <= 0) break;
      bk_.for_batch(LimitChunk{s, st_.iterations, k, o_.max_iter});
      bk_.for_batch(KeepErr{s, s.fallback});
      sinkhorn_iterations(k, s.fallback);
      bk_.for_batch(CountSinkhornPhase{s, k});
      measure(s.fallback);
      if (check(lo + k, "fallback", true) == 0) return;
      if (any_shift_ && block_shift() && check(lo + k, "shift") == 0) return;
      newton_due = any_newton_;
      lo = min_active_iterations_;
    }
  }

  // The block shift after a flat Sinkhorn chunk, for the elements its check flagged
  // (tolerance mode; see ShiftDirection). Returns whether some element searched (and its
  // error, measured again, needs a check).
  bool block_shift() {
    const BatchScalars& s = w_.s;
    const Workspace& w = w_;
    bk_.for_batch(StartShift{s});
    // x, tau = w.p, lo = w.r, hi = w.z (CG vectors, free between Newton steps); the trial's
    // column sums go to w.q.
    double *x = w.x, *tau = w.p, *lo = w.r, *hi = w.z, *q = w.q;
    bk_.reduce(m_, ShiftDirection{s, p_.b, w.c, x, tau, lo, hi, m_, p_.eps}, ShiftSelect{s});
    if (!any_set(s.shift)) {  // no candidates: nothing tried, nothing spent
      if (o_.verbose > 1) std::fprintf(stderr, "[diffkern.ot] shift     no candidates\n");
      return false;
    }
    int trials = 0, tests = 0;
    while (trials < kShiftTrials) {
      ++trials;
      bk_.reduce(m_, ShiftPoint{s, s.shift_open, st_.g, x, tau, p_.b, w.g_trial, m_, false},
                 SetSum{s.phi_trial, s.shift_open});
      row_update(w.g_trial, w.f_trial, s.shift_open);
      bk_.sweep(cost_t_, m_, n_, w.g_trial, w.f_trial, p_.b, SweepMode::measure, nullptr, q,
                w.col_buf, s.shift_open);
      bk_.reduce(m_, ShiftBracket{s, p_.b, q, x, tau, lo, hi, m_, p_.eps},
                 ShiftOpen{s, st_.iterations});
      if (!any_set(s.shift_open)) break;
    }
    bk_.for_batch(StartShiftTest{s});
    // An element whose bracket search found no plateau has nothing to test: then nothing
    // moved, and nothing needs measuring or checking.
    if (!any_set(s.searching)) {
      if (o_.verbose > 1) std::fprintf(stderr, "[diffkern.ot] shift     %d bracket trials, no plateau\n", trials);
      return false;
    }
    // Phi at the start, its rounding scale, and what one Sinkhorn iteration gains there.
    bk_.reduce(n_, PotentialTerm{st_.f, p_.a, n_}, SetAddPhi{s.phi, s.phi_scale, false, s.searching});
    bk_.reduce(m_, PotentialTerm{st_.g, p_.b, m_, s.b_scale}, SetAddPhi{s.phi, s.phi_scale, true, s.searching});
    bk_.reduce(m_, KlTerm{p_.b, w.c, s.b_scale, m_, p_.eps}, SetSum{s.sk_gain, s.searching});
    // Read before each test after the first.
    while (tests < kShiftFinal && (tests == 0 || any_set(s.searching))) {
      ++tests;
      bk_.reduce(m_, ShiftPoint{s, s.searching, st_.g, x, lo, p_.b, w.g_trial, m_, true},
                 SetSum{s.phi_trial, s.searching});
      row_update(w.g_trial, w.f_trial, s.searching);
      bk_.reduce(n_, ArrayTerm{w.row_buf, n_}, ShiftTest{s, st_.iterations});
    }
    bk_.for_each(nm_, AcceptTrials{s, s.shift, w.f_trial, w.g_trial, st_.f, st_.g, n_, m_});
    measure(s.shift);
    bk_.for_batch(FinishShift{s});
    if (o_.verbose > 1)
      std::fprintf(stderr, "[diffkern.ot] shift     %d bracket trials, %d tests\n", trials, tests);
    return true;
  }

  // SNS warm-up: Sinkhorn iterations with eps-scaling. The first three quarters run at
  // 27, 9 and 3 times eps (a quarter each), the rest at eps. Measured on the benchmark
  // problems, against 20 plain iterations: Newton steps 11 -> 7 (batched n = 256,
  // eps = 1e-3, worst element), 5 -> 3 (n = 1000, eps = 1e-3), 6 -> 5 (random assignment),
  // at the same total number of iterations. Newton's damped phase is what it shortens.
  void warmup(int64_t k, const int* active) {
    const int64_t stage = k >= 8 ? k / 4 : 0;
    if (stage > 0) {
      for (double scale : {27.0, 9.0, 3.0}) {
        bk_.set_eps(p_.eps * scale);
        sinkhorn_iterations(stage, active);
      }
      bk_.set_eps(p_.eps);
    }
    sinkhorn_iterations(k - 3 * stage, active);
  }

  // Reads one per-batch int flag array; true when any element has it set.
  bool any_set(const int* flags) {
    host_flags_.resize(B_);
    bk_.copy_to_host(host_flags_.data(), flags, sizeof(int) * B_);
    for (int64_t b = 0; b < B_; ++b)
      if (host_flags_[b]) return true;
    return false;
  }

  // CG iterations per Newton step: in exact arithmetic CG ends within m iterations (the
  // Schur complement is m x m); twice that, plus a margin for rounding, is plenty, and on
  // small problems it keeps a step on a singular sparsified system from issuing all
  // cg_max_iter iterations.
  int64_t cg_cap() const { return std::min<int64_t>(o_.cg_max_iter, 2 * m_ + 10); }

  void newton_step() {
    const BatchScalars& s = w_.s;
    const Workspace& w = w_;
    const int* stepping = s.newton;
    const bool fixed = o_.fixed_iterations;
    // Stopping CG or the line search once no element needs them changes no result (finished
    // elements are masked anyway); it needs a host read, which fixed mode forbids only
    // where it would synchronize with a device.
    const bool may_peek = !fixed || Backend::kHostReadsAreFree;
    bk_.for_batch(StartNewton{s, s.mass});
    // Phi at the current point, and its rounding scale; what one Sinkhorn iteration would
    // gain here (the safeguard's yardstick).
    bk_.reduce(n_, PotentialTerm{st_.f, p_.a, n_}, SetAddPhi{s.phi, s.phi_scale, false, stepping});
    bk_.reduce(m_, PotentialTerm{st_.g, p_.b, m_, s.b_scale}, SetAddPhi{s.phi, s.phi_scale, true, stepping});
    bk_.reduce(m_, KlTerm{p_.b, w.c, s.b_scale, m_, p_.eps}, SetSum{s.sk_gain, stepping});

    // Sparse plan, by rows and by columns, with one symmetric keep rule. Row r's entries sit
    // at [r*K, r*K + cnt_r) of a buffer with room for the dense matrix: a CSR matrix whose
    // row pointers are implicit, so it is built in one pass without a prefix sum.
    bk_.for_each(m_, ColThresholds{w.c, w.log_c_m, m_, std::log(double(n_))});
    bk_.sparsify(cost_, n_, m_, st_.f, st_.g, w.log_a_n, w.log_c_m, s.log_delta, w.row_cnt,
                 w.row_idx, w.row_val, stepping);
    bk_.sparsify(cost_t_, m_, n_, st_.g, st_.f, w.log_c_m, w.log_a_n, s.log_delta, w.col_cnt,
                 w.col_idx, w.col_val, stepping);
    // diag_j = c_j - sum_i P_s,ij^2 / a_i
    bk_.spmv(w.col_cnt, w.col_idx, w.col_val, m_, n_, w.inv_a, true, w.diag, stepping);
    bk_.reduce(m_, StartCgVectors{p_.b, w.c, s.b_scale, w.diag, w.precond, w.x, w.r, w.z, w.p, stepping, m_,
                                  p_.eps},
               StartCg{s});

    // Preconditioned CG on (D_c - P_s^T D_a^-1 P_s) x = eps (b - c).
    // Three launches per CG iteration on the GPU: the two sparse products (with the
    // diagonal terms fused), then one block per batch element for all vector updates and
    // both dot products. The host looks at the CG flags every cg_check_interval()
    // iterations (every one on the CPU, where looking costs nothing).
    // The CUDA backend usually runs the whole CG as one kernel that stops on the device:
    // one block per batch element for small problems (any mode), else one cooperative
    // grid-wide kernel (tolerance mode only; fixed mode keeps plain launches for capture).
    int cur = 0;
    const int64_t cg_max = cg_cap();
    int64_t cg_issued = cg_max;
    const bool fused = bk_.cg_fused(s, w, cg_max, fixed);
    for (int64_t k = 0; !fused && k < cg_max; ++k) {
      bk_.schur_product(w, w.p, s.cg_active);
      bk_.cg_step(s, w, m_, cur);
      cur = 1 - cur;
      if (may_peek && (k + 1) % bk_.cg_check_interval() == 0 && !any_set(s.cg_active)) {
        cg_issued = k + 1;
        break;
      }
    }
    if (o_.verbose > 1 && !fused) std::fprintf(stderr, "[diffkern.ot] newton    CG iterations issued: %lld\n",
                                     static_cast<long long>(cg_issued));

    // Backtracking line search on Phi along the clipped x: t = 1, 1/4, 1/16, 1/64 and, in
    // tolerance mode, down to 4^-7 (a clipped step of a group that must move by ~eps needs
    // them; issued only when an element is still searching, so well-posed problems, which
    // accept within four, never pay for them). Fixed mode keeps four: its launch sequence is
    // fixed, so every trial would be issued in every round.
    bk_.reduce(m_, SlopeTerm{p_.b, w.c, s.b_scale, w.x, m_, kMaxMove * p_.eps},
               SetSlope{s, stepping, m_, kMaxMove * p_.eps});  // no ascent: the gradient (see there)
    const int trials = fixed ? 4 : 8;
    for (int trial = 0; trial < trials; ++trial) {
      bk_.reduce(m_, TrialPoint{s, st_.g, w.x, p_.b, w.c, w.g_trial, m_, kMaxMove * p_.eps},
                 SetSum{s.phi_trial, s.searching});
      row_update(w.g_trial, w.f_trial, s.searching);
      bk_.reduce(n_, ArrayTerm{w.row_buf, n_}, LineSearchTest{s});
      if (may_peek && !any_set(s.searching)) break;
    }
    bk_.for_each(nm_, AcceptTrials{s, s.newton, w.f_trial, w.g_trial, st_.f, st_.g, n_, m_});
    bk_.for_batch(FinishNewton{s, st_.iterations, st_.newton_steps, !fixed});
  }
};

}  // namespace sinkhorn_detail
}  // namespace diffkern
