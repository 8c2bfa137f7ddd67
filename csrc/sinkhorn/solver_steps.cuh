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

struct SetFloor {  // the sum of b arrives; mass holds the sum of a
  double* floor;
  double* b_scale;
  const double* mass;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    floor[b] = fabs(mass[b] - sum);
    b_scale[b] = mass[b] / sum;
  }
};

struct StartCg {  // rz0 = r.z; CG runs while rz > tol2 * rz0
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    s.rz[0][b] = sum;
    s.rz0[b] = sum;
    s.cg_active[b] = s.newton[b] && sum > 0;
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
      s.rejected[b] = 0;
      s.gain[b] = phi_t - s.phi[b];
      s.by_slack[b] = !(phi_t - s.phi[b] > slack);  // gain not above rounding: unproven
    } else {
      s.step[b] *= 0.25;
    }
  }
};

// The Newton safeguard. A Newton round fails when the line search accepts no trial, when the
// accepted step cannot be trusted (its gain is within rounding, or the error it leaves is not
// finite) and does not lower the error (it is undone), or when it helps less than Sinkhorn
// would in the same time. A round costs the backend about R Sinkhorn iterations
// (Backend::newton_cost(): ~3 on the CPU, where a round is a few passes over the plan; ~16 on
// a GPU, where small problems are launch- and latency-bound and a round issues ~25 launches,
// two host reads and a CG solve against a Sinkhorn iteration's two launches). The round must
// then gain in Phi at least R times eps KL(b'||c) (what the next Sinkhorn iteration gains, an
// upper bound on what each of the R after it would), or divide the error by 2^(R/3) (2 on the
// CPU). After a failure the element runs `backoff`
// Sinkhorn iterations before its next Newton step, and the next failure doubles that, up to
// kBackoffMax; a successful round resets it. Why: where the sparsified Hessian has lost the
// coupling the step needs (near-permutation plans at small eps: every row's mass sits in one
// column, and the kept Schur complement is zero), Newton steps are null or tiny, and an
// element that kept taking them never converged; with the back-off it is Sinkhorn with one
// Newton attempt per doubling block, so it converges whenever Sinkhorn does, at a bounded
// extra cost (one Newton round per kBackoffMax Sinkhorn iterations at worst).
constexpr int kBackoffStart = 10;
constexpr int kBackoffMax = 640;
constexpr double kCpuNewtonCost = 3.0;  // a CPU Newton round costs ~3 Sinkhorn iterations
constexpr double kDeltaStep = 6.907755278982137;  // log(1000)

struct ResetBatch {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.active[b] = 1;
    s.newton[b] = 0;
    s.fallback[b] = 0;
    s.searching[b] = 0;
    s.rejected[b] = 0;
    s.cg_active[b] = 0;
    s.reverted[b] = 0;
    s.by_slack[b] = 0;
    s.sk_left[b] = 0;
    s.backoff[b] = kBackoffStart;
    s.ascent[b] = 0;
    s.delta_shift[b] = 0;
    s.shift[b] = 0;
    s.shifted[b] = 0;
    s.shift_off[b] = 0;
    s.shift_open[b] = 0;
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

// Tolerance-mode check: deactivate finished elements, then pack what the host reads
// (error, active, iterations, fallback) into one report row, so a check is one copy.
// Finished: the error is at most tol, or at most kFloorRatio times the floor |sum a - sum b|
// that no plan can beat (a tol below it is unreachable; the caller reports it), or NaN (NaN
// inputs never recover; the NaN error is reported).
constexpr double kFloorRatio = 2.0;
DK_HOST_DEVICE bool shift_due(const BatchScalars& s, int64_t b, int64_t iterations,
                                     int64_t max_iter);  // the block shift's trigger (below)
struct UpdateActive {
  BatchScalars s;
  const int64_t* iterations;
  double tol;
  int after_chunk;  // the check after a Sinkhorn-phase chunk: also decide the block shift
  int64_t max_iter;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    const double err = s.err[b];
    if (s.active[b] && (!(err > fmax(tol, kFloorRatio * s.floor[b])) || err != err))
      s.active[b] = 0;
    // s.fallback still says who ran the chunk; the trigger rides on this check's one copy.
    s.shift[b] = after_chunk && shift_due(s, b, iterations[b], max_iter);
    s.fallback[b] = s.active[b] && s.sk_left[b] > 0;  // finished elements take none
    double* row = s.report + b * kReportFields;
    row[kReportErr] = err;
    row[kReportActive] = s.active[b];
    row[kReportIterations] = static_cast<double>(iterations[b]);
    row[kReportFallback] = s.fallback[b];
    row[kReportShift] = s.shift[b];
  }
};

