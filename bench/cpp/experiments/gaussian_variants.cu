// Experiment (METHOD.md: find the floor before optimising): how fast can a fused fp16
// perturb pass be with each way of making its Gaussian z? One tensor of N fp16 elements
// perturbed in place by the grid layout of csrc/fd_grad/fd_grad_cuda.cu (a few blocks per
// SM, contiguous ranges, two groups of 4 in flight per thread), one Philox-4x32-10 call per
// group; only the transform from the 4 random words to 4 values changes:
//   uniform      r >> 8 scaled: the generator and the memory traffic alone
//   rademacher   the sign bit (what fd_grad ships)
//   gaussian     fd::group_directions: the inverse-CDF table (what fd_grad ships)
//   box_muller   fd_grad's first Gaussian: Box-Muller with its own log, sin and cos in
//                single-rounded float operations (no FMA, IEEE div and sqrt), reproducible
//                on the CPU bit for bit
//   box_muller_fma the same polynomials with fused multiply-adds
//   box_muller_mufu __logf / __sincosf / sqrtf approximations: the fastest Box-Muller, but
//                not reproducible on a CPU bit for bit (a lower bound, not a candidate)
// and a device-to-device copy of the same bytes (the floor). Not built by CMake:
//   nvcc -O3 -std=c++17 -arch=sm_90 -I csrc -I bench/cpp \
//        bench/cpp/experiments/gaussian_variants.cu -o gaussian_variants && ./gaussian_variants
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cuda_timer.h"
#include "fd_grad/directions.cuh"

using namespace diffkern;

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

enum class Variant { uniform, rademacher, gaussian, box_muller, box_muller_fma, box_muller_mufu };

__device__ __forceinline__ float log_unit_rn(float u) {
  const uint32_t bits = __float_as_uint(u);
  int e = static_cast<int>(bits >> 23) - 127;
  uint32_t mant = (bits & 0x7fffffu) | 0x3f800000u;
  if (mant > 0x3fb504f3u) {
    mant -= 0x00800000u;
    ++e;
  }
  const float f = __uint_as_float(mant);
  const float s = __fdiv_rn(__fsub_rn(f, 1.0f), __fadd_rn(f, 1.0f));
  const float s2 = __fmul_rn(s, s);
  float p = 1.0f / 9.0f;
  p = __fadd_rn(__fmul_rn(p, s2), 1.0f / 7.0f);
  p = __fadd_rn(__fmul_rn(p, s2), 1.0f / 5.0f);
  p = __fadd_rn(__fmul_rn(p, s2), 1.0f / 3.0f);
  const float log_f = __fadd_rn(__fmul_rn(__fmul_rn(2.0f, s), __fmul_rn(p, s2)), __fmul_rn(2.0f, s));
  const float fe = static_cast<float>(e);
  return __fadd_rn(__fmul_rn(fe, 0.693145751953125f),
                   __fadd_rn(__fmul_rn(fe, 1.4286068203094172e-06f), log_f));
}

__device__ __forceinline__ void cos_sin_rn(uint32_t m, float& c_out, float& s_out) {
  const uint32_t a = m + (1u << 21);
  const uint32_t q = (a >> 22) & 3u;
  const int32_t rem = static_cast<int32_t>(a & 0x3fffffu) - (1 << 21);
  const float x = __fmul_rn(static_cast<float>(rem), 6.2831853071795865f / 16777216.0f);
  const float x2 = __fmul_rn(x, x);
  float sp = 1.0f / 362880.0f;
  sp = __fadd_rn(__fmul_rn(sp, x2), -1.0f / 5040.0f);
  sp = __fadd_rn(__fmul_rn(sp, x2), 1.0f / 120.0f);
  sp = __fadd_rn(__fmul_rn(sp, x2), -1.0f / 6.0f);
  const float s = __fadd_rn(__fmul_rn(__fmul_rn(sp, x2), x), x);
  float cp = -1.0f / 3628800.0f;
  cp = __fadd_rn(__fmul_rn(cp, x2), 1.0f / 40320.0f);
  cp = __fadd_rn(__fmul_rn(cp, x2), -1.0f / 720.0f);
  cp = __fadd_rn(__fmul_rn(cp, x2), 1.0f / 24.0f);
  cp = __fadd_rn(__fmul_rn(cp, x2), -0.5f);
  const float c = __fadd_rn(__fmul_rn(cp, x2), 1.0f);
  switch (q) {
    case 0: c_out = c; s_out = s; break;
    case 1: c_out = -s; s_out = c; break;
    case 2: c_out = -c; s_out = -s; break;
    default: c_out = s; s_out = -c; break;
  }
}

