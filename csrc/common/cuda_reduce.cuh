// Warp and block reductions for the CUDA kernels, in a fixed order so results are
// deterministic (same bits run to run), and the per-batch reduction kernels built on them.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace diffkern {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over the 32 lanes of a warp, result in every lane (butterfly: fixed order).
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFullWarpMask, v, off);
  return v;
}

// Sum over a block of kThreads threads (a multiple of 32), result in every thread.
// `scratch` holds kThreads / 32 doubles of shared memory; the leading barrier lets a caller
// reuse it in back-to-back calls.
template <int kThreads>
__device__ double block_sum(double v, double* scratch) {
  static_assert(kThreads % 32 == 0, "block_sum needs whole warps");
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];  // same order in every thread
  return total;
}

// One block per batch element b: sums term(b, k) and |term(b, k)| over k < len in a fixed
// order, then calls epilogue(b, sum, abs_sum) from thread 0. Launch with kThreads threads.
template <int kThreads, class Term, class Epilogue>
__global__ void __launch_bounds__(kThreads) batch_reduce_kernel(int64_t len, Term term,
                                                                Epilogue epilogue) {
  __shared__ double scratch[kThreads / 32];
  const int64_t b = blockIdx.x;
  double sum = 0, abs_sum = 0;
  for (int64_t k = threadIdx.x; k < len; k += kThreads) {
    const double x = term(b, k);
    sum += x;
    abs_sum += fabs(x);
  }
  sum = block_sum<kThreads>(sum, scratch);
  abs_sum = block_sum<kThreads>(abs_sum, scratch);
  if (threadIdx.x == 0) epilogue(b, sum, abs_sum);
}

// f(b, k) for every (b, k) of a (batch, len) index space, grid-stride.
template <class F>
__global__ void for_each_index_kernel(int64_t total, int64_t len, F f) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(t / len, t % len);
}

// f(b) for every batch element.
template <class F>
__global__ void for_batch_kernel(int64_t batch, F f) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) f(b);
}

}  // namespace diffkern