// SNS's probe (tolerance mode, cold start). The eps-scaled warm-up and a first Newton round
// cost 20 + R Sinkhorn iterations (R = Backend::newton_cost()), while half of all small
// problems (large eps against the cost's spread, costs that are ~0 or forbidden at eps,
// ties) converge by Sinkhorn within 10: for them SNS was 2x slower on the CPU and up to 4x
// on a GPU. So SNS first runs kProbeIterations plain iterations at eps; an element whose
// last iteration contracted its error fast enough that Sinkhorn is predicted to reach tol
// within kProbeHorizon more iterations (log(target / e2) / log(e2 / e1) <= horizon) is left
// to Sinkhorn for `phase` iterations (then it is due a Newton step if it has not converged,
// from where it is: no eps-scaling); the others take the warm-up. Why the second iteration's
// contraction and not the first's: the first includes the start's transient (the benchmark
// problems contract 2x in it and then need thousands of iterations). On the benchmark
// problems no element is predicted easy: the probe costs them two iterations and a check.
constexpr int64_t kProbeIterations = 2;
constexpr double kProbeHorizon = 8.0;
// The second probe, at Sinkhorn's first check (iteration 10), for the elements the first one
// did not leave to Sinkhorn: there the contraction is past the start's transient, and an
// element is left to Sinkhorn when it is predicted done within what SNS would still spend,
// the rest of the warm-up plus two Newton rounds (2 R iterations: a GPU's R of ~16 makes
// Sinkhorn the faster method up to ~40 more iterations on small problems). Only where a
// Newton round costs more than the CPU's ~3 iterations (small problems on a GPU), and then
// again at every check up to iteration kProbeLastIterations (Sinkhorn's error can drop
// suddenly once the plan's support settles: a replay of 1,500 sweep problems on the CPU with
// the GPU's decisions and a launch-count cost model had 7 problems above 2x with one later
// probe, 2 with probes at 10 and 20, 1 with probes up to 30).
constexpr int64_t kProbeSecondIterations = 10;
constexpr int64_t kProbeLastIterations = 30;

struct KeepErr {  // err_prev = err where mask
  BatchScalars s;
  const int* mask;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (mask[b]) s.err_prev[b] = s.err[b];
  }
};

struct ProbeSinkhorn {
  BatchScalars s;
  const int* mask;  // the elements probed
  double tol;
  double horizon;   // predicted iterations up to which Sinkhorn is left the element
  int phase;        // Sinkhorn iterations an easy element runs before a Newton step
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (!mask[b] || !s.active[b]) return;
    const double e1 = s.err_prev[b], e2 = s.err[b];
    const double target = fmax(tol, kFloorRatio * s.floor[b]);
    // Both logs are negative when e2 < e1 and e2 > target; NaN compares false.
    const bool easy = e2 > 0 && e2 < e1 &&
                      (!(e2 > target) || log(target / e2) >= horizon * log(e2 / e1));
    if (easy) s.sk_left[b] = phase;
  }
};

