// CUDA kernels of the Sinkhorn sweeps (row log-sum-exp updates and measurements) and of the
// sparsification of the plan: one row of C or C^T per group of threads, coalesced loads.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "sinkhorn/sinkhorn_math.cuh"

namespace diffkern {
namespace sinkhorn_detail {

// Launch shapes shared by the sweep and CG kernels.
constexpr int kWarpsPerBlock = 8;
constexpr int kReduceThreads = 256;
constexpr unsigned kFull = kFullWarpMask;

// A row of K entries is swept by kTpr threads (kTpr/32 warps), 256 threads per block.
// Short rows are latency-bound: one warp per 1000-entry row keeps only one load in flight
// per lane and 32 dependent exp/add steps (measured 15 us per sweep at n = 1000 on an
// H200); more threads per row and four loads issued before use hide that latency.
constexpr int kSweepThreads = 256;

// The rows of one sweep: row r of the (rows = B*R, K) matrix gets LSE_k(log_plan) and its
// finish_row update.
template <class T>
struct SweepArgs {
  const T* mat;
  int64_t R, K, rows;
  const double* own;
  const double* other;
  const double* w;
  SweepMode mode;
  double eps;
  double* out_pot;
  double* out_sum;
  double* out_term;
  const int* mask;
};

// Sweeps the kSweepThreads / kTpr rows of row block `block` (all threads of the block call).
// Reads own/other through the read-only path: nothing in the same launch writes them.
template <class T, int kTpr>
__device__ __forceinline__ void sweep_row_block(int64_t block, const SweepArgs<T>& A) {
  constexpr int kRowsPerBlock = kSweepThreads / kTpr;
  constexpr int kWarpsPerRow = kTpr / 32;
  __shared__ double s_mx[kRowsPerBlock][kWarpsPerRow];
  __shared__ double s_sum[kRowsPerBlock][kWarpsPerRow];
  const T* __restrict__ mat = A.mat;
  const double* __restrict__ own = A.own;
  const double* __restrict__ other = A.other;
  const int64_t R = A.R, K = A.K, rows = A.rows;
  const double eps = A.eps;
  const int local_row = threadIdx.x / kTpr;
  const int t = threadIdx.x % kTpr;
  const int64_t br = block * kRowsPerBlock + local_row;
  const int* __restrict__ mask = A.mask;
  const bool live = br < rows && mask[br / R];
  const double inv_eps = 1.0 / eps;
  const double o = (live && own) ? own[br] : 0.0;
  LogSumExp acc, acc2;
  if (live && o != -INFINITY) {
    const int64_t b = br / R;
    const T* row = mat + br * K;
    const double* oth = other + b * K;
    for (int64_t k0 = t; k0 < K; k0 += 4 * kTpr) {
      double x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t k = k0 + u * kTpr;
        // Nothing in this launch writes the cost or the other potential: read-only path.
        x[u] = k < K ? log_plan(o, __ldg(oth + k), static_cast<double>(__ldg(row + k)), inv_eps)
                     : -INFINITY;
      }
      acc.add<T>(x[0]);
      acc2.add<T>(x[1]);
      acc.add<T>(x[2]);
      acc2.add<T>(x[3]);
    }
  }
  acc.merge(acc2.mx, acc2.sum);
  for (int off = 16; off > 0; off /= 2) {
    const double mx = __shfl_xor_sync(kFull, acc.mx, off);
    const double sm = __shfl_xor_sync(kFull, acc.sum, off);
    acc.merge(mx, sm);
  }
  if constexpr (kWarpsPerRow > 1) {
    if (t % 32 == 0) {
      s_mx[local_row][t / 32] = acc.mx;
      s_sum[local_row][t / 32] = acc.sum;
    }
    __syncthreads();
    if (t == 0) {
      for (int wi = 1; wi < kWarpsPerRow; ++wi) acc.merge(s_mx[local_row][wi], s_sum[local_row][wi]);
    }
  }
  if (live && t == 0) {
    finish_row(A.mode, acc.value(), A.w[br], eps, A.out_pot ? A.out_pot + br : nullptr,
               A.out_sum ? A.out_sum + br : nullptr, A.out_term + br);
  }
}

template <class T, int kTpr>
__global__ void __launch_bounds__(kSweepThreads) sweep_kernel(SweepArgs<T> A) {
  sweep_row_block<T, kTpr>(blockIdx.x, A);
}

template <class T>
__global__ void sparsify_kernel(const T* __restrict__ mat, int64_t R, int64_t K, int64_t rows,
                                const double* __restrict__ own, const double* __restrict__ other,
                                const double* __restrict__ thr_own,
                                const double* __restrict__ thr_other,
                                const double* __restrict__ log_delta, double eps, int64_t* cnt,
                                int32_t* idx, float* val, const int* __restrict__ mask) {
  const int64_t br = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (br >= rows) return;
  const int64_t b = br / R;
  if (!mask[b]) return;
  const double inv_eps = 1.0 / eps;
  const T* row = mat + br * K;
  const double* oth = other + b * K;
  const double* thr = thr_other + b * K;
  const double o = own[br], to = thr_own[br], ld = log_delta[b];
  int32_t* out_idx = idx + br * K;
  float* out_val = val + br * K;
  int64_t base = 0;
  // Chunks of 32 consecutive entries; a ballot compacts the kept ones in column order.
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const int64_t k = k0 + lane;
    bool keep = false;
    double lp = 0;
    if (k < K) {
      lp = log_plan(o, oth[k], static_cast<double>(row[k]), inv_eps);
      keep = lp >= ld + fmin(to, thr[k]) && lp > kMinLogKept;
    }
    const unsigned ballot = __ballot_sync(kFull, keep);
    if (keep) {
      const int64_t pos = base + __popc(ballot & ((1u << lane) - 1u));
      out_idx[pos] = static_cast<int32_t>(k);
      out_val[pos] = static_cast<float>(exp(lp));
    }
    base += __popc(ballot);
  }
  if (lane == 0) cnt[br] = base;
}

}  // namespace sinkhorn_detail
}  // namespace diffkern
