// Experiment (METHOD.md: predict, then measure before changing the contract): a fused fp16
// perturb pass where each element takes 16 random bits instead of 32, so one
// Philox-4x32-10 call serves 8 elements (one 16-byte unit of fp16) instead of 4, and the
// Gaussian is one table lookup (15 magnitude bits -> |z|, the sign bit -> sign) instead of
// the cubic per cell of the 31-bit map fd_grad had before (measured here as ship_* before
// the change: 52% and 88% of copy; the ship_* rows now run the shipped 16-bit map). One tensor of N fp16 elements, perturbed in
// place, the grid layout of csrc/fd_grad/fd_grad_cuda.cu (one wave of blocks, contiguous
// ranges, 16-byte units, the next unit loaded before the generator runs). Variants:
//   ship_gaussian   fd::group_directions (what fd_grad ships) with its table
//   ship_rademacher fd::group_directions, Rademacher
//   u16_uniform     8 per call, 16-bit uniforms: the generator and memory alone
//   u16_rademacher  8 per call, sign bits
//   u16_gauss_h     8 per call, |z| from a 32768-entry fp16 table in shared memory (64 KB)
//   u16_gauss_f     8 per call, |z| from a 16384-entry fp32 table (64 KB; 14 bits used)
//   u16_gauss_h_x4  as u16_gauss_h with 4 units per thread in flight
// and a device-to-device copy of the same bytes (the floor). Not built by CMake:
//   nvcc -O3 -std=c++17 -arch=sm_90 -I csrc -I bench/cpp \
//        bench/cpp/experiments/gaussian16_variants.cu -o gaussian16_variants
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cuda_timer.h"
#include "fd_grad/directions.cuh"

using namespace diffkern;

namespace {

constexpr int kThreads = 256;
enum class V { ship_gaussian, ship_rademacher, u16_uniform, u16_rademacher, u16_gauss_h, u16_gauss_f };

constexpr int kHalfEntries = 32768;   // 15 magnitude bits, fp16
constexpr int kFloatEntries = 16384;  // 14 magnitude bits, fp32

__global__ void fill_tables(__half* th, float* tf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < kHalfEntries)  // |z| at the middle of cell i of 2^15 equally likely cells
    th[i] = __float2half_rn(static_cast<float>(normcdfinv(0.5 + 0.5 * (i + 0.5) / kHalfEntries)));
  if (i < kFloatEntries)
    tf[i] = static_cast<float>(normcdfinv(0.5 + 0.5 * (i + 0.5) / kFloatEntries));
}

template <V v>
__device__ __forceinline__ void eight_values(uint64_t seed, uint32_t k, uint64_t unit,
                                             const void* table, float (&z)[8]) {
  if constexpr (v == V::ship_gaussian || v == V::ship_rademacher) {
    constexpr fd::Distribution d =
        v == V::ship_gaussian ? fd::Distribution::gaussian : fd::Distribution::rademacher;
    const fd::Float8 a = fd::group_directions(d, seed, k, 0, unit, static_cast<const uint16_t*>(table));
#pragma unroll
    for (int l = 0; l < 8; ++l) z[l] = a.v[l];
  } else {
    const philox::U32x4 r = fd::group_bits(seed, k, 0, unit);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t bits = (r.v[w] >> (16 * h)) & 0xffffu;
        float x;
        if constexpr (v == V::u16_uniform) {
          x = static_cast<float>(bits) * (1.0f / 65536.0f);
        } else if constexpr (v == V::u16_rademacher) {
          x = (bits & 0x8000u) ? -1.0f : 1.0f;
        } else if constexpr (v == V::u16_gauss_h) {
          const float m = __half2float(static_cast<const __half*>(table)[bits & 0x7fffu]);
          x = __uint_as_float(__float_as_uint(m) | ((bits & 0x8000u) << 16));
        } else {
          const float m = static_cast<const float*>(table)[bits & 0x3fffu];
          x = __uint_as_float(__float_as_uint(m) | ((bits & 0x8000u) << 16));
        }
        z[2 * w + h] = x;
      }
    }
  }
}

template <V v, int kInFlight>
__global__ void __launch_bounds__(kThreads)
perturb(uint4* data, int64_t units, int64_t per_block, uint64_t seed, uint32_t k, float scale,
        const void* gtable) {
  extern __shared__ __align__(16) unsigned char smem[];
  const void* table = nullptr;
  if constexpr (v == V::ship_gaussian || v == V::u16_gauss_h || v == V::u16_gauss_f) {
    const uint4* src = v == V::ship_gaussian ? reinterpret_cast<const uint4*>(fd::gaussian_table())
                                             : static_cast<const uint4*>(gtable);
    uint4* t = reinterpret_cast<uint4*>(smem);
    for (int i = threadIdx.x; i < 65536 / 16; i += kThreads) t[i] = src[i];
    table = t;
  }
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < units ? begin + per_block : units;
  uint4 cur[kInFlight];
#pragma unroll
  for (int i = 0; i < kInFlight; ++i) {
    const int64_t u = begin + threadIdx.x + i * kThreads;
    if (u < end) cur[i] = data[u];
  }
  for (int64_t base = begin + threadIdx.x; base < end; base += kThreads * kInFlight) {
    uint4 next[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int64_t u = base + (kInFlight + i) * kThreads;
      if (u < end) next[i] = data[u];
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int64_t u = base + i * kThreads;
      if (u >= end) continue;
      float z[8];
      eight_values<v>(seed, k, static_cast<uint64_t>(u), table, z);
      __half2* h = reinterpret_cast<__half2*>(&cur[i]);
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float2 x = __half22float2(h[p]);
        h[p] = __floats2half2_rn(x.x + scale * z[2 * p], x.y + scale * z[2 * p + 1]);
      }
      data[u] = cur[i];
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) cur[i] = next[i];
  }
}