// Start of a round: Newton step for the elements out of their Sinkhorn phase, Sinkhorn
// iterations for the others; an element at max_iter takes nothing.
struct SelectRound {
  BatchScalars s;
  const int64_t* iterations;
  int64_t max_iter;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.newton[b] = s.active[b] && s.sk_left[b] == 0 && iterations[b] < max_iter;
    s.fallback[b] = s.active[b] && s.sk_left[b] > 0;
  }
};

// Tolerance mode, before a chunk of k Sinkhorn iterations: an element that would pass
// max_iter sits it out (it is ahead of the batch's slowest element, which the chunk fits).
struct LimitChunk {
  BatchScalars s;
  const int64_t* iterations;
  int64_t k, max_iter;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (iterations[b] + k > max_iter) s.fallback[b] = 0;
  }
};

// After k Sinkhorn iterations of the elements in their Sinkhorn phase.
struct CountSinkhornPhase {
  BatchScalars s;
  int64_t k;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    if (!s.fallback[b]) return;
    s.sk_left[b] = s.sk_left[b] > k ? static_cast<int>(s.sk_left[b] - k) : 0;
  }
};

struct StartNewton {  // sparsification tolerance, CG tolerance, line-search state
  BatchScalars s;
  const double* mass;  // (B) sum of a; null: 1
  DK_HOST_DEVICE void operator()(int64_t b) const {
    const double rel = s.err[b] / (mass ? mass[b] : 1.0);
    const double delta = fmin(1e-3, fmax(1e-5, rel));
    s.log_delta[b] = log(delta) + s.delta_shift[b];
    const double eta = fmin(0.1, fmax(rel, 1e-10));
    s.cg_tol2[b] = eta * eta;
    s.step[b] = 1.0;
    s.searching[b] = s.newton[b];
    s.rejected[b] = s.newton[b];  // cleared when a step is accepted
    s.by_slack[b] = 0;
    s.gain[b] = 0;
    s.ascent[b] = 0;
  }
};

// Judges the Newton round (see kBackoffStart): undoes untrusted steps that did not lower
// the error, and starts a Sinkhorn phase after a failed round.
struct JudgeNewton {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  int count_attempts;  // as in FinishNewton: an undone step still counts as an iteration
  double cost;         // what a Newton round costs, in Sinkhorn iterations (see above)
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.reverted[b] = 0;
    if (!s.newton[b]) return;
    const double err = s.err[b], prev = s.err_prev[b];
    bool failed = s.rejected[b] != 0;
    if (!failed && (s.by_slack[b] || !(fabs(err) < INFINITY)) && !(err < prev)) {
      s.reverted[b] = 1;
      s.err[b] = prev;
      if (!count_attempts) iterations[b] -= 1;
      newton_steps[b] -= 1;
      failed = true;
    } else if (!failed) {
      const bool shrunk = err <= exp2(-cost / kCpuNewtonCost) * prev;  // halved on the CPU
      const bool gained = !s.by_slack[b] && s.gain[b] >= cost * s.sk_gain[b];
      failed = !(shrunk || gained);
    }
    // This round's Sinkhorn iteration (fixed mode) only where the step did nothing; a kept
    // step was this round's iteration, and its Sinkhorn phase starts next round.
    s.fallback[b] = s.rejected[b] || s.reverted[b];
    if (failed) {
      // The sparsified Hessian may lack what the step needs (near convergence on a
      // near-permutation plan, the groups are coupled through entries below delta): keep
      // 1000 times smaller entries from now on, down to all above exp(kMinLogKept).
      s.delta_shift[b] = fmax(s.delta_shift[b] - kDeltaStep, -1000.0);
      s.sk_left[b] = s.backoff[b];
      s.backoff[b] = s.backoff[b] < kBackoffMax ? 2 * s.backoff[b] : kBackoffMax;
    } else {
      s.backoff[b] = kBackoffStart;
    }
    s.shifted[b] = 0;
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

// Counts the round: an accepted step is a Newton step and an iteration. A failed attempt
// counts as an iteration too in tolerance mode (it costs about as much, and elements of a
// batch then advance together, so none is cut off far below max_iter by the others); in
// fixed mode it does not, since the Sinkhorn iteration it is replaced by is the round's one.
struct FinishNewton {
  BatchScalars s;
  int64_t* iterations;
  int64_t* newton_steps;
  int count_attempts;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.searching[b] = 0;
    if (!s.newton[b]) return;
    if (!s.rejected[b]) newton_steps[b] += 1;
    if (!s.rejected[b] || count_attempts) iterations[b] += 1;
  }
};

