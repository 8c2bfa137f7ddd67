// log-Bessel family: core entry points (no Python, no torch).
//
// Every op is elementwise over two broadcast inputs, the order v and the argument x,
// of one dtype (float32 or float64), writing one contiguous output of that dtype.
#pragma once
#include <cstdint>

#include "common/broadcast.h"
#include "common/dtype.h"
#include "common/status.h"

namespace diffkern {

// What to compute for each (v, x). The "scaled" forms remove the exponential
// factor exactly (never by subtracting two large numbers).
enum class LogBesselOp : int {
  log_iv = 0,      // log I_v(x)
  log_kv = 1,      // log K_v(x)
  log_ive = 2,     // log I_v(x) - x
  log_kve = 3,     // log K_v(x) + x
  iv_ratio = 4,    // I_{v+1}(x) / I_v(x)
  dlog_iv_dx = 5,  // d/dx log I_v(x)
  dlog_kv_dx = 6,  // d/dx log K_v(x)
  dlog_iv_dv = 7,  // d/dv log I_v(x)   (derivative in the order)
  dlog_kv_dv = 8,  // d/dv log K_v(x)
  // Second derivatives in x, each formed from its branch's own sums (for the
  // autograd of the ops above: the Bessel equation's form of them cancels).
  iv_ratio_dx = 9,     // d/dx (I_{v+1}(x) / I_v(x))
  d2log_iv_dx2 = 10,   // d2/dx2 log I_v(x)
  d2log_kv_dx2 = 11,   // d2/dx2 log K_v(x)
  iv_ratio_dx2 = 12,   // d2/dx2 (I_{v+1}(x) / I_v(x))
};
constexpr int kNumLogBesselOps = 13;

// The ops' names, indexed by LogBesselOp: the bindings export them (LOG_BESSEL_OPS), the
// benchmarks label rows with them. One list, next to the enum it names.
constexpr const char* kLogBesselOpNames[kNumLogBesselOps] = {
    "log_iv",     "log_kv",     "log_ive",    "log_kve",     "iv_ratio",     "dlog_iv_dx",
    "dlog_kv_dx", "dlog_iv_dv", "dlog_kv_dv", "iv_ratio_dx", "d2log_iv_dx2", "d2log_kv_dx2",
    "iv_ratio_dx2"};

// CPU: OpenMP over elements with num_threads threads (<= 0: OpenMP's default).
Status log_bessel_cpu(LogBesselOp op, DType dtype, const void* v, const void* x, void* out,
                      const BinaryBroadcast& geometry, int num_threads);

// CUDA: launches on `stream` (a cudaStream_t) on the current device; never synchronizes.
// Returns Status::unsupported when the library was built without CUDA.
Status log_bessel_cuda(LogBesselOp op, DType dtype, const void* v, const void* x, void* out,
                       const BinaryBroadcast& geometry, void* stream);

}  // namespace diffkern