__device__ __forceinline__ float log_unit_fma(float u) {
  const uint32_t bits = __float_as_uint(u);
  int e = static_cast<int>(bits >> 23) - 127;
  uint32_t mant = (bits & 0x7fffffu) | 0x3f800000u;
  if (mant > 0x3fb504f3u) {
    mant -= 0x00800000u;
    ++e;
  }
  const float f = __uint_as_float(mant);
  const float s = __fdiv_rn(f - 1.0f, f + 1.0f);
  const float s2 = s * s;
  float p = fmaf(1.0f / 9.0f, s2, 1.0f / 7.0f);
  p = fmaf(p, s2, 1.0f / 5.0f);
  p = fmaf(p, s2, 1.0f / 3.0f);
  const float two_s = 2.0f * s;
  const float log_f = fmaf(two_s, p * s2, two_s);
  const float fe = static_cast<float>(e);
  return fmaf(fe, 0.693145751953125f, fmaf(fe, 1.4286068203094172e-06f, log_f));
}

__device__ __forceinline__ void cos_sin_fma(uint32_t m, float& c_out, float& s_out) {
  const uint32_t a = m + (1u << 21);
  const uint32_t q = (a >> 22) & 3u;
  const int32_t rem = static_cast<int32_t>(a & 0x3fffffu) - (1 << 21);
  const float x = static_cast<float>(rem) * (6.2831853071795865f / 16777216.0f);
  const float x2 = x * x;
  float sp = fmaf(1.0f / 362880.0f, x2, -1.0f / 5040.0f);
  sp = fmaf(sp, x2, 1.0f / 120.0f);
  sp = fmaf(sp, x2, -1.0f / 6.0f);
  const float s = fmaf(sp * x2, x, x);
  float cp = fmaf(-1.0f / 3628800.0f, x2, 1.0f / 40320.0f);
  cp = fmaf(cp, x2, -1.0f / 720.0f);
  cp = fmaf(cp, x2, 1.0f / 24.0f);
  cp = fmaf(cp, x2, -0.5f);
  const float c = fmaf(cp, x2, 1.0f);
  switch (q) {
    case 0: c_out = c; s_out = s; break;
    case 1: c_out = -s; s_out = c; break;
    case 2: c_out = -c; s_out = -s; break;
    default: c_out = s; s_out = -c; break;
  }
}

template <Variant V>
__device__ __forceinline__ fd::Float4 values(uint64_t seed, uint32_t k, uint64_t j,
                                             const float* table) {
  if constexpr (V == Variant::gaussian) {
    return fd::group_directions(fd::Distribution::gaussian, seed, k, 0, j, table);
  } else if constexpr (V == Variant::rademacher) {
    return fd::group_directions(fd::Distribution::rademacher, seed, k, 0, j, table);
  } else {
    const philox::U32x4 r = fd::group_bits(seed, k, 0, j);
    fd::Float4 z;
    if constexpr (V == Variant::uniform) {
      for (int l = 0; l < 4; ++l) z.v[l] = static_cast<float>(r.v[l] >> 8) * 5.9604644775390625e-08f;
    } else {
      for (int p = 0; p < 2; ++p) {
        const float u = static_cast<float>(((r.v[2 * p] >> 9) << 1) | 1u) * 5.9604644775390625e-08f;
        float c, s, radius;
        if constexpr (V == Variant::box_muller) {
          radius = __fsqrt_rn(__fmul_rn(-2.0f, log_unit_rn(u)));
          cos_sin_rn(r.v[2 * p + 1] >> 8, c, s);
        } else if constexpr (V == Variant::box_muller_fma) {
          radius = __fsqrt_rn(-2.0f * log_unit_fma(u));
          cos_sin_fma(r.v[2 * p + 1] >> 8, c, s);
        } else {
          radius = sqrtf(-2.0f * __logf(u));
          __sincosf(static_cast<float>(r.v[2 * p + 1] >> 8) * (6.2831853071795865f / 16777216.0f), &s, &c);
        }
        z.v[2 * p] = radius * c;
        z.v[2 * p + 1] = radius * s;
      }
    }
    return z;
  }
}