// ------------------------------------------------------------------- block shift
// After a Sinkhorn chunk of an element's Sinkhorn phase that did not halve the error
// (tolerance mode). Where a small block of rows and columns has
// far less (or more) row mass than its columns need and is coupled to the rest only through
// plan entries below what the sparsified Hessian keeps (below exp(kMinLogKept)), Newton sees
// no direction that feeds it, and Sinkhorn translates the block's potentials by a constant
// per iteration (eps log(b_J / a_I): 2-3 eps on the sweep's #8957) until the coupling, which
// grows by that factor per iteration, supplies the missing mass: a plateau of tens of
// iterations at a fixed error, then a sudden drop. Several such blocks move at different
// speeds and need different shifts, so no single step length along Sinkhorn's displacement
// fits them all. The shift moves each starved (or flooded) column j along its own Sinkhorn
// direction x_j = eps log(b'_j / c_j) by its own multiple tau_j: a per-column search on the
// sign of the partial derivative dPhi/dg_j = b'_j - c_j (Phi concave): tau_j starts at
// kShiftFirst and grows by kShiftGrowth per trial while the column stays short (long), then
// is bisected geometrically once it has crossed, until the bracket is kShiftPrecision eps
// wide or its ends are within a ratio kShiftRatio; all columns are searched at once (one row
// update and one column measure per trial, for all of them), which is exact for blocks that
// do not see each other and an approximation otherwise. Geometric: the coupling that ends the
// plateau grows exponentially with the move, so the crossing's distance is known to a factor
// first, and a tighter bracket saves fewer Sinkhorn iterations than its trials cost (on a GPU
// a trial is ~4 launches and a host read, ~3 Sinkhorn iterations). The point g + tau_lo x
// (the crossing's safe side) is then accepted only where it raises Phi above rounding and by
// at least what the shift's iterations would have gained as Sinkhorn iterations
// (eps KL(b'||c) each; halving all tau once more if not), so every accepted shift is an
// ascent step of the same concave
// objective. The Sinkhorn phase then goes on as it would have; one search per Newton round
// (`shifted`), so it adds at most kShiftTrials + kShiftFinal iterations to a back-off phase
// and JudgeNewton's bound on the work still holds. A search that fails (rejected, or the
// error did not fall) says the per-column picture does not fit this problem: none follows in
// the same solve (`shift_off`), so a problem that is merely slow pays for one search at most.
// Candidates: columns off by a factor e or more (|log(b'_j / c_j)| >= kShiftMinLog) that
// carry at least kShiftMinShare of the error; the search runs only where they carry at least
// kShiftMinTotal of it (half the L1 error is the most a set of short columns can carry: the
// plan's mass they lack sits on the others). Each trial counts as an iteration.
// The most a Newton direction (SlopeTerm, below) or a shift direction moves a column, in eps.
constexpr double kMaxMove = 200.0;
constexpr double kShiftMinLog = 1.0;
constexpr double kShiftMinShare = 0.05;
constexpr double kShiftMinTotal = 0.25;
constexpr double kShiftPrecision = 2.0;   // in eps
constexpr double kShiftFirst = 16.0;      // first trial: tau (Sinkhorn iterations on a plateau)
constexpr double kShiftGrowth = 4.0;      // bracket growth per trial while not crossed
constexpr double kShiftRatio = 1.5;       // the bracket is closed once hi <= kShiftRatio lo
constexpr double kShiftMaxMove = 2000.0;  // in eps: no column moves further
constexpr int kShiftTrials = 8;           // bracket trials (each a row update and a measure)
constexpr int kShiftFinal = 2;            // acceptance tests at tau_lo, tau_lo / 2
constexpr double kShiftWorth = 1.0;     // gain wanted: this many times its iterations' Sinkhorn gain

