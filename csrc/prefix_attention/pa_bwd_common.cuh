// Shared parts of the backward kernels (pa_bwd.cuh describes the passes): block shape,
// and the delta = rowsum(dO * O) preprocess kernel.
#pragma once
#include "common/cuda_check.cuh"
#include "common/launch.h"
#include "prefix_attention/pa_device.cuh"
#include "prefix_attention/pa_kernels.h"

namespace diffkern {
namespace pa {

constexpr int kBwdThreads = 128;  // 4 warps
constexpr int kBwdTile = 64;      // BM = BN = 64 in both backward kernels

template <class T>
__device__ __forceinline__ float load_f(const uint16_t* ptr) {
  return to_compute(T{*ptr});
}

template <class T, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const PrefixAttentionBackward p,
                                                        float* delta) {
  const int64_t rows = p.shape.total_tokens * p.shape.num_heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t tok = row / p.shape.num_heads_q;
  const int h = static_cast<int>(row % p.shape.num_heads_q);
  const uint16_t* o = static_cast<const uint16_t*>(p.out.data) + tok * p.out.token_stride +
                      h * p.out.head_stride;
  const uint16_t* d = static_cast<const uint16_t*>(p.dout.data) + tok * p.dout.token_stride +
                      h * p.dout.head_stride;
  float acc = 0.f;
  for (int i = lane; i < D; i += 32) acc += load_f<T>(o + i) * load_f<T>(d + i);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[h * p.shape.total_tokens + tok] = acc;
}

}  // namespace pa
}  // namespace diffkern