template <Variant V>
__global__ void __launch_bounds__(kThreads)
perturb(__half* data, int64_t groups, int64_t per_block, uint64_t seed, uint32_t k, float scale) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < groups ? begin + per_block : groups;
  __shared__ float table[fd::kGaussianTableFloats];
  for (int i = threadIdx.x; i < fd::kGaussianTableFloats; i += kThreads) table[i] = fd::gaussian_table()[i];
  __syncthreads();
  for (int64_t base = begin + threadIdx.x; base < end; base += kThreads * kUnroll) {
    uint2 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + u * kThreads;
      if (g < end) raw[u] = reinterpret_cast<const uint2*>(data)[g];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + u * kThreads;
      if (g >= end) continue;
      const fd::Float4 z = values<V>(seed, k, static_cast<uint64_t>(g), table);
      __half2* h = reinterpret_cast<__half2*>(&raw[u]);
      for (int p = 0; p < 2; ++p) {
        const float2 x = __half22float2(h[p]);
        h[p] = __floats2half2_rn(x.x + scale * z.v[2 * p], x.y + scale * z.v[2 * p + 1]);
      }
      reinterpret_cast<uint2*>(data)[g] = raw[u];
    }
  }
}

template <Variant V>
bench::CudaTiming run(__half* data, int64_t groups, int sms, cudaStream_t stream) {
  const int64_t pass = kThreads * kUnroll;
  const int64_t passes = (groups + pass - 1) / pass;
  const int64_t blocks = passes < sms * 4 ? passes : sms * 4;
  const int64_t per_block = (passes + blocks - 1) / blocks * pass;
  const unsigned grid = static_cast<unsigned>((groups + per_block - 1) / per_block);
  return bench::time_launches(stream, 3, 20, [&](int i) {
    perturb<V><<<grid, kThreads, 0, stream>>>(data, groups, per_block, 1234, i, 1e-3f);
    DK_BENCH_CUDA(cudaGetLastError());
  });
}

}  // namespace

int main() {
  const int64_t n = 1316L * 1000 * 1000;  // OPT-1.3B-sized, fp16
  const int64_t groups = n / 4;
  __half *data, *dst;
  DK_BENCH_CUDA(cudaMalloc(&data, n * 2));
  DK_BENCH_CUDA(cudaMalloc(&dst, n * 2));
  DK_BENCH_CUDA(cudaMemset(data, 0x2b, n * 2));
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreate(&stream));
  const cudaDeviceProp prop = bench::current_device();
  const bench::CudaTiming copy = bench::time_launches(stream, 3, 20, [&](int) {
    DK_BENCH_CUDA(cudaMemcpyAsync(dst, data, n * 2, cudaMemcpyDeviceToDevice, stream));
  });
  std::printf("%s, %lld fp16 elements\n%-14s %9s %9s\n", prop.name, static_cast<long long>(n),
              "variant", "ms", "of_copy");
  auto row = [&](const char* name, const bench::CudaTiming& t) {
    std::printf("%-14s %9.3f %8.1f%%\n", name, t.median_ms, 100 * copy.median_ms / t.median_ms);
  };
  row("copy", copy);
  row("uniform", run<Variant::uniform>(data, groups, prop.multiProcessorCount, stream));
  row("rademacher", run<Variant::rademacher>(data, groups, prop.multiProcessorCount, stream));
  row("gaussian", run<Variant::gaussian>(data, groups, prop.multiProcessorCount, stream));
  row("box_muller", run<Variant::box_muller>(data, groups, prop.multiProcessorCount, stream));
  row("box_muller_fma", run<Variant::box_muller_fma>(data, groups, prop.multiProcessorCount, stream));
  row("box_muller_mufu", run<Variant::box_muller_mufu>(data, groups, prop.multiProcessorCount, stream));
  return 0;
}