// After a Sinkhorn-phase chunk (err_prev: the error before it), at its check: a chunk that
// did not halve the error is flat.
constexpr double kShiftFlat = 0.5;
DK_HOST_DEVICE bool shift_due(const BatchScalars& s, int64_t b, int64_t iterations,
                                     int64_t max_iter) {
  return s.fallback[b] && s.active[b] && !s.shifted[b] && !s.shift_off[b] &&
         s.err[b] > kShiftFlat * s.err_prev[b] &&
         iterations + kShiftTrials + kShiftFinal <= max_iter;
}

// One look per Newton round (`shifted`), with or without candidates; err_prev: the error at
// the start, to judge the search by.
struct StartShift {
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.shift_open[b] = 0;
    if (!s.shift[b]) return;
    s.shifted[b] = 1;
    s.err_prev[b] = s.err[b];
    s.gain[b] = 0;  // counts the shift's trials (free outside Newton rounds)
  }
};

// x_j = eps log(b'_j / c_j) on the candidate columns (0 elsewhere), tau = kShiftFirst (within
// kShiftMaxMove), lo = 0, hi = inf; the term is the candidate's error.
struct ShiftDirection {
  BatchScalars s;
  const double *b_w, *c;
  double *x, *tau, *lo, *hi;
  int64_t m;
  double eps;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    if (!s.shift[b]) return 0.0;
    const int64_t k = b * m + j;
    const double bj = b_w[k] * s.b_scale[b], cj = c[k];
    double xj = 0, term = 0;
    if (bj > 0) {
      const double l = cj > 0 ? log(bj / cj) : INFINITY;
      const double e = fabs(bj - cj);
      if (fabs(l) >= kShiftMinLog && e >= kShiftMinShare * s.err[b]) {  // NaN: no
        xj = eps * fmax(-kMaxMove, fmin(kMaxMove, l));  // c_j = 0: the cap
        term = e;
      }
    }
    x[k] = xj;
    tau[k] = xj != 0 ? fmin(kShiftFirst, kShiftMaxMove * eps / fabs(xj)) : 0.0;
    lo[k] = 0.0;
    hi[k] = INFINITY;
    return term;
  }
};

struct ShiftSelect {  // the candidates carry enough of the error
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    if (!s.shift[b]) return;
    s.shift[b] = sum > 0 && sum >= kShiftMinTotal * s.err[b];
    s.shift_open[b] = s.shift[b];
  }
};

// g_trial = g + scale tau x where mask (tau: the bracket trial; or lo, for the final test,
// with scale = s.step); the term is g_trial b' (Phi's column part).
struct ShiftPoint {
  BatchScalars s;
  const int* mask;
  const double *g, *x, *tau, *b_w;
  double* g_trial;
  int64_t m;
  bool scaled;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    if (!mask[b]) return 0.0;
    const int64_t k = b * m + j;
    const double t = scaled ? s.step[b] * tau[k] : tau[k];
    const double xj = x[k];
    const double gt = xj != 0 ? g[k] + t * xj : g[k];  // -inf stays -inf
    g_trial[k] = gt;
    return b_w[k] > 0 ? gt * b_w[k] * s.b_scale[b] : 0.0;
  }
};

