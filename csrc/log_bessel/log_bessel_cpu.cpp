// CPU kernels of the log-Bessel family: one OpenMP loop over output elements.
#include <cstdint>
#include <cstring>

#include "log_bessel/log_bessel.h"
#include "log_bessel/log_bessel_math.cuh"

#include "common/threads.h"

namespace diffkern {
namespace {

// Binary exponent of a double (biased by 1023), from its bits.
inline int biased_exponent(double a) {
  uint64_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  return static_cast<int>((bits >> 52) & 0x7ff);
}

// Class of one element, 11 bits computed without branches: the predicates that pick
// log_iv's / log_kv's branch (order >= 20, series, x <= 2, Hankel), then the binade of x
// (2^-10 .. 2^21, 32 bins) and a quarter of the range of v (4 bins of 5 binades from
// 2^-7): the branches' loop trip counts follow x and v, so that within a class the
// loop exits repeat from one element to the next and are predicted.
template <class T>
inline int branch_class(T v, T x) {
  using namespace log_bessel;
  const bool large = v >= T(kDebyeMinOrder);
  // (Both sides evaluated and selected with &, |: no branch.)
  const bool series = (large & (x * x <= T(4 * kSeriesMaxQOverV) * (v + T(1)))) |
                      (!large & (x <= T(kSeriesMaxXSmallOrder)));
  const int branch = int(large) | int(series) << 1 | int(x <= T(2)) << 2 |
                     int((x >= T(kHankelMinX)) & (T(2) * x >= v * v)) << 3;
  int ex = biased_exponent(double(x)) - 1023 + 10;
  ex = ex < 0 ? 0 : (ex > 31 ? 31 : ex);
  int ev = (biased_exponent(double(v)) - 1023 + 7) / 5;
  ev = ev < 0 ? 0 : (ev > 3 ? 3 : ev);
  return (branch << 5 | ex) << 2 | ev;
}

constexpr int kNumClasses = 2048;
constexpr int kClassChunk = 4096;

// Elements [begin, end) (end - begin <= kClassChunk) of a contiguous evaluation, one
// class after another: on random inputs the branch taken changes from element to
// element, and its mispredictions cost ~10 ns per element (one thread; measured sorted
// by branch 57-61 vs random 69-70 ns for log_ive), the loop exits a few more. Counting
// sort of the indices by class, then evaluate in that order. Each element still goes
// through evaluate(): results are bit-identical, only the order of evaluation changes.
template <class T, LogBesselOp kOp>
void run_classified(const T* v, const T* x, T* out, int64_t begin, int64_t end) {
  const int m = static_cast<int>(end - begin);
  uint16_t key[kClassChunk];
  uint16_t order[kClassChunk];
  int count[kNumClasses + 1] = {};
  for (int i = 0; i < m; ++i) {
    const int c = branch_class(v[begin + i], x[begin + i]);
    key[i] = static_cast<uint16_t>(c);
    ++count[c + 1];
  }
  for (int c = 0; c < kNumClasses; ++c) count[c + 1] += count[c];
  for (int i = 0; i < m; ++i) order[count[key[i]]++] = static_cast<uint16_t>(i);
  for (int j = 0; j < m; ++j) {
    const int64_t i = begin + order[j];
    out[i] = log_bessel::evaluate<T>(kOp, v[i], x[i]);
  }
}

// The op as a template argument, so that each loop sees its Want flags as constants.
template <class T>
void run_classified(LogBesselOp op, const T* v, const T* x, T* out, int64_t begin,
                    int64_t end) {
  switch (op) {
#define DK_CASE(name) \
  case LogBesselOp::name: run_classified<T, LogBesselOp::name>(v, x, out, begin, end); break;
    DK_CASE(log_iv) DK_CASE(log_kv) DK_CASE(log_ive) DK_CASE(log_kve) DK_CASE(iv_ratio)
    DK_CASE(dlog_iv_dx) DK_CASE(dlog_kv_dx) DK_CASE(dlog_iv_dv) DK_CASE(dlog_kv_dv)
    DK_CASE(iv_ratio_dx) DK_CASE(d2log_iv_dx2) DK_CASE(d2log_kv_dx2)
    DK_CASE(iv_ratio_dx2)
#undef DK_CASE
  }
}

// kContiguous: inputs laid out like the output, no per-element offset arithmetic.
template <class T, bool kContiguous>
void run(LogBesselOp op, const T* v, const T* x, T* out, const BinaryBroadcast& g,
         int num_threads) {
  const int64_t n = g.numel();
  if (kContiguous && n >= 256) {
    const int64_t chunks = (n + kClassChunk - 1) / kClassChunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (n > 2048)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kClassChunk;
      run_classified(op, v, x, out, begin, begin + kClassChunk < n ? begin + kClassChunk : n);
    }
    return;
  }
  // Elements cost from ~50 ns to a few us depending on the branch: dynamic chunks
  // keep threads busy when one region is expensive.
#pragma omp parallel for schedule(dynamic, 1024) num_threads(num_threads) if (n > 2048)
  for (int64_t i = 0; i < n; ++i) {
    int64_t v_off = i, x_off = i;
    if (!kContiguous) g.offsets(i, v_off, x_off);
    out[i] = log_bessel::evaluate<T>(op, v[v_off], x[x_off]);
  }
}

}  // namespace

Status log_bessel_cpu(LogBesselOp op, DType dtype, const void* v, const void* x, void* out,
                      const BinaryBroadcast& geometry, int num_threads) {
  if (static_cast<int>(op) < 0 || static_cast<int>(op) >= kNumLogBesselOps) {
    return Status::invalid_argument;
  }
  if (geometry.numel() == 0) return Status::ok;
  if (v == nullptr || x == nullptr || out == nullptr) return Status::invalid_argument;
  num_threads = resolve_num_threads(num_threads);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* vp = static_cast<const T*>(v);
    const auto* xp = static_cast<const T*>(x);
    auto* op_out = static_cast<T*>(out);
    if (geometry.inputs_match_output()) {
      run<T, true>(op, vp, xp, op_out, geometry, num_threads);
    } else {
      run<T, false>(op, vp, xp, op_out, geometry, num_threads);
    }
    return Status::ok;
  });
}

}  // namespace diffkern