template <V v, int kInFlight>
bench::CudaTiming run(uint4* data, int64_t units, int sms, cudaStream_t stream, const void* table) {
  const size_t smem = (v == V::ship_gaussian || v == V::u16_gauss_h || v == V::u16_gauss_f) ? 65536 : 0;
  DK_BENCH_CUDA(cudaFuncSetAttribute(perturb<v, kInFlight>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, 65536));
  int per_sm = 0;
  DK_BENCH_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, perturb<v, kInFlight>,
                                                              kThreads, smem));
  const int64_t pass = kThreads * kInFlight;
  const int64_t passes = (units + pass - 1) / pass;
  const int64_t wave = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int64_t blocks = passes < wave ? passes : wave;
  const int64_t per_block = (passes + blocks - 1) / blocks * pass;
  const unsigned grid = static_cast<unsigned>((units + per_block - 1) / per_block);
  std::printf("  (%d blocks/SM, %u blocks, smem %zu)\n", per_sm, grid, smem);
  return bench::time_launches(stream, 3, 20, [&](int i) {
    perturb<v, kInFlight><<<grid, kThreads, smem, stream>>>(data, units, per_block, 1234, i,
                                                            1e-3f, table);
    DK_BENCH_CUDA(cudaGetLastError());
  });
}

}  // namespace

int main() {
  const int64_t n = 1316L * 1000 * 1000;  // OPT-1.3B-sized, fp16
  const int64_t units = n / 8;
  uint4 *data, *dst;
  DK_BENCH_CUDA(cudaMalloc(&data, n * 2));
  DK_BENCH_CUDA(cudaMalloc(&dst, n * 2));
  DK_BENCH_CUDA(cudaMemset(data, 0x2b, n * 2));
  __half* th;
  float* tf;
  DK_BENCH_CUDA(cudaMalloc(&th, 65536));
  DK_BENCH_CUDA(cudaMalloc(&tf, 65536));
  fill_tables<<<kHalfEntries / 256, 256>>>(th, tf);
  DK_BENCH_CUDA(cudaDeviceSynchronize());
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreate(&stream));
  const cudaDeviceProp prop = bench::current_device();
  const int sms = prop.multiProcessorCount;
  const bench::CudaTiming copy = bench::time_launches(stream, 3, 20, [&](int) {
    DK_BENCH_CUDA(cudaMemcpyAsync(dst, data, n * 2, cudaMemcpyDeviceToDevice, stream));
  });
  std::printf("%s, %lld fp16 elements\n%-18s %9s %9s\n", prop.name, static_cast<long long>(n),
              "variant", "ms", "of_copy");
  auto row = [&](const char* name, const bench::CudaTiming& t) {
    std::printf("%-18s %9.3f %8.1f%%\n", name, t.median_ms, 100 * copy.median_ms / t.median_ms);
  };
  row("copy", copy);
  row("ship_gaussian", run<V::ship_gaussian, 1>(data, units, sms, stream, nullptr));
  row("ship_gaussian_x2", run<V::ship_gaussian, 2>(data, units, sms, stream, nullptr));
  row("ship_rademacher", run<V::ship_rademacher, 1>(data, units, sms, stream, nullptr));
  row("u16_uniform", run<V::u16_uniform, 1>(data, units, sms, stream, nullptr));
  row("u16_uniform_x2", run<V::u16_uniform, 2>(data, units, sms, stream, nullptr));
  row("u16_rademacher", run<V::u16_rademacher, 1>(data, units, sms, stream, nullptr));
  row("u16_gauss_h", run<V::u16_gauss_h, 1>(data, units, sms, stream, th));
  row("u16_gauss_h_x2", run<V::u16_gauss_h, 2>(data, units, sms, stream, th));
  row("u16_gauss_h_x4", run<V::u16_gauss_h, 4>(data, units, sms, stream, th));
  row("u16_gauss_f", run<V::u16_gauss_f, 1>(data, units, sms, stream, tf));
  row("u16_gauss_f_x2", run<V::u16_gauss_f, 2>(data, units, sms, stream, tf));
  return 0;
}