// One bracket trial's verdict per column, from the column sums q at the trial point: still
// on the start's side of b'_j (lo = tau) or across (hi = tau); next tau. A column that the
// first trial (tau = kShiftFirst) takes across is behind no plateau worth a search: on a
// plateau Sinkhorn moves the block by about x_j per iteration, so it is within kShiftFirst
// Sinkhorn iterations of its crossing, about what the search would cost; its bracket closes
// at lo = 0 and it stays where it is (Sinkhorn fixes it). The term is +1 where the
// bracket is still open and -1 where it is closed at lo > 0 (a shift to test), 0 elsewhere,
// so the epilogue gets both counts from the sum and the sum of |terms|.
struct ShiftBracket {
  BatchScalars s;
  const double *b_w, *q, *x;
  double *tau, *lo, *hi;
  int64_t m;
  double eps;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    if (!s.shift_open[b]) return 0.0;
    const int64_t k = b * m + j;
    const double xj = x[k];
    if (xj == 0) return 0.0;
    const double r = b_w[k] * s.b_scale[b] - q[k];
    const bool keep = xj > 0 ? r > 0 : r < 0;  // NaN: across
    const double t = tau[k];
    if (keep) {
      lo[k] = t;
    } else {
      hi[k] = t;
    }
    const double ax = fabs(xj);
    if (!(hi[k] < INFINITY)) {
      if (kShiftGrowth * t * ax > kShiftMaxMove * eps) {
        hi[k] = t;  // as far as it may go: closed at lo = t
        return -1.0;
      }
      tau[k] = kShiftGrowth * t;
      return 1.0;
    }
    const double l = lo[k], h = hi[k];
    if (!(l > 0)) return 0.0;  // across at the first trial: no plateau worth a search
    tau[k] = sqrt(l * h);
    return (h - l) * ax > kShiftPrecision * eps && h > kShiftRatio * l ? 1.0 : -1.0;
  }
};

// Open: some column's bracket is; an element none of whose columns is behind a plateau has
// nothing to test: its search ends as failed (see FinishShift). Also counts the trial as an
// iteration (no launch of its own).
struct ShiftOpen {
  BatchScalars s;
  int64_t* iterations;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double abs_sum) const {
    if (!s.shift_open[b]) return;
    s.gain[b] += 1;
    iterations[b] += 1;
    const double open = 0.5 * (abs_sum + sum), to_test = 0.5 * (abs_sum - sum);
    s.shift_open[b] = open > 0;
    if (!(open > 0) && !(to_test > 0)) s.shift_off[b] = 1;
  }
};

// The final tests: step 1 (tau_lo), searching, rejected until accepted; none where the
// bracket search left nothing to test.
struct StartShiftTest {
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.step[b] = 1.0;
    s.searching[b] = s.shift[b] && !s.shift_off[b];
    s.rejected[b] = s.shift[b];
  }
};

// Phi at the shifted point (the row part arrives; phi_trial holds the column part) must be
// above Phi at the start by more than rounding; else halve the shift. The test counts as an
// iteration.
struct ShiftTest {
  BatchScalars s;
  int64_t* iterations;
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double abs_sum) const {
    if (!s.searching[b]) return;
    iterations[b] += 1;
    const double phi_t = s.phi_trial[b] + sum;
    const double slack = 1e-13 * (s.phi_scale[b] + abs_sum);
    s.gain[b] += 1;
    // Worth its trials: it gains more than the Sinkhorn iterations they cost would (each
    // gains at most sk_gain = eps KL(b'||c) at the start, as in JudgeNewton).
    if (phi_t > s.phi[b] + slack && phi_t - s.phi[b] >= kShiftWorth * s.gain[b] * s.sk_gain[b]) {
      s.searching[b] = 0;
      s.rejected[b] = 0;
    } else {
      s.step[b] *= 0.5;
    }
  }
};

