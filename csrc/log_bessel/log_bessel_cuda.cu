// CUDA kernels of the log-Bessel family: one thread per output element, grid-stride.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/launch.h"
#include "log_bessel/log_bessel.h"
#include "log_bessel/log_bessel_math.cuh"

namespace diffkern {
namespace {

constexpr int kThreadsPerBlock = 256;

// kContiguous: v and x are laid out like the output (no broadcasting), so the
// per-element offset computation (a division per dimension) is skipped.
// kSecond: the second-derivative ops (autograd's double backward), in a kernel of their
// own so that the value and first-derivative kernel's code and registers stay as they were.
template <class T, bool kContiguous, bool kSecond>
__global__ void __launch_bounds__(kThreadsPerBlock)
    log_bessel_kernel(LogBesselOp op, const T* __restrict__ v, const T* __restrict__ x,
                      T* __restrict__ out, BinaryBroadcast geometry, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    int64_t v_off = i, x_off = i;
    if (!kContiguous) geometry.offsets(i, v_off, x_off);
    if constexpr (kSecond) {
      out[i] = T(log_bessel::evaluate_second(op, double(v[v_off]), double(x[x_off])));
    } else {
      out[i] = log_bessel::evaluate<T>(op, v[v_off], x[x_off]);
    }
  }
}

template <class T, bool kSecond>
void launch_kernel(LogBesselOp op, const T* v, const T* x, T* out, const BinaryBroadcast& g,
                   int64_t n, unsigned blocks, cudaStream_t stream) {
  if (g.inputs_match_output()) {
    log_bessel_kernel<T, true, kSecond><<<blocks, kThreadsPerBlock, 0, stream>>>(op, v, x, out,
                                                                                 g, n);
  } else {
    log_bessel_kernel<T, false, kSecond><<<blocks, kThreadsPerBlock, 0, stream>>>(op, v, x,
                                                                                  out, g, n);
  }
}

template <class T>
Status launch(LogBesselOp op, const T* v, const T* x, T* out, const BinaryBroadcast& g,
              cudaStream_t stream) {
  const int64_t n = g.numel();
  int device = 0, sm_count = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
  const unsigned blocks = grid_stride_blocks(n, kThreadsPerBlock, sm_count);
  if (log_bessel::is_second_derivative_op(op)) {
    launch_kernel<T, true>(op, v, x, out, g, n, blocks, stream);
  } else {
    launch_kernel<T, false>(op, v, x, out, g, n, blocks, stream);
  }
  return last_launch_status();
}

}  // namespace

Status log_bessel_cuda(LogBesselOp op, DType dtype, const void* v, const void* x, void* out,
                       const BinaryBroadcast& geometry, void* stream) {
  if (static_cast<int>(op) < 0 || static_cast<int>(op) >= kNumLogBesselOps) {
    return Status::invalid_argument;
  }
  if (geometry.numel() == 0) return Status::ok;
  if (v == nullptr || x == nullptr || out == nullptr) return Status::invalid_argument;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch<T>(op, static_cast<const T*>(v), static_cast<const T*>(x),
                     static_cast<T*>(out), geometry, s);
  });
}

}  // namespace diffkern
