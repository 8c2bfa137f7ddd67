// Checks the Hopper forward's wgmma building blocks (pa_wgmma.cuh) alone, on one
// warpgroup: S = Q K^T with both operands K-major from 128-byte-swizzled shared memory, and
// O = P V with P from registers and V MN-major (transposed), against double-precision
// products on the host. Prints the largest error of each and exits 1 past bf16 rounding.
// Build: nvcc -std=c++17 -O2 -arch=sm_90a -I csrc -o wgmma_probe tests/cuda/wgmma_probe.cu
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "prefix_attention/pa_wgmma.cuh"

using namespace diffkern;
using namespace diffkern::pa;

template <int N>
__global__ void probe_qk(const uint16_t* q, const uint16_t* k, float* s) {
#if DK_PA_WGMMA_DEVICE
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem), sK = sQ + 64 * 256;
  load_tile_sw128<128, 128, 64>(sQ, q, 0, 128, 64);
  load_tile_sw128<128, 128, N>(sK, k, 0, 128, N);
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_smem();
  __syncthreads();
  float d[N / 2];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_ss<BFloat16, N>(d, sw128_desc(sQ + (kk / 4) * 64 * 128 + (kk % 4) * 32, 16, 1024),
                          sw128_desc(sK + (kk / 4) * N * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(d);
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, qq = t % 4;
  for (int j = 0; j < N / 8; ++j)
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) s[(16 * w + g + 8 * r) * N + 8 * j + 2 * qq + e] = d[4 * j + 2 * r + e];
#endif
}

__global__ void probe_pv(const uint16_t* pm, const uint16_t* v, float* o) {
#if DK_PA_WGMMA_DEVICE
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sV = smem_u32(smem);
  load_tile_sw128<128, 128, 128>(sV, v, 0, 128, 128);
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_smem();
  __syncthreads();
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, qq = t % 4;
  const uint32_t* p32 = reinterpret_cast<const uint32_t*>(pm);  // 64 x 128 bf16, row-major
  uint32_t a[8][4];
  for (int kk = 0; kk < 8; ++kk) {
    const int r0 = 16 * w + g, c0 = 16 * kk + 2 * qq;
    a[kk][0] = p32[(r0 * 128 + c0) / 2];
    a[kk][1] = p32[((r0 + 8) * 128 + c0) / 2];
    a[kk][2] = p32[(r0 * 128 + c0 + 8) / 2];
    a[kk][3] = p32[((r0 + 8) * 128 + c0 + 8) / 2];
  }
  float d[64];
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_rs_t<BFloat16, 128>(d, a[kk], sw128_desc(sV + kk * 16 * 128, 128 * 128, 1024));
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(d);
  for (int j = 0; j < 16; ++j)
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) o[(16 * w + g + 8 * r) * 128 + 8 * j + 2 * qq + e] = d[4 * j + 2 * r + e];
#endif
}

// dQ's product in the Hopper backward: D (64 x 64) = A^T B with A^T = dS^T stored as
// (128 k x 64 m) rows and B = K (128 k x 128 n) rows, columns [64 half, 64 half + 64):
// both operands MN-major (transposed) from shared memory.
__global__ void probe_tt(const uint16_t* at, const uint16_t* b, float* o, int half) {
#if DK_PA_WGMMA_DEVICE
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sA = smem_u32(smem), sB = sA + 128 * 128;
  load_tile_sw128<64, 128, 128>(sA, at, 0, 64, 128);
  load_tile_sw128<128, 128, 128>(sB, b, 0, 128, 128);
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_smem();
  __syncthreads();
  float d[32];
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_ss_tt<BFloat16, 64>(d, sw128_desc(sA + kk * 16 * 128, 16, 1024),
                              sw128_desc(sB + half * 128 * 128 + kk * 16 * 128, 16, 1024), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(d);
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, qq = t % 4;
  for (int j = 0; j < 8; ++j)
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) o[(16 * w + g + 8 * r) * 64 + 8 * j + 2 * qq + e] = d[4 * j + 2 * r + e];
#endif
}

static uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static double from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// out (m x n) = a (m x kd, row-major) times b, where b is (n x kd) row-major when bt, else (kd x n).
static double max_err(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                      const std::vector<float>& out, int m, int n, int kd, bool bt) {
  double worst = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int k = 0; k < kd; ++k)
        acc += from_bf16(a[i * kd + k]) * from_bf16(bt ? b[j * kd + k] : b[k * n + j]);
      worst = std::fmax(worst, std::fabs(acc - out[i * n + j]));
    }
  return worst;
}

int main() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto fill = [&](int n) {
    std::vector<uint16_t> x(n);
    for (auto& e : x) e = to_bf16(u(rng));
    return x;
  };
  const auto q = fill(64 * 128), k = fill(128 * 128), p = fill(64 * 128), v = fill(128 * 128);
  uint16_t *dq, *dk, *dp, *dv;
  float* dout;
  cudaMalloc(&dq, q.size() * 2);
  cudaMalloc(&dk, k.size() * 2);
  cudaMalloc(&dp, p.size() * 2);
  cudaMalloc(&dv, v.size() * 2);
  cudaMalloc(&dout, 64 * 128 * 4);
  cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dp, p.data(), p.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
  std::vector<float> out(64 * 128);
  bool ok = true;
  auto report = [&](const char* what, double err) {
    // Exact bf16 products summed in float32 over 128 terms of size <= 1: ~1e-5.
    const bool good = err < 1e-3;
    ok &= good;
    std::printf("%-28s max |error| %.3g %s\n", what, err, good ? "ok" : "WRONG");
  };
  cudaFuncSetAttribute(probe_qk<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  cudaFuncSetAttribute(probe_qk<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  probe_qk<64><<<1, 128, 64 * 256 + 64 * 256>>>(dq, dk, dout);
  cudaMemcpy(out.data(), dout, 64 * 64 * 4, cudaMemcpyDeviceToHost);
  report("S = Q K^T, m64n64k16 SS", max_err(q, k, out, 64, 64, 128, true));
  probe_qk<128><<<1, 128, 64 * 256 + 128 * 256>>>(dq, dk, dout);
  cudaMemcpy(out.data(), dout, 64 * 128 * 4, cudaMemcpyDeviceToHost);
  report("S = Q K^T, m64n128k16 SS", max_err(q, k, out, 64, 128, 128, true));
  cudaFuncSetAttribute(probe_pv, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  probe_pv<<<1, 128, 128 * 256>>>(dp, dv, dout);
  cudaMemcpy(out.data(), dout, 64 * 128 * 4, cudaMemcpyDeviceToHost);
  report("O = P V, m64n128k16 RS (V^T)", max_err(p, v, out, 64, 128, 128, false));
  cudaFuncSetAttribute(probe_tt, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  for (int half = 0; half < 2; ++half) {
    probe_tt<<<1, 128, 128 * 128 + 128 * 256>>>(dp, dk, dout, half);  // dp as (128 x 64) rows
    cudaMemcpy(out.data(), dout, 64 * 64 * 4, cudaMemcpyDeviceToHost);
    double worst = 0;
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        double acc = 0;
        for (int kx = 0; kx < 128; ++kx) acc += from_bf16(p[kx * 64 + m]) * from_bf16(k[kx * 128 + 64 * half + n]);
        worst = std::fmax(worst, std::fabs(acc - out[m * 64 + n]));
      }
    report(half ? "dQ = dS K, SS both MN (hi)" : "dQ = dS K, SS both MN (lo)", worst);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("CUDA: %s\n", cudaGetErrorString(e));
  return ok && e == cudaSuccess ? 0 : 1;
}