// After the search's measure. One search (accepted or not) per Newton round: no second one
// before the next round, so a search costs at most kShiftTrials + kShiftFinal iterations per
// Newton round. The Sinkhorn phase goes on (its length, the back-off, is what bounds the
// Newton rounds' share of work), for at least a chunk after a shift that lowered the error:
// the shift stops on the crossing's safe side and leaves the plateau's end to Sinkhorn
// (Newton, which could not see the blocks' coupling before, cannot now either). A failed
// search (rejected, or accepted without lowering the error) ends the shifts for this solve.
struct FinishShift {
  BatchScalars s;
  DK_HOST_DEVICE void operator()(int64_t b) const {
    s.searching[b] = 0;
    if (!s.shift[b]) return;
    if (s.rejected[b] || !(s.err[b] < s.err_prev[b])) {
      s.shift_off[b] = 1;
    } else if (s.sk_left[b] < kBackoffStart) {
      s.sk_left[b] = kBackoffStart;
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

// f_i a_i (0 where a_i = 0): one part of Phi; with `scale`, g_j b_j sum(a) / sum(b).
// Newton's Phi uses b' = b sum(a) / sum(b) (as its right-hand side does): with unequal
// masses the true Phi grows without bound along constant shifts of g (by k (sum b - sum a)),
// which the plan does not see, and the safeguard counted that drift as progress (a problem
// took 10^5 "successful" Newton steps at a fixed error). Phi with b' is shift-invariant.
struct PotentialTerm {
  const double *f, *a;
  int64_t n;
  const double* scale = nullptr;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t i) const {
    const int64_t k = b * n + i;
    return a[k] > 0 ? f[k] * a[k] * (scale ? scale[b] : 1.0) : 0.0;
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
// preconditioner and start CG: x = 0, r = eps (b' - c), z = M r, p = z; the term is r.z.
// b' = b sum a / sum b: the Schur complement is singular along the constants (a shift of g
// moves no mass), so the right-hand side must sum to zero; with sum a != sum b (allowed to a
// relative 1e-6) eps (b - c) does not, and its constant part, amplified by the sparsified
// system's near-null direction, made Newton steps oscillate around the floor |sum a - sum b|.
struct StartCgVectors {
  const double *b_w, *c, *b_scale;
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
    r[k] = (b_w[k] > 0) ? eps * (b_w[k] * b_scale[b] - c[k]) : 0.0;
    z[k] = precond[k] * r[k];
    p[k] = z[k];
    return r[k] * z[k];
  }
};

// eps KL(b || c) = eps sum_j (b_j log(b_j / c_j) - b_j + c_j): the gain in Phi of a column
// update, so one Sinkhorn iteration gains at least this much (the row update adds more).
struct KlTerm {  // with b' = b sum(a) / sum(b), as PotentialTerm
  const double *b_w, *c, *scale;
  int64_t m;
  double eps;
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    const double bj = b_w[k] * scale[b], cj = c[k];
    return bj > 0 ? eps * (bj * log(bj / cj) - bj + cj) : eps * cj;
  }
};

// The Newton direction is first clipped to |x_j| <= kMaxMove * eps, then the term is
// (b - c) . x. Why: where groups of rows and columns are coupled only through entries far
// below the sparsification threshold (degenerate costs at small eps), the sparsified
// Schur complement is nearly singular and CG returns a shift of whole groups by 1e7-1e14
// eps, which every line-search trial overshoots. Clipped, the step moves those groups by
// up to kMaxMove * eps (a Sinkhorn update of a starved column moves it by eps log(b/c),
// hundreds of eps at small eps), and the line search's trials go down to kMaxMove / 4^7 eps:
// a block Sinkhorn update where Newton cannot see the block.
// Steps on well-posed problems move by at most ~10 eps (measured on the benchmark
// problems), so the clip leaves them alone. (kMaxMove is defined with the block shift,
// which clips its directions the same way.)
struct SlopeTerm {  // (b' - c) . x, b' as in PotentialTerm
  const double *b_w, *c, *scale;
  double* x;
  int64_t m;
  double cap;  // kMaxMove * eps
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    const double v = x[k];
    const double xc = v > cap ? cap : (v < -cap ? -cap : v);  // NaN stays NaN (rejected)
    x[k] = xc;
    return (b_w[k] > 0) ? (b_w[k] * scale[b] - c[k]) * xc : 0.0;
  }
};

// Safeguard on the direction. With the Hessian negative definite on the moves that change the
// plan, Newton's direction is an ascent direction of Phi ((b' - c) . x > 0) and stays one when
// clipped. Where the sparsified Schur complement is singular beyond its constant null
// direction (a block of rows and columns whose coupling to the rest is below exp(-70): its
// columns' Schur diagonal is c_j - c_j, i.e. rounding), CG's component along that direction is
// noise of either sign, ~1e11 eps; clipped, it is +-kMaxMove eps, and with the wrong sign every
// trial loses. That was a whole class of stalls: the element fell back to Sinkhorn, which moves
// such a rigid block by ~eps (b_j - c_j) / c_j per iteration (on one 3 x 3 problem, 0.03 eps
// per iteration for a block that had to move 72 eps: 600 iterations on a plateau, while the
// steps below take 8 rounds). So a round whose clipped direction is no ascent direction steps
// along the gradient instead, scaled so that its largest entry is at most kMaxMove eps:
// y_j = kMaxMove eps (b'_j - c_j) / E, E = err + floor >= sum_j |b'_j - c_j| >= max_j |.|; the
// line search's trials then move the block by kMaxMove eps / 4^k, and the round is judged as
// any other (a gain of 3 Sinkhorn iterations' worth, or the error halved). Its slope is
// sum_j (b'_j - c_j) y_j = kMaxMove eps |b' - c|_2^2 / E >= kMaxMove eps (err - floor)^2 /
// (E m), the value used for the Armijo test (a lower bound: the test only gets weaker).
struct SetSlope {
  BatchScalars s;
  const int* mask;
  int64_t m;
  double cap;  // kMaxMove * eps
  DK_HOST_DEVICE void operator()(int64_t b, double sum, double) const {
    if (!mask[b]) return;
    if (sum > 0) {
      s.slope[b] = sum;
      s.ascent[b] = 0;
      return;
    }
    const double e = s.err[b], fl = s.floor[b], d = fmax(e - fl, 0.0);
    s.ascent[b] = 1;
    s.slope[b] = e + fl > 0 ? cap * d * d / ((e + fl) * static_cast<double>(m)) : 0.0;  // NaN stays
  }
};

struct TrialPoint {  // g' = g + t x (or t y, see SetSlope); the term is g'_j b'_j
  BatchScalars s;
  const double *g, *x, *b_w, *c;
  double* g_trial;
  int64_t m;
  double cap;  // kMaxMove * eps
  DK_HOST_DEVICE double operator()(int64_t b, int64_t j) const {
    const int64_t k = b * m + j;
    if (!s.searching[b]) return 0.0;
    double dir = x[k];
    if (s.ascent[b]) {
      const double e = s.err[b] + s.floor[b];
      dir = e > 0 ? cap * (b_w[k] * s.b_scale[b] - c[k]) / e : 0.0;
    }
    const double gt = g[k] + s.step[b] * dir;  // -inf stays -inf
    g_trial[k] = gt;
    return b_w[k] > 0 ? gt * b_w[k] * s.b_scale[b] : 0.0;  // b', as in PotentialTerm
  }
};

// (f, g) = the trial point where an element that took part (`taking`: s.newton for a Newton
// step, s.shift for a block shift) accepted it. Over k < max(n, m).
struct AcceptTrials {
  BatchScalars s;
  const int* taking;
  const double *f_trial, *g_trial;
  double *f, *g;
  int64_t n, m;
  DK_HOST_DEVICE void operator()(int64_t b, int64_t k) const {
    if (!taking[b] || s.rejected[b]) return;
    if (k < n) f[b * n + k] = f_trial[b * n + k];
    if (k < m) g[b * m + k] = g_trial[b * m + k];
  }
};

}  // namespace sinkhorn_detail
}  // namespace diffkern
